"""Report files: ``report.json`` (everything, machine-readable) and ``report.md``
(the tables a person reads), plus ``predictions*.jsonl`` for benchmarks.
Every file is written to a temporary name and renamed (atomic)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable

from asvr.core.atomic import atomic_write


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, text)


def _clean(o):
    """JSON without NaN (null instead) and with string keys."""
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_json(path, obj) -> Path:
    return write_atomic(path, json.dumps(_clean(obj), indent=2) + "\n")


def write_jsonl(path, rows: Iterable[dict]) -> Path:
    return write_atomic(path, "".join(json.dumps(_clean(r)) + "\n" for r in rows))


def pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def num(x, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _model_lines(info: dict) -> list[str]:
    tower = f", vision tower `{info['vision_tower']}`" if info.get("vision_tower") else ""
    return [
        f"- model: `{info['model']}` (vision input {info['vision_input']}{tower}, template {info['template']} "
        f"from {info['template_source']})",
        f"- device: {info['device']}",
    ]


def loss_markdown(report: dict) -> str:
    r, t, v = report["results"], report["results"]["text"], report["results"]["visual"]
    k = v["topk"]
    lines = [
        "# ASVR held-out losses",
        "",
        *_model_lines(report["model"]),
        f"- data: {', '.join(f'`{d}`' for d in report['config']['data'])}; codes `{report['config']['codes']}`",
        f"- {r['n_samples']} samples, {r['n_images']} images, {t['tokens']} text tokens, "
        f"{v['positions']} image positions ({r['n_bad_samples_skipped']} bad samples skipped), "
        f"{r['seconds']:.1f} s",
        "",
        "## Text",
        "",
        *table(["loss", "perplexity", "token acc@1 %"], [[num(t["loss"]), num(t["perplexity"], 2), pct(t["acc1"])]]),
        "",
        "## Visual tokens (teacher-forced unless noted)",
        "",
        f"Mean visual loss {num(v['loss'])}; positions right at every depth (acc@1): {pct(v['acc1_all_depths'])} %.",
        "",
        *table(
            ["depth", "loss", "acc@1 %", f"acc@{k} %", "greedy acc@1 %"],
            [
                [str(d["depth"]), num(d["loss"]), pct(d["acc1"]), pct(d[f"acc{k}"]), pct(d["acc_greedy"])]
                for d in v["per_depth"]
            ],
        ),
        "",
        "Greedy: the head's own codes depth by depth (no ground truth for the coarser depths).",
        "",
    ]
    return "\n".join(lines)


def bench_markdown(report: dict) -> str:
    from asvr.eval.formats.base import bench_format

    if report["kind"] == "score":  # asvr-eval score: saved predictions, no model
        head = [f"- predictions `{report['config']['predictions']}` scored again (no model)"]
    else:
        head = [
            *_model_lines(report["model"]),
            f"- greedy decoding, at most {report['config']['max_new_tokens']} "
            f"new tokens, instructions: {report['config']['instructions']}",
        ]
    lines = ["# ASVR benchmark report", "", *head, ""]
    for b in report["benches"]:
        m = b["metrics"]
        lines += [
            f"## `{b['file']}` ({b['format']}, {b.get('scoring', 'lenient')} scoring)",
            "",
            f"{m['n']} questions, {m['n_scored']} scored, accuracy **{pct(m['acc'])} %** "
            f"(chance {pct(m.get('chance'))} %), "
            f"{m['unparsed']} unparsed answers, {b['seconds']:.1f} s; predictions in `{b['predictions']}`.",
            "",
        ]
        layout = bench_format(b["format"])
        if layout.markdown is not None:
            lines += layout.markdown(m)
        if len(m["by_kind"]) > 1 or layout.generic_tables:
            lines += table(
                ["kind", "n", "acc %", "chance %"],
                [[k, str(x["n"]), pct(x["acc"]), pct(x.get("chance"))] for k, x in m["by_kind"].items()],
            )
            lines += [""]
        if m["by_category"] and layout.generic_tables:
            lines += table(
                ["category", "n", "acc %", "chance %"],
                [[c, str(x["n"]), pct(x["acc"]), pct(x.get("chance"))] for c, x in m["by_category"].items()],
            ) + [""]
    return "\n".join(lines)
