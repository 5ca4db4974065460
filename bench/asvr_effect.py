"""Does reconstructing semantic codes help?  A seeded miniature of the paper's ablation (Table 1).

``python -m bench.asvr_effect --out exp/`` (or ``make experiment``) runs, on CPU:

1. a procedural VQA corpus (``asvr.demo.vqa_corpus``): train images with captions and
   questions, held-out images whose colour-shape pairs never occur in training (the bench),
   caption-free images;
2. two tokenizers on the train images, both on EfficientNet-Lite0's 7 x 7 grid: *semantic*
   (RVQ of the encoder's features) and *appearance* (RVQ of raw pixel patches,
   ``--encoder pixels``); the corpus tokenized once with each (``asvr-pipeline``);
3. a tiny Llama built from a config; per seed and arm: pretrain (projector + visual head,
   LLM frozen) then SFT, the same data order and steps in every arm; the LLM always sees
   the same cached EfficientNet-Lite0 features (``--vision-input features``); only the
   visual targets change (``--vision-tower``: input independent of the target tokenizer);
4. per run: ``asvr-eval bench`` on the held-out questions (accuracy per category and form,
   chance level beside it) and ``asvr-eval loss`` (visual-token accuracy per depth).

Arms (the paper's names): a baseline (visual loss weight 0 in both stages), b ASVR (1 in
both), c ASVR with caption-free images in the mix, d visual loss in SFT only (the paper's
negative control), e ASVR with appearance targets (the paper's central contrast).
Results: ``--results`` gets ``results.json`` (every run), ``summary.md`` (mean +- std over
seeds, chance, the differences to the baseline with the seeds needed to resolve them) and
``asvr_effect.png``.  ``--smoke`` runs the whole chain at a toy size with 2 steps per stage.

Two benches on the same held-out scenes (``BENCHES``): ``seen`` asks about objects whose
colour-shape pair training showed (does the model read new scenes?), ``unseen`` about the
one pair no training scene shows (does it compose?).

Measured (bench/results/asvr_effect/, 2026-11-26, 2 shared cores): the default size (4000
train scenes, 128-d x 2-layer Llama, 60 pretrain + 1500 SFT steps of 4 x 512 tokens) runs
in 59 min, ~10 min of it corpus, tokenizers, shards and features, then ~3 min per arm and
seed.  At 600 scenes and 400 steps (the first version) every arm sat at chance; at this
size count and short answers are above chance in every arm, yes/no and multiple choice
are not, and no arm differs from the baseline by more than 2 standard errors.  Three times
the steps, 4 layers or tied embeddings did not teach the comparisons (levers.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ARM_NAMES = {
    "a": "baseline (no visual loss)",
    "b": "ASVR (semantic targets)",
    "c": "ASVR + caption-free images",
    "d": "visual loss in SFT only",
    "e": "ASVR, appearance targets",
}


@dataclass(frozen=True)
class Arm:
    key: str
    pretrain_weight: float
    sft_weight: float
    targets: str
    """semantic | appearance."""
    caption_free: bool = False

    @property
    def name(self) -> str:
        return ARM_NAMES[self.key]

    def pretrain_id(self) -> str:
        """Arms with the same pretraining share it (a and d: weight 0)."""
        return f"w{self.pretrain_weight:g}-{self.targets}{'-free' if self.caption_free else ''}"


ARMS = {
    "a": Arm("a", 0.0, 0.0, "semantic"),
    "b": Arm("b", 1.0, 1.0, "semantic"),
    "c": Arm("c", 1.0, 1.0, "semantic", caption_free=True),
    "d": Arm("d", 0.0, 1.0, "semantic"),
    "e": Arm("e", 1.0, 1.0, "appearance"),
}


@dataclass(kw_only=True)
class ExperimentConfig:
    out: str
    """Work folder (corpus, tokenizers, shards, runs): large, not committed."""
    results: str
    """Where results.json, summary.md and the plot go (small; committed under bench/results/)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    train_images: int = 4000
    heldout_images: int = 150
    free_images: int = 1000
    questions_per_image: int = 3
    bench_per_image: int = 3
    caption_free_ratio: float = 0.3
    """Share of caption-free samples in arm c's mix."""
    depth: int = 4
    codebook_size: int = 256
    codebook_images: int = 300
    """Images the codebooks are trained on (a seeded subset of the train images)."""
    llm_hidden: int = 128
    llm_layers: int = 2
    head_width: int = 128
    pretrain_steps: int = 60
    sft_steps: int = 1500
    micro_batch: int = 4
    max_len: int = 512
    pretrain_lr: float = 1e-3
    sft_lr: float = 2e-3
    corpus_seed: int = 0

    def __post_init__(self):
        bad = [a for a in self.arms if a not in ARMS]
        if bad:
            raise ValueError(f"unknown arms {bad}; choose from {sorted(ARMS)}")
        if not self.seeds:
            raise ValueError("need at least one seed")


SMOKE = dict(
    train_images=12,
    heldout_images=4,
    free_images=4,
    depth=2,
    codebook_size=16,
    codebook_images=12,
    llm_hidden=32,
    head_width=32,
    pretrain_steps=2,
    sft_steps=2,
    micro_batch=2,
)


# ----------------------------------------------------------------------------- steps
def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _run_cli(argv: list[str], what: str) -> None:
    """A console script in a child process (Ray's state stays out of this one)."""
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{what} failed ({r.returncode}): {' '.join(argv)}\n{r.stderr[-3000:]}")
    print(f"  {what}: {time.perf_counter() - t0:.0f} s", flush=True)


def _run_main(main, argv: list[str], what: str) -> None:
    """``asvr-train`` / ``asvr-eval`` in this process: ~10 s of imports saved per call, 60 calls a run."""
    t0 = time.perf_counter()
    rc = main(argv)
    if rc:
        raise RuntimeError(f"{what} failed ({rc}): {' '.join(argv)}")
    print(f"  {what}: {time.perf_counter() - t0:.0f} s", flush=True)


def prepare(cfg: ExperimentConfig) -> dict[str, Path]:
    """Corpus, the two tokenizers, their shards and the LLM (each skipped when already there)."""
    from asvr.demo.vqa_corpus import make_vqa_corpus
    from asvr.demo.tiny_llm import conversation_texts, make_tiny_llm

    out = Path(cfg.out)
    p = {
        "corpus": out / "corpus",
        "semantic": out / "tok_semantic",
        "appearance": out / "tok_appearance",
        "llm": out / "llm",
        "cache": out / "cache",
    }
    if not (p["corpus"] / "corpus.json").exists():
        make_vqa_corpus(
            p["corpus"],
            cfg.train_images,
            cfg.heldout_images,
            cfg.free_images,
            cfg.corpus_seed,
            cfg.questions_per_image,
            cfg.bench_per_image,
            progress=False,
        )
        print("  corpus written", flush=True)
    for kind, encoder in (("semantic", "efficientnet_lite0"), ("appearance", "pixels")):
        if not (p[kind] / "tokenizer.json").exists():
            _run_cli(
                [
                    _bin("asvr-tokenizer"),
                    "train",
                    "--images",
                    str(p["corpus"] / "images" / "train"),
                    "--encoder",
                    encoder,
                    "--depth",
                    str(cfg.depth),
                    "--codebook-size",
                    str(cfg.codebook_size),
                    "--max-images",
                    str(cfg.codebook_images),
                    "--seed",
                    str(cfg.corpus_seed),
                    "--out",
                    str(p[kind]),
                ],
                f"{kind} tokenizer",
            )
        codes = out / f"codes_{kind}"
        if not (codes / "manifest.json").exists():
            _run_cli(
                [
                    _bin("asvr-pipeline"),
                    "tokenize",
                    str(p["corpus"] / "images"),
                    "--tokenizer",
                    str(p[kind]),
                    "--out",
                    str(codes),
                ],
                f"{kind} shards",
            )
        p[f"codes_{kind}"] = codes
    if not (p["llm"] / "config.json").exists():
        texts = conversation_texts([p["corpus"] / "llava_pretrain.json", p["corpus"] / "llava_sft.json"])
        make_tiny_llm(
            p["llm"],
            texts=texts,
            hidden_size=cfg.llm_hidden,
            layers=cfg.llm_layers,
            intermediate_size=2 * cfg.llm_hidden,
            seed=cfg.corpus_seed,
        )
    return p


def train_args(
    cfg: ExperimentConfig, p: dict[str, Path], arm: Arm, stage: str, seed: int, run: Path, init: Path | None
) -> list[str]:
    corpus = p["corpus"]
    data = corpus / ("llava_pretrain.json" if stage == "pretrain" else "llava_sft.json")
    weight = arm.pretrain_weight if stage == "pretrain" else arm.sft_weight
    argv = [
        "--model",
        str(p["llm"]),
        "--tokenizer",
        str(p[arm.targets]),
        "--codes",
        str(p[f"codes_{arm.targets}"]),
        "--data",
        str(data),
        "--images",
        str(corpus / "images"),
        "--vision-input",
        "features",
        "--cache-dir",
        str(p["cache"]),
        "--stage",
        stage,
        "--visual-loss-weight",
        str(weight),
        "--seed",
        str(seed),
        "--max-steps",
        str(cfg.pretrain_steps if stage == "pretrain" else cfg.sft_steps),
        "--micro-batch-size",
        str(cfg.micro_batch),
        "--max-len",
        str(cfg.max_len),
        "--lr",
        str(cfg.pretrain_lr if stage == "pretrain" else cfg.sft_lr),
        "--head-width",
        str(cfg.head_width),
        "--head-proj-hidden",
        str(cfg.head_width),
        "--head-layers",
        "1",
        "--head-dim",
        "32",
        "--overwrite",
        "--output-dir",
        str(run),
        "--quiet",
    ]  # a crashed run starts again
    if arm.targets != "semantic":  # the LLM still sees the semantic tokenizer's encoder
        argv += ["--vision-tower", str(p["semantic"])]
    if arm.caption_free:
        argv += ["--caption-free-ratio", str(cfg.caption_free_ratio)]
    if init is not None:
        argv += ["--init-from", str(init)]
    return argv


BENCHES = {
    "seen": ("vqa_bench_seen.jsonl", "new scenes: questions about objects whose colour-shape pair training showed"),
    "unseen": ("vqa_bench.jsonl", "the unseen colour-shape pair of each held-out image (compositional)"),
}
"""The two held-out benches (same images, ``asvr.demo.vqa_corpus``): name -> (file, what it measures)."""


def _bench_metrics(m: dict) -> dict:
    return {
        "acc": m["acc"],
        "chance": m["chance"],
        "unparsed": m["unparsed"],
        "by_category": {k: v["acc"] for k, v in m["by_category"].items()},
        "by_kind": {k: v["acc"] for k, v in m["by_kind"].items()},
        "chance_by_category": {k: v["chance"] for k, v in m["by_category"].items()},
        "chance_by_kind": {k: v["chance"] for k, v in m["by_kind"].items()},
    }


def evaluate(p: dict[str, Path], run: Path, codes: Path) -> dict:
    """Both held-out benches (accuracy per category / form with chance) and per-depth visual accuracy."""
    corpus = p["corpus"]
    from asvr.eval.cli import main

    _run_main(
        main,
        [
            "bench",
            "--model",
            str(run),
            "--bench",
            *[str(corpus / f) for f, _ in BENCHES.values()],
            "--images",
            str(corpus / "images"),
            "--max-new-tokens",
            "4",
            "--batch-size",
            "32",
            "--out",
            str(run / "bench"),
            "--quiet",
        ],
        "bench",
    )
    reports = {Path(r["file"]).name: r for r in json.loads((run / "bench" / "report.json").read_text())["benches"]}
    _run_main(
        main,
        [
            "loss",
            "--model",
            str(run),
            "--codes",
            str(codes),
            "--data",
            str(corpus / "heldout_sft.json"),
            "--images",
            str(corpus / "images"),
            "--no-greedy",
            "--out",
            str(run / "loss"),
            "--quiet",
        ],
        "loss",
    )
    loss = json.loads((run / "loss" / "report.json").read_text())["results"]
    return {
        "benches": {name: _bench_metrics(reports[f]["metrics"]) for name, (f, _) in BENCHES.items()},
        "text_loss": loss["text"]["loss"],
        "visual_acc_per_depth": [d["acc1"] for d in loss["visual"]["per_depth"]],
    }


def check_work_folder(cfg: ExperimentConfig) -> None:
    """A work folder holds one configuration (seeds and arms may grow): resuming never mixes sizes."""
    out = Path(cfg.out)
    mine = {k: v for k, v in asdict(cfg).items() if k not in ("out", "results", "seeds", "arms")}
    path = out / "experiment.json"
    if path.exists():
        theirs = json.loads(path.read_text())
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise ValueError(f"{out} holds a run with other settings ({', '.join(diff)}); use another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(mine, indent=1) + "\n")


def run_all(cfg: ExperimentConfig) -> list[dict]:
    from asvr.train.cli import main as train_main

    out = Path(cfg.out)
    check_work_folder(cfg)
    p = prepare(cfg)
    records_path = out / "runs.jsonl"
    done = {}
    if records_path.exists():  # resumable: finished runs are not repeated
        for line in records_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["arm"], r["seed"])] = r
    for seed in cfg.seeds:
        for key in cfg.arms:
            arm = ARMS[key]
            if (key, seed) in done:
                continue
            t0 = time.perf_counter()
            print(f"== arm {key} ({arm.name}), seed {seed}", flush=True)
            pre = out / "runs" / f"pretrain-{arm.pretrain_id()}-s{seed}"
            if not (pre / "final").exists():
                _run_main(train_main, train_args(cfg, p, arm, "pretrain", seed, pre, None), "pretrain")
            sft = out / "runs" / f"sft-{key}-s{seed}"
            if not (sft / "final").exists():
                _run_main(train_main, train_args(cfg, p, arm, "sft", seed, sft, pre), "sft")
            rec = {
                "arm": key,
                "seed": seed,
                **evaluate(p, sft, p[f"codes_{arm.targets}"]),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            with open(records_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            done[(key, seed)] = rec
            print(
                "   held-out accuracy "
                + ", ".join(
                    f"{name} {100 * m['acc']:.1f}% (chance {100 * m['chance']:.1f}%)"
                    for name, m in rec["benches"].items()
                ),
                flush=True,
            )
    return [done[(k, s)] for k in cfg.arms for s in cfg.seeds]


# ----------------------------------------------------------------------------- summary
def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def _bench_summary(cfg: ExperimentConfig, records: list[dict]) -> dict:
    """One bench: mean +- std per arm of every metric; each arm's difference to the baseline (a)
    with its standard error and the seeds per arm that would put it at 2 standard errors."""
    arms = {}
    for key in cfg.arms:
        rs = [r for r in records if r["arm"] == key]
        metrics = {"overall": [r["acc"] for r in rs]}
        for group in ("by_category", "by_kind"):
            for k in rs[0][group]:
                metrics[k] = [r[group][k] for r in rs]
        arms[key] = {k: mean_std(v) for k, v in metrics.items()}
    chance = {"overall": records[0]["chance"], **records[0]["chance_by_category"], **records[0]["chance_by_kind"]}
    contrasts = {}
    if "a" in arms:
        base = [r["acc"] for r in records if r["arm"] == "a"]
        for key in cfg.arms:
            if key == "a":
                continue
            xs = [r["acc"] for r in records if r["arm"] == key]
            (ma, sa), (mk, sk) = mean_std(base), mean_std(xs)
            diff = mk - ma
            se = math.sqrt(sa**2 / len(base) + sk**2 / len(xs))
            pooled = (sa**2 + sk**2) / 2
            need = math.ceil(8 * pooled / diff**2) if diff else None
            contrasts[key] = {"diff": diff, "se": se, "resolved": abs(diff) > 2 * se, "seeds_for_2se": need}
    return {"chance": chance, "acc": arms, "vs_baseline": contrasts}


def summarize(cfg: ExperimentConfig, records: list[dict]) -> dict:
    """Per bench (``BENCHES``): accuracies mean +- std and contrasts to the baseline; per arm:
    visual-token accuracy per depth and run time."""
    arms = {}
    for key in cfg.arms:
        rs = [r for r in records if r["arm"] == key]
        depth = [
            mean_std([r["visual_acc_per_depth"][d] for r in rs]) for d in range(len(rs[0]["visual_acc_per_depth"]))
        ]
        arms[key] = {
            "name": ARMS[key].name,
            "n_seeds": len(rs),
            "visual_acc_per_depth": depth,
            "seconds": sum(r["seconds"] for r in rs),
        }
    benches = {
        name: _bench_summary(cfg, [{"arm": r["arm"], **r["benches"][name]} for r in records]) for name in BENCHES
    }
    return {"config": asdict(cfg), "arms": arms, "benches": benches}


def _pm(ms, scale: float = 100) -> str:
    return f"{scale * ms[0]:.1f} ± {scale * ms[1]:.1f}"


COLUMNS = ["overall", "colour", "shape", "count", "position", "size", "yes_no", "multiple_choice", "short"]


def summary_markdown(s: dict) -> str:
    cfg, arms = s["config"], s["arms"]
    lines = [
        "# ASVR effect, miniature (held-out accuracy %, mean ± std over seeds)",
        "",
        f"Seeds {cfg['seeds']}; {cfg['train_images']} train images x {cfg['questions_per_image']} questions, "
        f"{cfg['heldout_images']} held-out images x {cfg['bench_per_image']} questions per bench, "
        f"{cfg['free_images']} caption-free images; tiny Llama {cfg['llm_hidden']}-d x "
        f"{cfg['llm_layers']} layers; RVQ {cfg['depth']} x {cfg['codebook_size']}; pretrain "
        f"{cfg['pretrain_steps']} + SFT {cfg['sft_steps']} steps of {cfg['micro_batch']} packed rows "
        f"x {cfg['max_len']} tokens.",
    ]
    for name, b in s["benches"].items():
        cols = [c for c in COLUMNS if c in next(iter(b["acc"].values()))]
        lines += [
            "",
            f"## Bench `{name}`: {BENCHES[name][1]}",
            "",
            "| arm | " + " | ".join(cols) + " |",
            "|---|" + "---|" * len(cols),
            "| chance | " + " | ".join(f"{100 * b['chance'][c]:.1f}" for c in cols) + " |",
        ]
        for key, acc in b["acc"].items():
            lines.append(f"| {key}: {arms[key]['name']} | " + " | ".join(_pm(acc[c]) for c in cols) + " |")
        if b["vs_baseline"]:
            lines += [
                "",
                "Overall accuracy minus the baseline's (points), standard error, and the seeds per arm "
                "that would put the observed difference at 2 standard errors:",
                "",
                "| arm | difference | s.e. | resolved (> 2 s.e.) | seeds needed |",
                "|---|---|---|---|---|",
            ]
            for key, c in b["vs_baseline"].items():
                lines.append(
                    f"| {key} | {100 * c['diff']:+.1f} | {100 * c['se']:.1f} | "
                    f"{'yes' if c['resolved'] else 'no'} | {c['seeds_for_2se'] or '-'} |"
                )
    depth = len(next(iter(arms.values()))["visual_acc_per_depth"])
    lines += [
        "",
        "## Visual-token accuracy @1 per depth on the held-out images",
        "",
        "Teacher-forced; arm e predicts appearance codes, the others semantic codes; arm a never trains its head.",
        "",
        "| arm | " + " | ".join(f"depth {d}" for d in range(depth)) + " |",
        "|---|" + "---|" * depth,
    ]
    for key, a in arms.items():
        lines.append(f"| {key} | " + " | ".join(_pm(x) for x in a["visual_acc_per_depth"]) + " |")
    return "\n".join(lines) + "\n"


def plot(s: dict, path: Path) -> None:
    """One bar panel per bench (accuracy per metric and arm, chance dashed) and the per-depth
    visual accuracy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    arms = s["arms"]
    fig = Figure(figsize=(16, 4.2))
    FigureCanvasAgg(fig)
    n = len(s["benches"])
    for bi, (name, b) in enumerate(s["benches"].items()):
        ax = fig.add_subplot(1, 2 * n + 1, (2 * bi + 1, 2 * bi + 2))
        cols = [c for c in COLUMNS if c in next(iter(b["acc"].values()))]
        width = 0.8 / len(b["acc"])
        for i, (key, acc) in enumerate(b["acc"].items()):
            xs = [j + (i - (len(b["acc"]) - 1) / 2) * width for j in range(len(cols))]
            ax.bar(
                xs,
                [100 * acc[c][0] for c in cols],
                width,
                yerr=[100 * acc[c][1] for c in cols],
                label=f"{key}: {arms[key]['name']}",
                capsize=2,
            )
        for j, c in enumerate(cols):
            ax.hlines(
                100 * b["chance"][c],
                j - 0.45,
                j + 0.45,
                colors="k",
                linestyles="dashed",
                label="chance" if j == 0 else None,
            )
        ax.set_xticks(range(len(cols)), [c.replace("multiple_choice", "multi-choice") for c in cols], rotation=20)
        ax.set_title(f"bench {name}", fontsize=9)
        ax.set_ylabel("held-out accuracy % (mean ± std over seeds)")
        if bi == 0:
            ax.legend(fontsize=7, ncol=2)
    ax2 = fig.add_subplot(1, 2 * n + 1, 2 * n + 1)
    for key, a in arms.items():
        d = a["visual_acc_per_depth"]
        ax2.errorbar(range(len(d)), [100 * x[0] for x in d], yerr=[100 * x[1] for x in d], marker="o", label=key)
    ax2.set_xlabel("RVQ depth")
    ax2.set_ylabel("visual-token acc@1 %")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def write_results(cfg: ExperimentConfig, records: list[dict], wall: float) -> dict:
    from asvr.eval.report import write_atomic, write_json

    s = summarize(cfg, records)
    s["wall_seconds"] = round(wall, 1)
    res = Path(cfg.results)
    write_json(res / "results.json", {**s, "runs": records})
    write_atomic(res / "summary.md", summary_markdown(s) + f"\nWall time {wall / 60:.1f} min.\n")
    plot(s, res / "asvr_effect.png")
    return s


SIZE_FLAGS = (
    "train_images",
    "heldout_images",
    "free_images",
    "pretrain_steps",
    "sft_steps",
    "llm_hidden",
    "llm_layers",
    "micro_batch",
    "codebook_size",
)
"""``ExperimentConfig`` sizes settable from the command line (``--train-images`` ...)."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.asvr_effect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, help="work folder (rerun the same command to resume)")
    ap.add_argument("--results", default="bench/results/asvr_effect", help="results folder (default %(default)s)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--smoke", action="store_true", help="toy sizes, 2 steps per stage (a test of the chain)")
    for f in SIZE_FLAGS:
        ap.add_argument("--" + f.replace("_", "-"), type=int)
    a = ap.parse_args(argv)
    sizes = {
        **(SMOKE if a.smoke else {}),
        **{f: getattr(a, f) for f in SIZE_FLAGS if getattr(a, f) is not None},
    }
    try:
        cfg = ExperimentConfig(out=a.out, results=a.results, seeds=a.seeds, arms=a.arms, **sizes)
    except ValueError as e:
        print(f"asvr_effect: error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    t0 = time.perf_counter()
    try:
        records = run_all(cfg)
    except (RuntimeError, ValueError) as e:
        print(f"asvr_effect: error: {e}", file=sys.stderr)
        return 1
    s = write_results(cfg, records, time.perf_counter() - t0)
    print(summary_markdown(s))
    print(f"results in {cfg.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
