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
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from asvr.core.cli_parser import OneLineParser
from asvr.core.errors import CLIError, TokenizerError, run_guarded
from asvr.core.help_text import plain
from asvr.tokenizer.preprocess import PREPROCESS_MODES
from asvr.train.data.templates import TEMPLATES


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        required=True,
        help="asvr-train run folder (RUN, exported model in RUN/final), an export "
        "folder, or (bench) a Hugging Face LLaVA folder (asvr-export --hf-llava, or LLaVA-1.5 from elsewhere)",
    )
    g.add_argument("--tokenizer", help="semantic tokenizer folder, when it moved from the path recorded in the model")
    g.add_argument(
        "--vision-tower",
        help="weights folder of the model's vision tower, when it moved from the path "
        "recorded in the model (its sha256 must match)",
    )
    g.add_argument("--text-tokenizer", help="LLM text tokenizer folder, when the export has none")
    g.add_argument(
        "--template",
        choices=list(TEMPLATES),
        help="conversation template (default: the one recorded in the export, else the run's "
        "RUN/train_config.json, else vicuna_v1); the report says which was used",
    )
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", required=True, help="report folder (report.json, report.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from asvr.eval.formats.base import bench_formats

    p = OneLineParser(
        prog="asvr-eval", description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    lo = sub.add_parser(
        "loss",
        help="held-out text loss, perplexity and visual-token accuracy per depth",
        description="Teacher-forced text loss / perplexity and visual-token accuracy @1 and @k per "
        "depth (plus free-running greedy accuracy) on held-out LLaVA JSON conversations "
        "whose images are in --codes.",
    )
    _common(lo)
    lo.add_argument("--codes", required=True, help="code shards holding the held-out images (the model's tokenizer)")
    lo.add_argument("--data", required=True, nargs="+", help="held-out LLaVA JSON file(s)")
    lo.add_argument("--images", help="image root (needed by online/features models)")
    lo.add_argument("--batch-size", type=int, default=8, help="samples per forward pass (default 8)")
    lo.add_argument("--max-samples", type=int, help="only the first N samples")
    lo.add_argument("--max-len", type=int, default=4096, help="tokens per sample (default 4096)")
    lo.add_argument("--topk", type=int, default=5, help="k of the visual acc@k (default 5)")
    lo.add_argument("--chunk", type=int, default=1024, help="rows per classifier chunk; memory chunk x K floats (1024)")
    lo.add_argument("--no-greedy", dest="greedy", action="store_false", help="skip the free-running code accuracy")
    lo.add_argument("--skip-bad-samples", action="store_true", help="skip malformed/missing samples instead of failing")

    be = sub.add_parser(
        "bench",
        help="VQA benchmarks on local files (JSONL, POPE, MME, MMBench TSV)",
        description="Greedy answers to benchmark questions, scored per layout. "
        "Formats: jsonl {image, question, answer, options?, type?, category?}; "
        "pope {question_id, image, text, label}; mme TSV image/question/answer "
        "(or the MME release folder); mmbench TSV index/question/hint/A../answer/image "
        "(base64 or path)/category; scienceqa: the same TSV with lmms-eval's ScienceQA prompt and scoring.",
    )
    _common(be)
    be.add_argument("--bench", required=True, nargs="+", help="benchmark file(s) (an MME folder is accepted)")
    be.add_argument(
        "--format",
        default="auto",
        choices=["auto", *bench_formats()],
        help="layout (default: guessed from the content)",
    )
    be.add_argument("--images", help="image root for relative image paths (default: the bench file's folder)")
    be.add_argument("--batch-size", type=int, default=8, help="questions per generate call (default 8)")
    be.add_argument("--max-items", type=int, help="only the first N questions of each file (smoke runs)")
    be.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit (default 16)")
    be.add_argument(
        "--instructions",
        choices=["lmms-eval", "llava", "none"],
        default="lmms-eval",
        help="lmms-eval: each task's lmms-eval prompt (POPE, MME without ' Please answer yes or no.', "
        "MMBench 'There are several options:', ScienceQA 'Context:'; generic JSONL items get LLaVA's); "
        "llava: hint, question, options and LLaVA's answer-format instruction, one per line (the "
        "prompts before lmms-eval's became the default); none: the bare question (default lmms-eval)",
    )
    be.add_argument(
        "--preprocess",
        choices=PREPROCESS_MODES,
        help="image preprocessing (default: the training preprocessing recorded in the export, else "
        "the tokenizer's; LLaVA instruction tuning used pad); the report says which was used",
    )
    # the old name (before --preprocess, as in asvr-pipeline tokenize): still accepted, not shown
    be.add_argument("--preprocess-mode", dest="preprocess", choices=PREPROCESS_MODES, help=argparse.SUPPRESS)
    _scoring(be)

    sc = sub.add_parser(
        "score",
        help="score saved predictions again (no model)",
        description="Re-score a bench run's predictions.jsonl (matched to the bench items by id) "
        "without running a model; writes report.json, report.md, predictions.jsonl.",
    )
    sc.add_argument("--bench", required=True, help="the benchmark file (or MME folder) the predictions answer")
    sc.add_argument("--predictions", required=True, help="predictions.jsonl written by asvr-eval bench")
    sc.add_argument(
        "--format",
        default="auto",
        choices=["auto", *bench_formats()],
        help="layout (default: guessed from the content)",
    )
    sc.add_argument("--images", help="image root for relative image paths (the bench reader checks they exist)")
    sc.add_argument("--out", required=True, help="report folder (report.json, report.md, predictions.jsonl)")
    _scoring(sc)
    return p


def _scoring(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scoring",
        choices=["lmms-eval", "lenient"],
        default="lmms-eval",
        help="POPE, MME, MMBench, ScienceQA: lmms-eval (exact lower-cased yes/no for POPE with "
        "lmms-eval's recall and yes-ratio; Otter's parse_pred_ans for MME; MMBench's can_infer "
        "letter/option-text rule, plus circular accuracy; ScienceQA's letter or 'X.' rule: numbers "
        "comparable with published ones) or lenient (first yes/no word, negations; any stated "
        "letter or option text; unparsed kept apart). Generic JSONL: always lenient (default lmms-eval)",
    )


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


def run_loss(a: argparse.Namespace) -> int:
    from asvr.eval.loading import load_for_eval
    from asvr.eval.losses import LossEvalConfig, evaluate_loss
    from asvr.eval.report import loss_markdown, write_atomic, write_json

    for f in a.data:
        if not Path(f).is_file():
            raise CLIError(f"--data {f}: no such file")
    if not Path(a.codes).exists():
        raise CLIError(f"--codes {a.codes}: no such folder")
    cfg = LossEvalConfig(
        data=a.data,
        codes=a.codes,
        images=a.images,
        batch_size=a.batch_size,
        max_samples=a.max_samples,
        max_len=a.max_len,
        topk=a.topk,
        chunk=a.chunk,
        greedy=a.greedy,
        skip_bad_samples=a.skip_bad_samples,
        progress=not a.quiet,
    )
    lm = load_for_eval(
        a.model,
        device=a.device,
        tokenizer_dir=a.tokenizer,
        text_tokenizer=a.text_tokenizer,
        template=a.template,
        vision_tower_dir=a.vision_tower,
    )
    results = evaluate_loss(lm, cfg)
    report = {
        "kind": "loss",
        "model": _model_info(lm),
        "config": {
            "data": a.data,
            "codes": a.codes,
            "images": a.images,
            "batch_size": a.batch_size,
            "max_samples": a.max_samples,
            "topk": a.topk,
            "preprocess_mode": results.get("preprocess"),
            "preprocess_source": f"--codes {a.codes} (the held-out shards' mode: the targets were encoded so)",
            "trained_preprocess": lm.inputs.preprocess if lm.inputs is not None else None,
        },
        "results": results,
    }
    out = Path(a.out)
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


def run_bench(a: argparse.Namespace) -> int:
    from asvr.eval.bench import run_bench as run
    from asvr.eval.generate import GenerationConfig
    from asvr.train.export.hf_llava import is_hf_llava

    from asvr.eval.formats.base import read_bench
    from asvr.eval.hf_llava import load_hf_llava
    from asvr.eval.loading import load_for_eval, resolve_device
    from asvr.eval.report import bench_markdown, write_atomic, write_json, write_jsonl

    if a.max_items is not None and a.max_items < 1:
        raise CLIError("--max-items must be >= 1")
    gen = GenerationConfig(
        max_new_tokens=a.max_new_tokens,
        batch_size=a.batch_size,
        instructions=a.instructions,
        preprocess_mode=a.preprocess,
        progress=not a.quiet,
    )
    for f in a.bench:  # fail on a bad file before loading the model
        read_bench(f, a.format, a.images)
    if is_hf_llava(a.model):  # a Hugging Face LLaVA folder (asvr-export --hf-llava, or trained elsewhere)
        hf = load_hf_llava(a.model, resolve_device(a.device))
        summaries, predictions = run(None, a.bench, a.format, a.images, gen, a.max_items, a.scoring, answer=hf.answer)
        info, preprocess = hf.info(), a.preprocess or hf.preprocess_mode
        preprocess_source = "--preprocess" if a.preprocess else hf.preprocess_source
    else:
        lm = load_for_eval(
            a.model,
            device=a.device,
            need_encoder=True,
            tokenizer_dir=a.tokenizer,
            text_tokenizer=a.text_tokenizer,
            template=a.template,
            vision_tower_dir=a.vision_tower,
        )
        summaries, predictions = run(lm, a.bench, a.format, a.images, gen, a.max_items, a.scoring)
        info, preprocess = _model_info(lm), a.preprocess or lm.preprocess
        preprocess_source = "--preprocess" if a.preprocess else lm.preprocess_source
    out = Path(a.out)
    for i, (s, recs) in enumerate(zip(summaries, predictions)):
        name = f"predictions-{i:02d}-{Path(s['file']).stem}.jsonl" if len(summaries) > 1 else "predictions.jsonl"
        write_jsonl(out / name, recs)
        s["predictions"] = name
    report = {
        "kind": "bench",
        "model": info,
        "config": {
            "bench": a.bench,
            "format": a.format,
            "images": a.images,
            "max_new_tokens": a.max_new_tokens,
            "instructions": a.instructions,
            "batch_size": a.batch_size,
            "max_items": a.max_items,
            "preprocess_mode": preprocess,
            "preprocess_source": preprocess_source,
            "scoring": a.scoring,
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


def run_score(a: argparse.Namespace) -> int:
    import json

    from asvr.eval.bench import rescore, scoring_for
    from asvr.eval.formats.base import read_bench
    from asvr.eval.report import bench_markdown, write_atomic, write_json, write_jsonl

    fmt, items = read_bench(a.bench, a.format, a.images)
    pred = Path(a.predictions)
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
        fresh, metrics = rescore(fmt, items, records, a.scoring)
    except ValueError as e:
        raise CLIError(f"{pred}: {e}") from None
    out = Path(a.out)
    write_jsonl(out / "predictions.jsonl", fresh)
    summary = {
        "file": str(a.bench),
        "format": fmt,
        "scoring": scoring_for(fmt, a.scoring),
        "metrics": metrics,
        "seconds": 0.0,
        "predictions": "predictions.jsonl",
    }
    report = {
        "kind": "score",
        "config": {
            "bench": [str(a.bench)],
            "format": a.format,
            "images": a.images,
            "predictions": str(pred),
            "scoring": a.scoring,
        },
        "benches": [summary],
    }
    write_json(out / "report.json", report)
    write_atomic(out / "report.md", bench_markdown(report))
    acc = f"{100 * metrics['acc']:.2f}%" if metrics["acc"] is not None else "-"
    print(
        f"{a.bench} ({fmt}, {summary['scoring']} scoring): {metrics['n']} questions, accuracy {acc}, "
        f"{metrics['unparsed']} unparsed; report in {out / 'report.md'}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from asvr.tokenizer.preprocess import ImageError
    from asvr.core.shards import ShardError
    from asvr.train.export.native import ExportError
    from asvr.train.data.sources import DataError
    from asvr.train.data.templates import ConversationError

    from asvr.eval.formats.base import BenchError
    from asvr.eval.loading import EvalError

    args = build_parser().parse_args(argv)
    expected = (
        EvalError,
        BenchError,
        DataError,
        ShardError,
        TokenizerError,
        ImageError,
        ExportError,
        ConversationError,
        ValueError,
        FileNotFoundError,
    )
    commands = {"loss": run_loss, "bench": run_bench, "score": run_score}
    return run_guarded("asvr-eval", args.command, lambda: commands[args.command](args), expected)


if __name__ == "__main__":
    sys.exit(main())
