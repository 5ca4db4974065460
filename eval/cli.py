"""``asvr-eval``: measure a trained ASVR model on local files.

    # held-out text loss / perplexity and visual-token accuracy @1/@5 per depth
    asvr-eval loss --model runs/sft --codes codes/ --data heldout_sft.json --out reports/loss
    # benchmarks: generic VQA JSONL, POPE, MME, MMBench/ScienceQA TSV (greedy answers)
    asvr-eval bench --model runs/sft --bench coco_pope_random.json --images coco/val2014 --out reports/pope
    # score saved predictions again, without a model (e.g. lenient instead of lmms-eval scoring)
    asvr-eval score --bench coco_pope_random.json --images coco/val2014 \
        --predictions reports/pope/predictions.jsonl --scoring lenient --out reports/pope-lenient

``--model`` is an ``asvr-train`` run folder (its exported model is
``RUN/final``) or an export folder; ``bench`` also takes a Hugging Face
LLaVA folder (``asvr-export --hf-llava`` or any LLaVA-1.5).  Each command writes
``report.json`` and ``report.md`` under ``--out``; ``bench`` and ``score`` also write
the answers to ``predictions.jsonl`` (``predictions-NN-NAME.jsonl``, one per file,
when several ``--bench`` files are given).  POPE, MME, MMBench and ScienceQA are asked
and scored as lmms-eval does unless ``--instructions llava`` / ``--scoring lenient``.

Every option is a field of the subcommand's options dataclass below (the
model to load, the bench files and their scoring are components shared by
the subcommands; the held-out set is ``asvr.eval.losses.LossEvalConfig``,
answer generation ``asvr.eval.generate.GenerationConfig``), so the commands
hand those configs on without copying options; ``--config FILE``
(.toml/.yaml/.json, the field names as keys) gives any of them, flags win.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from asvr.core.cli_parser import OneLineParser
from asvr.core.config_cli import add_command, options_from_args, parse_dataclass_args
from asvr.core.errors import CLIError, run_guarded
from asvr.core.help_text import plain
from asvr.eval.generate import GenerationConfig
from asvr.eval.losses import LossEvalConfig
from asvr.eval.scoring import SCORINGS
from asvr.train.data.templates import TEMPLATES


@dataclass(kw_only=True)
class ModelOptions:
    """The model to evaluate and where its parts moved to (``loss`` and ``bench``)."""

    model: str
    """asvr-train run folder (RUN, exported model in RUN/final), an export folder, or (bench) a Hugging Face LLaVA
    folder (asvr-export --hf-llava, or LLaVA-1.5 from elsewhere)."""
    tokenizer: str | None = None
    """Semantic tokenizer folder, when it moved from the path recorded in the model."""
    vision_tower: str | None = None
    """Weights folder of the model's vision tower, when it moved from the path recorded in the model (its sha256
    must match)."""
    text_tokenizer: str | None = None
    """LLM text tokenizer folder, when the export has none."""
    template: str | None = field(default=None, metadata={"choices": tuple(TEMPLATES)})
    """Conversation template (default: the one recorded in the export, else the run's RUN/train_config.json, else
    vicuna_v1); the report says which was used."""
    device: str = "auto"
    """cpu, cuda, cuda:1, ... (default: cuda when available)."""

    def load(self, need_encoder: bool = False):
        from asvr.eval.loading import load_for_eval

        return load_for_eval(
            self.model,
            device=self.device,
            need_encoder=need_encoder,
            tokenizer_dir=self.tokenizer,
            text_tokenizer=self.text_tokenizer,
            template=self.template,
            vision_tower_dir=self.vision_tower,
        )


def _bench_formats() -> list[str]:
    from asvr.eval.formats.base import bench_formats

    return ["auto", *bench_formats()]


@dataclass(kw_only=True)
class BenchReading:
    """How bench files are read and scored (``bench`` and ``score``)."""

    format: str = field(default="auto", metadata={"choices": _bench_formats})
    """Layout (default: guessed from the content)."""
    images: str | None = None
    """Image root for relative image paths (default: the bench file's folder); the bench reader checks they
    exist."""
    scoring: str = field(default="lmms-eval", metadata={"choices": SCORINGS})
    """POPE, MME, MMBench, ScienceQA: lmms-eval (exact lower-cased yes/no for POPE with lmms-eval's recall and
    yes-ratio; Otter's parse_pred_ans for MME; MMBench's can_infer letter/option-text rule, plus circular accuracy;
    ScienceQA's letter or 'X.' rule: numbers comparable with published ones) or lenient (first yes/no word,
    negations; any stated letter or option text; unparsed kept apart). Generic JSONL: always lenient."""


@dataclass(kw_only=True)
class LossOptions:
    """``asvr-eval loss``."""

    model: ModelOptions = field(metadata={"prefix": ""})
    held_out: LossEvalConfig = field(metadata={"prefix": ""})
    out: str
    """Report folder (report.json, report.md)."""


@dataclass(kw_only=True)
class BenchOptions:
    """``asvr-eval bench``."""

    model: ModelOptions = field(metadata={"prefix": ""})
    bench: list[str]
    """Benchmark file(s) (an MME folder is accepted)."""
    reading: BenchReading = field(default_factory=BenchReading, metadata={"prefix": ""})
    max_items: int | None = None
    """Only the first N questions of each file (smoke runs)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig, metadata={"prefix": ""})
    out: str
    """Report folder (report.json, report.md, predictions.jsonl)."""


@dataclass(kw_only=True)
class ScoreOptions:
    """``asvr-eval score``."""

    bench: str
    """The benchmark file (or MME folder) the predictions answer."""
    predictions: str
    """predictions.jsonl written by asvr-eval bench."""
    reading: BenchReading = field(default_factory=BenchReading, metadata={"prefix": ""})
    out: str
    """Report folder (report.json, report.md, predictions.jsonl)."""


GROUPS = {"model": "model", "reading": "bench files", "generation": "answers", "held_out": "held-out set"}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="asvr-eval",
        description=plain(__doc__.split("\n\nEvery option")[0]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_command(
        sub,
        "loss",
        LossOptions,
        groups=GROUPS,
        help="held-out text loss, perplexity and visual-token accuracy per depth",
        description="Teacher-forced text loss / perplexity and visual-token accuracy @1 and @k per "
        "depth (plus free-running greedy accuracy) on held-out LLaVA JSON conversations "
        "whose images are in --codes.",
    )
    add_command(
        sub,
        "bench",
        BenchOptions,
        groups=GROUPS,
        help="VQA benchmarks on local files (JSONL, POPE, MME, MMBench TSV)",
        description="Greedy answers to benchmark questions, scored per layout. "
        "Formats: jsonl {image, question, answer, options?, type?, category?}; "
        "pope {question_id, image, text, label}; mme TSV image/question/answer "
        "(or the MME release folder); mmbench TSV index/question/hint/A../answer/image "
        "(base64 or path)/category; scienceqa: the same TSV with lmms-eval's ScienceQA prompt and scoring.",
    )
    add_command(
        sub,
        "score",
        ScoreOptions,
        groups=GROUPS,
        help="score saved predictions again (no model)",
        description="Re-score a bench run's predictions.jsonl (matched to the bench items by id) "
        "without running a model; writes report.json, report.md, predictions.jsonl.",
    )
    return p


def _model_info(lm) -> dict:
    return {
        "model": str(lm.export_dir),
        "run": str(lm.run_dir) if lm.run_dir else None,
        "vision_input": lm.vision_input,
        "vision_tower": lm.tower.spec.source if lm.tower is not None else None,
        "template": lm.template.name,
        "template_source": lm.template_source,
        "trained_inputs": asdict(lm.inputs) if lm.inputs is not None else None,
        "tokenizer_fingerprint": lm.model.cfg.vision.fingerprint,
        "device": str(lm.device),
    }


def run_loss(o: LossOptions) -> int:
    from asvr.eval.losses import evaluate_loss
    from asvr.eval.report import loss_markdown, write_atomic, write_json

    cfg = o.held_out
    for f in cfg.data:
        if not Path(f).is_file():
            raise CLIError(f"--data {f}: no such file")
    if not Path(cfg.codes).exists():
        raise CLIError(f"--codes {cfg.codes}: no such folder")
    lm = o.model.load()
    results = evaluate_loss(lm, cfg)
    report = {
        "kind": "loss",
        "model": _model_info(lm),
        "config": {
            "data": cfg.data,
            "codes": cfg.codes,
            "images": cfg.images,
            "batch_size": cfg.batch_size,
            "max_samples": cfg.max_samples,
            "topk": cfg.topk,
            "preprocess_mode": results.get("preprocess"),
            "preprocess_source": f"--codes {cfg.codes} (the held-out shards' mode: the targets were encoded so)",
            "trained_preprocess": lm.inputs.preprocess if lm.inputs is not None else None,
        },
        "results": results,
    }
    out = Path(o.out)
    write_json(out / "report.json", report)
    write_atomic(out / "report.md", loss_markdown(report))
    t, v = results["text"], results["visual"]
    acc1 = " ".join(f"{d['acc1']:.3f}" if d["acc1"] is not None else "-" for d in v["per_depth"])
    ppl = f"{t['perplexity']:.2f}" if t["perplexity"] is not None else "-"
    loss = f"{t['loss']:.4f}" if t["loss"] is not None else "-"
    print(
        f"text loss {loss} (ppl {ppl}); visual acc@1 per depth {acc1}; template {lm.template.name} "
        f"({lm.template_source}), images {results.get('preprocess')} (the --codes shards' mode); "
        f"report in {out / 'report.md'}"
    )
    return 0


def _vs_chance(m: dict) -> str:
    """'61.50% (chance 33.33%)': a score always next to its chance level."""
    acc = f"{100 * m['acc']:.2f}%" if m["acc"] is not None else "-"
    return acc + (f" (chance {100 * m['chance']:.2f}%)" if m.get("chance") is not None else "")


def run_bench(o: BenchOptions) -> int:
    from asvr.eval.bench import run_bench as run
    from asvr.train.export.hf_llava import is_hf_llava

    from asvr.eval.formats.base import read_bench
    from asvr.eval.hf_llava import load_hf_llava
    from asvr.eval.loading import resolve_device
    from asvr.eval.report import bench_markdown, write_atomic, write_json, write_jsonl

    if o.max_items is not None and o.max_items < 1:
        raise CLIError("--max-items must be >= 1")
    r, gen, asked = o.reading, o.generation, o.generation.preprocess_mode
    for f in o.bench:  # fail on a bad file before loading the model
        read_bench(f, r.format, r.images)
    if is_hf_llava(o.model.model):  # a Hugging Face LLaVA folder (asvr-export --hf-llava, or trained elsewhere)
        hf = load_hf_llava(o.model.model, resolve_device(o.model.device))
        summaries, predictions = run(None, o.bench, r.format, r.images, gen, o.max_items, r.scoring, answer=hf.answer)
        info, preprocess = hf.info(), asked or hf.preprocess_mode
        preprocess_source = "--preprocess" if asked else hf.preprocess_source
    else:
        lm = o.model.load(need_encoder=True)
        summaries, predictions = run(lm, o.bench, r.format, r.images, gen, o.max_items, r.scoring)
        info, preprocess = _model_info(lm), asked or lm.preprocess
        preprocess_source = "--preprocess" if asked else lm.preprocess_source
    out = Path(o.out)
    for i, (s, recs) in enumerate(zip(summaries, predictions)):
        name = f"predictions-{i:02d}-{Path(s['file']).stem}.jsonl" if len(summaries) > 1 else "predictions.jsonl"
        write_jsonl(out / name, recs)
        s["predictions"] = name
    report = {
        "kind": "bench",
        "model": info,
        "config": {
            "bench": o.bench,
            "format": r.format,
            "images": r.images,
            "max_new_tokens": gen.max_new_tokens,
            "instructions": gen.instructions,
            "batch_size": gen.batch_size,
            "max_items": o.max_items,
            "preprocess_mode": preprocess,
            "preprocess_source": preprocess_source,
            "scoring": r.scoring,
        },
        "benches": summaries,
    }
    write_json(out / "report.json", report)
    write_atomic(out / "report.md", bench_markdown(report))
    for s in summaries:
        m = s["metrics"]
        print(
            f"{s['file']} ({s['format']}, {s['scoring']} scoring): {m['n']} questions, accuracy {_vs_chance(m)}, "
            f"{m['unparsed']} unparsed"
        )
        if len(m["by_kind"]) > 1:
            print("  " + "; ".join(f"{k} {_vs_chance(x)}" for k, x in m["by_kind"].items()))
    print(f"template {info['template']} ({info['template_source']}), images {preprocess} ({preprocess_source})")
    print(f"report in {out / 'report.md'}")
    return 0


def run_score(o: ScoreOptions) -> int:
    import json

    from asvr.eval.bench import rescore, scoring_for
    from asvr.eval.formats.base import read_bench
    from asvr.eval.loading import EvalError
    from asvr.eval.report import bench_markdown, write_atomic, write_json, write_jsonl

    r = o.reading
    fmt, items = read_bench(o.bench, r.format, r.images)
    pred = Path(o.predictions)
    if not pred.is_file():
        raise CLIError(f"--predictions {pred}: no such file")
    records = []
    seen: dict[str, int] = {}
    for n, line in enumerate(pred.read_text().split("\n"), start=1):  # not splitlines(): U+2028 is JSON text
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CLIError(f"{pred}:{n}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "id" not in rec or not isinstance(rec.get("prediction"), str):
                raise CLIError(f"{pred}:{n}: a prediction record needs 'id' and a string 'prediction'")
            if str(rec["id"]) in seen:
                raise CLIError(
                    f"{pred}:{n}: a second prediction for id {str(rec['id'])!r} (first at line {seen[str(rec['id'])]})"
                )
            seen[str(rec["id"])] = n
            records.append(rec)
    try:
        fresh, metrics = rescore(fmt, items, records, r.scoring)
    except EvalError as e:
        raise CLIError(f"{pred}: {e}") from None
    out = Path(o.out)
    write_jsonl(out / "predictions.jsonl", fresh)
    summary = {
        "file": str(o.bench),
        "format": fmt,
        "scoring": scoring_for(fmt, r.scoring),
        "metrics": metrics,
        "seconds": 0.0,
        "predictions": "predictions.jsonl",
    }
    report = {
        "kind": "score",
        "config": {
            "bench": [str(o.bench)],
            "format": r.format,
            "images": r.images,
            "predictions": str(pred),
            "scoring": r.scoring,
        },
        "benches": [summary],
    }
    write_json(out / "report.json", report)
    write_atomic(out / "report.md", bench_markdown(report))
    acc = f"{100 * metrics['acc']:.2f}%" if metrics["acc"] is not None else "-"
    print(
        f"{o.bench} ({fmt}, {summary['scoring']} scoring): {metrics['n']} questions, accuracy {acc}, "
        f"{metrics['unparsed']} unparsed; report in {out / 'report.md'}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands: dict[str, Callable[[Any], int]] = {"loss": run_loss, "bench": run_bench, "score": run_score}

    def run() -> int:  # parsed inside the guard: a bad --config file is one line too
        args = parse_dataclass_args(build_parser(), None, argv)
        return commands[args.command](options_from_args(args))

    return run_guarded("asvr-eval", argv[0] if argv and argv[0] in commands else None, run, (FileNotFoundError,))


if __name__ == "__main__":
    sys.exit(main())
