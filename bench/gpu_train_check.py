"""``asvr-train`` through its CLI on one GPU, as users run it (issue 12).

Builds a work folder (everything random, from configs; nothing downloaded):

* the ~1.3B Llama of bench/train_mfu.py (hidden 2048, 24 layers, 16 heads,
  intermediate 5504, vocab 32000), saved in bf16, with a byte-level BPE;
* a SigLIP-so400m-shaped tokenizer artifact: 27x27 grid, 1152-d, 8 x 16384
  codebooks (a 2-layer tower: the codes input never runs the encoder);
* code shards of random codes and LLaVA SFT conversations of one image and a
  caption long enough that one sample fills a 2048-token row (the bare loop's
  sequences: 1 + 729 image + text);

then runs, each a subprocess with a timeout, results appended to
``OUT/gpu_train_check.json`` as they come:

1. ``asvr-train --stage sft --vision-input codes`` bf16, SDPA, in each of
   ``CLI_CONFIGS`` (issue 26): ``--zero auto`` (the one-GPU fast path), with
   ``--compile``, with ``--no-prefetch``, ZeRO-1, ZeRO-2 (what every run used
   before), ZeRO-2 + ``--gradient-checkpointing``, ZeRO-3: step time, tokens/s,
   MFU (train_mfu.py's FLOP count scaled by the real tokens), peak memory and
   loss, from ``metrics.jsonl`` (steps after the first ``--log-every`` window);
2. ``bench/train_mfu.py``'s bare loops (no DeepSpeed) on the same shapes: bf16
   parameters (no master copy) and the fair one (fp32 masters + autocast, fused
   AdamW, clipping); ``--results FILE`` writes one JSON object per CLI
   configuration (``device``, ``cli_tokens_per_s``, ``bare_fair_tokens_per_s``,
   ``cli_over_bare_fair``, ``mfu_cli``, peak memory, ...);
3. kill and ``--resume auto`` on a smaller model (bf16, the fast path): a run killed
   (SIGKILL) two steps after its checkpoint, resumed, against an uninterrupted
   run: the loss difference per step, before the kill (run-to-run noise of
   the GPU) and after the resume.

    python bench/gpu_train_check.py --tiny --work /tmp/gtc     # CPU end to end (tiny configs, ~3 min on 2 cores)
    python bench/gpu_train_check.py --work /tmp/gtc            # one H100/H200, ~5 min
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OUT = Path(os.environ.get("OUT", "/tmp"))
RESULTS: dict = {}
LOG: Path | None = None


def save(**kw) -> None:
    RESULTS.update(kw)
    (OUT / "gpu_train_check.json").write_text(json.dumps(RESULTS, indent=1))


def log(msg: str) -> None:
    print(msg, flush=True)
    if LOG is not None:
        with open(LOG, "a") as f:
            f.write(msg + "\n")


WORDS = [f"{a}{b}{c}" for a in "bcdfghklmnprstvz" for b in "aeiou" for c in "nrstlm"]  # 480 pseudo-words


def build_work(work: Path, s, small, n_samples: int, device) -> dict:
    """LLM folders (big: the bench config; small: the resume check), tokenizer artifact, shards, data."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from asvr.core.shards import ShardMeta, rows_to_table, write_parquet_shard
    from asvr.tokenizer.artifact import TokenizerSpec, save_artifact
    from asvr.tokenizer.encoders.base import default_encoder_spec
    from asvr.train.config import tiny_llm_config
    from asvr.demo.tiny_llm import train_bpe_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    texts = [" ".join(rng.choice(WORDS, 200)) for _ in range(200)]
    bpe = train_bpe_tokenizer(texts, vocab_size=2000)
    per_word = len(bpe(" ".join(WORDS[:200]), add_special_tokens=False)["input_ids"]) / 200
    llms = {}
    for name, dims in (("llm", s), ("llm_small", small)):
        folder = work / name
        cfg = tiny_llm_config(
            "llama",
            vocab_size=max(dims.vocab, len(bpe)),
            hidden_size=dims.hidden,
            layers=dims.layers,
            heads=dims.heads,
            kv_heads=dims.heads,
            intermediate_size=dims.intermediate,
            max_positions=max(4096, dims.seq),
        )
        mt = cfg.pop("model_type")
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **cfg), dtype=torch.bfloat16)
        model.save_pretrained(folder)
        bpe.save_pretrained(folder)
        llms[name] = folder
        del model
    # tokenizer artifact: a SigLIP-shaped tower on the bench's grid and width
    side = s.grid[0]
    vcfg = SiglipVisionConfig(
        hidden_size=s.code_dim,
        intermediate_size=4 * s.code_dim,
        num_hidden_layers=2,
        num_attention_heads=max(1, s.code_dim // 72),
        patch_size=14,
        image_size=14 * side,
    )
    with torch.device(device):
        SiglipVisionModel(vcfg).save_pretrained(work / "siglip")
    spec = TokenizerSpec(
        encoder=default_encoder_spec("siglip", str(work / "siglip")),
        preprocess="square",
        grid=s.grid,
        dim=s.code_dim,
        depth=s.depth,
        codebook_size=s.codebook_size,
        shared_codebook=False,
    )
    g = torch.Generator().manual_seed(0)
    spec = save_artifact(work / "tok", spec, torch.randn(s.depth, s.codebook_size, s.code_dim, generator=g) * 0.05)
    # shards of random codes
    keys = [f"img{i:05d}.jpg" for i in range(n_samples)]
    codes = rng.integers(0, s.codebook_size, (n_samples, *s.grid, s.depth)).astype(np.uint16)
    meta = ShardMeta.from_spec(spec)
    (work / "codes").mkdir(exist_ok=True)
    table = rows_to_table(
        meta, keys, codes, ["0" * 64] * n_samples, [384] * n_samples, [384] * n_samples, [None] * n_samples
    )
    write_parquet_shard(work / "codes" / "part-00000.parquet", table)
    # one image + a caption that fills the row (<= seq tokens, ~1% padding)
    from asvr.train.data.templates import encode_conversation, get_template, validate_turns

    tpl = get_template("vicuna_v1")

    def conv(words):
        return [{"from": "human", "value": "<image>\nDescribe the picture."}, {"from": "gpt", "value": " ".join(words)}]

    def length(words):
        return len(encode_conversation(tpl, validate_turns(conv(words), True), bpe, s.image_tokens))

    base = length(list(rng.choice(WORDS, 10)))
    n_words = max(1, int((s.seq * 0.99 - base) / per_word) + 10)
    data = []
    for i, k in enumerate(keys):
        words = list(rng.choice(WORDS, n_words))
        while len(words) > 1 and length(words) > s.seq:
            words = words[: len(words) - max(1, (length(words) - s.seq) // 2)]
        data.append({"id": f"s{i}", "image": k, "conversations": conv(words)})
    (work / "sft.json").write_text(json.dumps(data))
    log(
        f"built work folder in {time.perf_counter() - t0:.1f}s: {n_samples} samples, {n_words} caption words "
        f"(~{per_word:.2f} tokens/word), tokenizer fingerprint {spec.fingerprint[:12]}"
    )
    return {
        "llm": llms["llm"],
        "llm_small": llms["llm_small"],
        "tok": work / "tok",
        "codes": work / "codes",
        "data": work / "sft.json",
    }


def cli_args(w: dict, llm: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model",
        str(llm),
        "--tokenizer",
        str(w["tok"]),
        "--codes",
        str(w["codes"]),
        "--data",
        str(w["data"]),
        "--output-dir",
        str(out),
        "--stage",
        "sft",
        "--vision-input",
        "codes",
        "--attn-implementation",
        "sdpa",
        "--no-export",
        "--lr",
        "1e-5",
        "--seed",
        "0",
        *extra,
    ]


def run_cli(args: list[str], timeout: float, name: str) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "asvr.train.cli", *args]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout[-3000:] + p.stderr[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, out = 124, f"timeout after {timeout}s\n{(e.stdout or b'')[-2000:]!r}{(e.stderr or b'')[-2000:]!r}"
    dt = time.perf_counter() - t0
    log(f"--- {name}: rc {rc} in {dt:.1f}s")
    if rc != 0:
        log(out)
    return rc, dt, out


def summarise(run_dir: Path, skip: int) -> dict:
    from asvr.train.loop.metrics import read_metrics

    rows = read_metrics(run_dir)
    timed = rows[skip:] or rows
    if not rows:
        return {"error": "no metrics"}
    return {
        "steps": len(rows),
        "step_time_s": float(np.mean([r["step_time_s"] for r in timed])),
        "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in timed])),
        "tokens_per_step": float(np.mean([r["tokens_per_s"] * r["step_time_s"] for r in timed])),
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "loss_text_last": rows[-1]["loss_text"],
        "loss_visual_last": rows[-1]["loss_visual"],
        "gpu_mem_peak_gib": rows[-1].get("gpu_mem_peak_gib"),
    }


def resume_check(w: dict, work: Path, steps: int, save_at: int, timeout: float, extra: list[str]) -> dict:
    from asvr.train.loop.metrics import read_metrics

    common = [
        "--max-steps",
        str(steps),
        "--save-every",
        str(save_at),
        "--log-every",
        "1",
        "--keep-checkpoints",
        "1",
        "--zero",
        "auto",
        "--quiet",
        *extra,
    ]
    straight, killed = work / "resume_straight", work / "resume_killed"
    for d in (straight, killed):
        shutil.rmtree(d, ignore_errors=True)
    rc, _, _ = run_cli(cli_args(w, w["llm_small"], straight, *common), timeout, "resume: uninterrupted")
    if rc:
        return {"error": "uninterrupted run failed"}
    cmd = [sys.executable, "-m", "asvr.train.cli", *cli_args(w, w["llm_small"], killed, *common)]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.perf_counter()
    kill_at = save_at + 2
    while time.perf_counter() - t0 < timeout and p.poll() is None:
        if len(read_metrics(killed)) >= kill_at and (killed / "checkpoints").exists():
            os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait()
    got = len(read_metrics(killed))
    log(f"--- resume: killed at {got} logged steps (checkpoint at {save_at}), rc {p.returncode}")
    rc, _, _ = run_cli(
        cli_args(w, w["llm_small"], killed, *common, "--resume", "auto"), timeout, "resume: --resume auto"
    )
    if rc:
        return {"error": "resumed run failed"}
    a, b = read_metrics(straight), read_metrics(killed)
    la = np.array([r["loss"] for r in a])
    lb = np.array([r["loss"] for r in b])
    res = {
        "steps": steps,
        "checkpoint_at": save_at,
        "killed_after_steps": got,
        "resumed_steps": [r["step"] for r in b] == list(range(1, steps + 1)),
        "loss_uninterrupted": la.tolist(),
        "loss_resumed": lb.tolist(),
    }
    if len(la) == len(lb) == steps:
        res["max_abs_diff_before_kill"] = float(np.abs(la[:save_at] - lb[:save_at]).max())
        res["max_abs_diff_after_resume"] = float(np.abs(la[save_at:] - lb[save_at:]).max())
        res["max_rel_diff_after_resume"] = float((np.abs(la[save_at:] - lb[save_at:]) / np.abs(la[save_at:])).max())
    return res


# the CLI configurations timed (issue 26): the fast path (auto = ZeRO 0 on one GPU), with torch.compile,
# the DeepSpeed stages as they ran before (2, 2 + recomputation, 3) and stage 1
CLI_CONFIGS = {
    "auto": ["--zero", "auto"],
    "auto_compile": ["--zero", "auto", "--compile"],
    "auto_no_prefetch": ["--zero", "auto", "--no-prefetch"],
    "zero1": ["--zero", "1"],
    "zero2": ["--zero", "2"],
    "zero2_gc": ["--zero", "2", "--gradient-checkpointing"],
    "zero3": ["--zero", "3"],
}


def headline(device: str, cli: dict, loops: dict, peak: float | None) -> list[dict]:
    """One object per CLI configuration: its tokens/s (real tokens, from metrics.jsonl) against
    the fair bare loop's and the bf16-parameter loop's (every token of their rows is real)."""
    fair = loops.get("ASVR fair (fp32 master)", {})
    bf16 = loops.get("ASVR (visual head on)", {})
    rows = []
    for name, r in cli.items():
        if "tokens_per_s" not in r or "tokens_per_s" not in fair:
            continue
        row = {
            "config": name,
            "device": device,
            "cli_tokens_per_s": r["tokens_per_s"],
            "bare_fair_tokens_per_s": fair["tokens_per_s"],
            "bare_bf16_tokens_per_s": bf16.get("tokens_per_s"),
            "cli_over_bare_fair": r["tokens_per_s"] / fair["tokens_per_s"],
            "cli_over_bare_bf16": r["tokens_per_s"] / bf16["tokens_per_s"] if bf16 else None,
            "mfu_cli": r.get("mfu"),
            "mfu_bare_fair": fair.get("mfu"),
            "cli_step_time_s": r["step_time_s"],
            "cli_gpu_mem_peak_gib": r.get("gpu_mem_peak_gib"),
            "bare_fair_gpu_mem_peak_gib": fair.get("gpu_mem_peak_gib"),
            "peak_tflops": peak,
        }
        rows.append(row)
    return rows


def main(argv=None) -> int:
    global OUT, LOG
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny configs on CPU")
    p.add_argument("--work", default="/tmp/asvr_gpu_train_check")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--steps", type=int, help="steps per throughput run (default 12; tiny 4)")
    p.add_argument("--log-every", type=int, help="metrics window (default 4; tiny 2); the first is warm-up")
    p.add_argument("--only", nargs="*", default=None, help="subset of: cli bare resume")
    p.add_argument("--timeout", type=float, default=240, help="seconds per CLI run")
    p.add_argument("--configs", nargs="*", help=f"subset of the CLI configurations: {' '.join(CLI_CONFIGS)}")
    p.add_argument("--results", help="write the headline rows (one JSON object per CLI configuration) here")
    a = p.parse_args(argv)
    OUT = Path(a.out)
    OUT.mkdir(parents=True, exist_ok=True)
    LOG = OUT / "gpu_train_check.log"
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import train_mfu

    cuda = torch.cuda.is_available() and not a.tiny
    device = torch.device("cuda" if cuda else "cpu")
    s = train_mfu.Setup.tiny() if a.tiny else train_mfu.Setup()
    if a.tiny:
        s.seq = 256  # the vicuna template alone takes ~150 tokens of the tiny BPE
    small = s if a.tiny else train_mfu.Setup(hidden=512, layers=4, heads=8, intermediate=1408)
    steps = a.steps or (4 if a.tiny else 12)
    window = a.log_every or (2 if a.tiny else 4)
    only = set(a.only or ["cli", "bare", "resume"])
    save(
        device=torch.cuda.get_device_name() if cuda else "cpu",
        torch=torch.__version__,
        batch=s.batch,
        seq=s.seq,
        steps=steps,
        log_every=window,
    )
    try:
        import deepspeed

        save(deepspeed=deepspeed.__version__)
    except ImportError:
        pass
    work = Path(a.work)
    w = build_work(work, s, small, n_samples=max(64, s.batch * (steps + 1)), device=device)
    head = (
        []
        if not a.tiny
        else [
            "--head-width",
            str(s.head.width),
            "--head-proj-hidden",
            str(s.head.proj_hidden),
            "--head-dim",
            str(s.head.head_dim),
        ]
    )
    mfu_flops = None
    if "cli" in only or "bare" in only:
        # FLOPs of one full step (train_mfu's count) for the MFU of the CLI runs
        from asvr.train.config import ModelConfig, VisionSpec
        from asvr.train.model.lvlm import build_model

        vision = VisionSpec(dim=s.code_dim, grid=s.grid, depth=s.depth, codebook_size=s.codebook_size)
        with torch.device("meta"):
            m = build_model(
                ModelConfig(llm=s.llm_config(), vision_input="codes", head=s.head, vision=vision),
                codebooks=torch.empty(s.depth, s.codebook_size, s.code_dim),
            )
        n_label = s.batch * (s.seq - 1 - s.image_tokens)
        mfu_flops = train_mfu.llm_flops_per_step(s, m.llm, n_label)[0] + train_mfu.asvr_extra_flops_per_step(s)
        save(model_tflop_per_full_step=mfu_flops / 1e12)
        del m
    peak = train_mfu.peak_tflops(device, None)
    if "cli" in only:
        runs = {}
        for name, flags in CLI_CONFIGS.items():
            if a.configs and name not in a.configs:
                continue
            out = work / "runs" / name
            shutil.rmtree(out, ignore_errors=True)
            extra = [
                *flags,
                "--max-steps",
                str(steps),
                "--micro-batch-size",
                str(s.batch),
                "--max-len",
                str(s.seq),
                "--log-every",
                str(window),
                "--no-final-checkpoint",
                "--quiet",
                *head,
            ]
            rc, wall, _ = run_cli(cli_args(w, w["llm"], out, *extra), a.timeout, name)
            res = summarise(out, window) if rc == 0 else {"error": f"rc {rc}"}
            res["wall_s"] = wall
            if rc == 0 and mfu_flops:
                flops = mfu_flops * res["tokens_per_step"] / (s.batch * s.seq)
                res["model_tflops"] = flops / res["step_time_s"] / 1e12
                res["mfu"] = res["model_tflops"] / peak if peak else None
            runs[name] = res
            log(f"{name}: {json.dumps(res)}")
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            save(cli=runs)
    if "bare" in only:
        bare_json = OUT / "train_mfu.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve().parent / "train_mfu.py"),
            "--steps",
            str(steps - window),
            "--warmup",
            str(window),
            "--json",
            str(bare_json),
        ] + (["--tiny", "--batch", str(s.batch), "--seq", str(s.seq)] if a.tiny else [])  # the CLI's shapes
        t0 = time.perf_counter()
        try:
            pr = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            text, rc = pr.stdout + pr.stderr[-2000:], pr.returncode
        except subprocess.TimeoutExpired:
            text, rc = "timeout", 124
        log(f"--- bare loop (train_mfu.py): rc {rc} in {time.perf_counter() - t0:.1f}s\n{text}")
        bare = {"rc": rc}
        for line in text.splitlines():
            if line.startswith("ASVR (visual head on)") or line.startswith("HF LLM only"):
                parts = line.split()
                key = "asvr" if line.startswith("ASVR") else "hf_llm_only"
                nums = parts[-8:]
                bare[key] = {
                    "step_time_s": float(nums[0]),
                    "tokens_per_s": float(nums[1]),
                    "model_tflops": float(nums[3]),
                    "mfu": nums[4],
                    "gpu_mem_peak_gib": nums[6],
                    "loss": float(nums[7]),
                }
            if line.startswith("visual head alone"):
                bare["visual_head_alone"] = line
        if rc == 0 and bare_json.is_file():
            bare["loops"] = json.loads(bare_json.read_text())["loops"]
        save(bare=bare)
        if "cli" in RESULTS and "loops" in bare:
            rows = headline(RESULTS["device"], RESULTS["cli"], bare["loops"], peak)
            save(headline=rows)
            if a.results:
                Path(a.results).write_text(json.dumps(rows, indent=1) + "\n")
            for r in rows:
                log(
                    f"{r['config']}: CLI {r['cli_tokens_per_s']:.0f} tokens/s, fair bare {r['bare_fair_tokens_per_s']:.0f}"
                    f" -> {r['cli_over_bare_fair']:.3f}; over the bf16-params loop {r['cli_over_bare_bf16']:.3f}"
                )
        if "cli" in RESULTS and "asvr" in bare:
            ratio = {
                n: (bare["asvr"]["step_time_s"] / r["step_time_s"])
                for n, r in RESULTS["cli"].items()
                if "step_time_s" in r
            }
            save(cli_over_bare_speed=ratio)
            log(f"CLI speed / bare loop speed (same shapes, step time): {json.dumps(ratio)}")
    if "resume" in only:
        res = resume_check(
            w,
            work,
            steps=10 if not a.tiny else 6,
            save_at=4 if not a.tiny else 2,
            timeout=a.timeout,
            extra=[
                "--micro-batch-size",
                "2",
                "--max-len",
                str(s.seq),
                "--head-width",
                "256" if not a.tiny else str(s.head.width),
                "--head-proj-hidden",
                "512" if not a.tiny else str(s.head.proj_hidden),
                "--head-dim",
                "64" if not a.tiny else str(s.head.head_dim),
            ],
        )
        save(resume=res)
        log(f"resume: {json.dumps({k: v for k, v in res.items() if not k.startswith('loss_')})}")
    log("summary: " + json.dumps(RESULTS)[:6000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
