"""Tokenize at GPU speed, exact (issue 27): the tokenizer end to end, and ``asvr-pipeline
tokenize`` in steady state against the in-process loop, in one run.

Set-up as bench/gpu_rvq_kernel.py: a SigLIP-so400m-sized random tower (26 of 27
layers; bf16 on a GPU) and 8 x 16384 x 1152 codebooks drawn from the residuals of
the features they quantize (so near ties look like a trained codebook's).

1. **kernel tiles**: the fused first pass alone, one depth, a few tile shapes per
   precision; the fastest becomes the plan's tiles (GPU only).
2. **tokenizer, per configuration** (``fused-bf16x3`` with 4 / 8 / 16 kept,
   ``fused-mixed``, ``fused-tf32x3``, the fp32 cascade, the reference's plain fp32
   quantizer): RVQ alone img/s; per depth the share of rows the first pass settles,
   the share the collect pass settles, rows sent to full float64; codes compared
   with a full float64 search on ``--check-images`` images (``codes_equal_float64``,
   true only when that check ran and agreed on every code) and with the fp32 cascade
   on every row; end to end (pixels on the device -> codes, ``--batches`` batches
   back to back through ``PixelEncoder``: one compiled tower on a GPU shared by all
   configurations, sequential and with the encoder/RVQ overlap of ``--chunks`` pieces).
3. **pipeline**: a corpus of distinct 1024x768 JPEGs and a tokenizer artifact of
   the same sizes; the in-process loop (decode on cores - 1 processes feeding one
   ``stages.Encoder``, img/s after a warm-up batch) and the CLI
   (``asvr-pipeline tokenize``) on ``--images`` and on ``--images // 4`` images
   (hard links of the same files): steady state = the extra images over the extra
   seconds, so Ray's start, the tower's load and compile and the first batches
   cancel out; start-up = the small run's seconds minus its images at the steady
   rate.  GPU busy share: ``nvidia-smi`` utilisation sampled every 200 ms during
   the large CLI run and the in-process loop (share of samples > 0, mean while busy).

Results: ``OUT/tokenize_speed.json``: a list, one object per configuration, each
with ``device``, ``configuration``, ``tokenizer_img_per_s`` (end to end, best of
sequential / overlapped), ``codes_equal_float64`` and
``pipeline_steady_over_inprocess`` (null for configurations the pipeline did not
run); ``OUT/tokenize_speed_detail.json``: everything measured.  Written as they come.

    python bench/tokenize_speed.py --tiny --out bench/results/tokenize_speed_cpu_tiny   # CPU, interpreter, ~3 min
    python bench/tokenize_speed.py --out $OUT        # one H100/H200: ~8-10 min, needs triton
        # (corpus 4096 JPEGs, batch 64; --images 8192 for a longer steady state if time allows;
        #  --skip-pipeline for the tokenizer alone, ~3 min)

On a device machine, run it from the repository root with the project's venv (torch
with CUDA, triton, transformers, ray, pillow): the tokenizer section needs no Ray.  With
the carried wheel pack of issues 12/13 instead: ``bench/gpu_check.sh tokenize`` (one call,
under 10 minutes; ``OUT`` comes back with both JSON files and the log).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

try:  # as bench.x (tests) or as python bench/x.py (the script's folder on sys.path)
    from bench._common import device_sync, median_time, run_cli, tokenize_cmd
except ModuleNotFoundError:
    from _common import device_sync, median_time, run_cli, tokenize_cmd

HERE = Path(__file__).resolve().parent
ROWS: list[dict] = []
DETAIL: dict = {}
OUT = Path(os.environ.get("OUT", "/tmp"))


def save() -> None:
    (OUT / "tokenize_speed.json").write_text(json.dumps(ROWS, indent=1) + "\n")
    (OUT / "tokenize_speed_detail.json").write_text(json.dumps(DETAIL, indent=1) + "\n")


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------ GPU busy share
@contextmanager
def gpu_busy(into: dict, key: str, cuda: bool):
    """nvidia-smi utilisation every 200 ms while the block runs -> ``into[key]``."""
    if not cuda:
        yield
        return
    sys.path.insert(0, str(HERE))
    from gpu_pipeline_ray import gpu_sampler

    samples: list = []
    stop = threading.Event()
    th = threading.Thread(target=gpu_sampler, args=(stop, samples), daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        busy = [x for x in samples if x > 0]
        into[key] = {
            "samples": len(samples),
            "busy_share": len(busy) / len(samples) if samples else None,
            "util_mean_while_busy": float(np.mean(busy)) if busy else None,
        }


# ------------------------------------------------------------------ 2. tokenizer
def tokenizer_section(a, torch, dev, cuda: bool) -> dict:
    from gpu_tokenizer import Tower, build_encoder, reference_rvq_fp32

    from asvr.tokenizer.rvq.quantizer import ResidualQuantizer
    from asvr.tokenizer.rvq import fused_triton as rt
    from asvr.tokenizer.encode_engine import EngineOptions, PixelEncoder
    from asvr.tokenizer.rvq.plan import FusedPlan

    sync = device_sync(cuda)

    def timeit(fn, iters=a.iters, warmup=1):
        return median_time(fn, iters, warmup, cuda)

    gen = torch.Generator().manual_seed(0)
    depth, k = (3, 96) if a.tiny else (8, 16384)
    torch.manual_seed(0)  # the tower's random weights: the same features every run
    with torch.device(dev):
        model, cfg, layer = build_encoder(small=a.tiny)
    dt = torch.bfloat16 if cuda else torch.float32
    tower = Tower(model.to(dev, dt), layer)
    pixs = [torch.randn(a.batch, 3, cfg.image_size, cfg.image_size, generator=gen).to(dev) for _ in range(a.batches)]
    with torch.no_grad():
        feats = tower(pixs[0].to(dt)).float()
    c = feats.shape[-1]
    rows = feats.shape[0] * feats.shape[1] * feats.shape[2]
    r = feats.reshape(-1, c).clone()
    g = torch.Generator().manual_seed(1)
    books = []
    for _ in range(depth):  # codes drawn without replacement from the residuals (+1% noise), one fp32 pass
        idx = torch.randperm(r.shape[0], generator=g)[:k] if r.shape[0] >= k else torch.randint(0, r.shape[0], (k,))
        book = r[idx.to(dev)] + 0.01 * r.std() * torch.randn(k, c, generator=g).to(dev)
        books.append(book)
        r = r - book[((book * book).sum(1)[None] - 2 * r @ book.T).argmin(1)]
    books = torch.stack(books).contiguous()
    q = ResidualQuantizer(books.clone()).to(dev)
    out: dict = {"rows_per_batch": rows, "dim": c, "depth": depth, "k": k, "batch": a.batch}
    log(f"features {tuple(feats.shape)}: {rows} rows/batch x {c}-d; codebooks {tuple(books.shape)}")

    # ---- 1. tiles (GPU): the first pass alone, one depth
    tiles: dict[str, tuple] = {}
    if cuda and rt.available():
        p0 = q._prepared(dev)[0]
        r0 = (feats.reshape(-1, c).double() - p0["mean"]).float()
        shapes = {
            "bf16x3": [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 256, 64, 8, 2)],
            "tf32x3": [(128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3)],
        }
        kern: dict = {}
        for prec, cand in shapes.items():
            ops_a, ops_b = rt.split_operand(r0, prec), rt.split_operand(p0["b64"].float(), prec)
            best = None
            for tl_ in cand:
                name = f"{prec}:{'x'.join(map(str, tl_))}"
                try:
                    t = timeit(lambda: rt.nearest(ops_a, ops_b, p0["n32"], prec, tiles=tl_), warmup=2)
                except Exception as e:  # out of shared memory / registers for this shape
                    kern[name] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
                    continue
                kern[name] = {"ms": t * 1e3, "tflops_2nkc": 2 * rows * k * c / t / 1e12}
                log(f"kernel {name}: {t * 1e3:.2f} ms/depth")
                if best is None or t < kern[best]["ms"] / 1e3:
                    best = name
            if best:
                tiles[prec] = tuple(int(v) for v in best.split(":")[1].split("x"))
        out["kernel_first_pass"] = kern
        out["tiles"] = {p: list(t) for p, t in tiles.items()}
    elif a.tiny:
        tiles = {"bf16x3": (16, 32, 16, 4, 2), "tf32x3": (16, 32, 16, 4, 2)}

    def plan(prec="bf16x3", **kw):
        deep = kw.get("deep_precision")
        return FusedPlan(prec, tiles=tiles.get(prec), deep_tiles=tiles.get(deep) if deep else None, **kw)

    configs: dict = {
        "reference-fp32 (not exact)": None,
        "float32 cascade": "float32",
    }
    if rt.available() and (cuda or rt.interpreting()):
        configs.update(
            {
                "fused-bf16x3 top8": plan(),
                "fused-bf16x3 top4": plan(top=4),
                "fused-bf16x3 top16": plan(top=16),
                "fused-mixed top8": plan(deep_precision="tf32x3"),
                "fused-tf32x3 top8": plan("tf32x3"),
            }
        )
    # float64 ground truth on a sample: a full float64 search (candidates >= K)
    n_chk = min(a.check_images, a.batch)
    with torch.no_grad():
        f64 = q.encode(feats[:n_chk], search_dtype="float32", candidates=k)
        cascade = q.encode(feats, search_dtype="float32", candidates=16, block_rows=65536)
    # one compiled tower for every configuration (a compile per PixelEncoder would cost ~22 s each)
    etower = tower
    if cuda and not a.no_compile:
        t0 = time.perf_counter()
        etower = torch.compile(tower, dynamic=False)
        with torch.no_grad(), torch.autocast("cuda", dtype=dt):
            etower(pixs[0])
        sync()
        out["compile_s"] = time.perf_counter() - t0
        out["encoder_compiled_img_per_s"] = a.batch / timeit(lambda: _no_grad(etower, pixs[0], dt, torch))
    out["encoder_eager_img_per_s"] = a.batch / timeit(lambda: _no_grad(tower, pixs[0], dt, torch))
    log(f"encoder: {json.dumps({k_: v for k_, v in out.items() if 'encoder' in k_ or 'compile' in k_})}")
    results: dict = {}
    for name, sd in configs.items():
        res: dict = {"configuration": name}
        with torch.no_grad():
            try:
                if sd is None:
                    codes = reference_rvq_fp32(feats, books)
                    t = timeit(lambda: reference_rvq_fp32(feats, books))
                else:
                    codes, st = q.encode(feats, search_dtype=sd, candidates=16, block_rows=65536, return_stats=True)
                    t = timeit(lambda: q.encode(feats, search_dtype=sd, candidates=16, block_rows=65536))
                    per = rows
                    res["first_pass_settled_per_depth"] = [round(1 - f / per, 4) for f in st.fallback_per_depth]
                    res["collect_settled_per_depth"] = [round(x / per, 4) for x in st.collected_per_depth]
                    res["full_float64_rows"] = st.full_rows
            except Exception as e:
                res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                log(f"{name}: failed {res['error']}")
                results[name] = res
                continue
        res["rvq_img_per_s"] = a.batch / t
        res["codes_equal_float64"] = bool((codes[:n_chk] == f64).all())
        res["codes_checked_images"] = n_chk
        res["codes_equal_fp32_cascade_all_rows"] = bool((codes == cascade).all())
        # ---- end to end: pixels on the device -> codes, batches back to back
        if sd is not None:
            for mode, chunks in (("sequential", 1), ("overlapped", a.chunks)):
                tok = _Tok(etower, q, dev, sd)
                eng = PixelEncoder(tok, dt if cuda else None, sd, EngineOptions(chunks=chunks))

                def run():
                    for px in pixs:
                        eng(px)

                res[f"e2e_img_per_s_{mode}"] = len(pixs) * a.batch / timeit(run, iters=max(1, a.iters // 2))
            res["tokenizer_img_per_s"] = max(res["e2e_img_per_s_sequential"], res["e2e_img_per_s_overlapped"])
        log(f"{name}: {json.dumps({k_: v for k_, v in res.items() if k_ != 'configuration'})}")
        results[name] = res
    out["configurations"] = results
    return out


def _no_grad(tower, px, dt, torch):
    with torch.no_grad(), torch.autocast(px.device.type, dtype=dt, enabled=px.device.type == "cuda"):
        return tower(px)


class _Tok:
    """The two things PixelEncoder uses of a SemanticTokenizer, over the bench's tower."""

    def __init__(self, tower, q, dev, sd):
        import torch

        self.encoder, self.quantizer, self.device, self._sd = tower, q, torch.device(dev), sd

    def quantize(self, feats, search_dtype=None):
        sd = self._sd if search_dtype is None else search_dtype
        return self.quantizer.encode(feats, search_dtype=sd, candidates=16, block_rows=65536)


# ------------------------------------------------------------------ 3. pipeline
def _decode(args):
    from asvr.pipeline.job.stages import decode_one

    path, cfg = args
    return decode_one(Path(path).read_bytes(), cfg)[0]


def in_process(tok_dir, images, a, sd, device, busy: dict) -> dict:
    import torch

    from asvr.pipeline.job.stages import Encoder, TokenizerBuilder
    from asvr.tokenizer.model import SemanticTokenizer

    cfg = SemanticTokenizer.load(tok_dir).preprocess_config()
    t0 = time.perf_counter()
    enc = Encoder(
        TokenizerBuilder(
            str(tok_dir),
            device,
            0,
            "bfloat16" if device == "cuda" else "float32",
            sd,
            compile=device == "cuda" and not a.no_compile,
            chunks=a.chunks if device == "cuda" else 1,
        )
    )
    load_s = time.perf_counter() - t0
    procs = max(1, (os.cpu_count() or 2) - 1)
    done, t_start = 0, None
    with gpu_busy(busy, "in_process_gpu", device == "cuda"):
        with mp.get_context("fork").Pool(procs) as pool:
            it = pool.imap(_decode, [(str(p), cfg) for p in images], chunksize=8)
            for s in range(0, len(images), a.pipe_batch):
                px = np.stack([next(it) for _ in images[s : s + a.pipe_batch]])
                n = len(px)
                enc({"idx": np.arange(n), "ok": np.ones(n, bool), "pixels": px})
                if t_start is None:  # the first batch pays the warm-up (compile, kernels, pool start)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t_start = time.perf_counter()
                else:
                    done += n
            dt = time.perf_counter() - t_start
    return {"img_per_s": done / dt if dt > 0 else 0.0, "images_timed": done, "load_s": load_s, "decode_procs": procs}


def cli_run(tok_dir, images_dir, out, a, sd, cuda) -> dict:
    cmd = tokenize_cmd(images_dir, tok_dir, out, a.pipe_batch, sd, cuda)
    if cuda:
        cmd += ([] if a.no_compile else ["--compile-encoder"]) + ["--encode-chunks", str(a.chunks)]
    if a.num_cpus:
        cmd += ["--num-cpus", str(a.num_cpus)]
    t0 = time.perf_counter()
    rc, text = run_cli(cmd, a.timeout)
    res: dict = {"rc": rc, "wall_s": time.perf_counter() - t0, "cmd": " ".join(cmd[3:])}
    for line in text.splitlines():
        if " img/s" in line and "images in" in line:
            res["cli_summary"] = line.strip()
        if line.startswith("time:"):
            res["stage_seconds"] = line.strip()
    if rc != 0:
        res["log_tail"] = text[-2000:]
    return res


def pipeline_section(a, torch, cuda: bool, sd: str) -> dict:
    from gpu_pipeline_ray import _make_jpeg, build_tokenizer

    import pyarrow.parquet as pq

    device = "cuda" if cuda else "cpu"
    work = Path(a.work)
    big, small = work / "images", work / "images_small"
    big.mkdir(parents=True, exist_ok=True)
    small.mkdir(parents=True, exist_ok=True)
    n_small = max(a.pipe_batch, a.images // 4)
    paths = [big / f"im{i:05d}.jpg" for i in range(a.images)]
    t0 = time.perf_counter()
    todo = [(str(p), i, (1024, 768)) for i, p in enumerate(paths) if not p.exists()]
    with mp.get_context("fork").Pool(max(1, (os.cpu_count() or 2) - 1)) as pool:
        pool.map(_make_jpeg, todo, chunksize=8)
    for p in paths[:n_small]:
        if not (small / p.name).exists():
            os.link(p, small / p.name)
    out: dict = {"images": a.images, "images_small": n_small, "batch": a.pipe_batch, "search_dtype": sd}
    log(f"corpus: {a.images} JPEGs ({n_small} in the small run) in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    tok_dir = build_tokenizer(work, paths, a.tiny, device)
    out["tokenizer_build_s"] = time.perf_counter() - t0
    if cuda:
        torch.cuda.empty_cache()
    out["in_process"] = in_process(tok_dir, paths, a, sd, device, out)
    log(f"in-process: {json.dumps(out['in_process'])}")
    if cuda:
        torch.cuda.empty_cache()
    out["cli_small"] = cli_run(tok_dir, small, work / "codes_small", a, sd, cuda)
    log(f"CLI {n_small} images: {json.dumps(out['cli_small'])[:600]}")
    with gpu_busy(out, "cli_large_gpu", cuda):
        out["cli_large"] = cli_run(tok_dir, big, work / "codes_large", a, sd, cuda)
    log(f"CLI {a.images} images: {json.dumps(out['cli_large'])[:600]}")
    if out["cli_small"]["rc"] == 0 and out["cli_large"]["rc"] == 0:
        extra_s = out["cli_large"]["wall_s"] - out["cli_small"]["wall_s"]
        steady = (a.images - n_small) / extra_s if extra_s > 0 else float("nan")
        out["cli_steady_img_per_s"] = steady
        out["cli_startup_s"] = out["cli_small"]["wall_s"] - n_small / steady
        out["cli_whole_run_img_per_s"] = a.images / out["cli_large"]["wall_s"]
        out["pipeline_steady_over_inprocess"] = steady / max(out["in_process"]["img_per_s"], 1e-9)
        # the CLI's codes equal the small run's for the same files (two runs, one tokenizer)
        got = {}
        for f in sorted((work / "codes_large").glob("part-*.parquet")):
            t = pq.read_table(f, columns=["key", "codes"])
            got.update(zip(t.column("key").to_pylist(), t.column("codes").to_pylist()))
        same = []
        for f in sorted((work / "codes_small").glob("part-*.parquet")):
            t = pq.read_table(f, columns=["key", "codes"])
            same += [got.get(kk) == cc for kk, cc in zip(t.column("key").to_pylist(), t.column("codes").to_pylist())]
        out["cli_runs_codes_equal_share"] = float(np.mean(same)) if same else None
        out["cli_rows_large"] = len(got)
    return out


def main(argv=None) -> int:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on CPU, fused kernels in Triton's interpreter")
    ap.add_argument("--batch", type=int, default=64, help="images per tokenizer batch")
    ap.add_argument("--batches", type=int, default=6, help="batches back to back end to end")
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--chunks", type=int, default=2, help="pieces per batch for the encoder/RVQ overlap")
    ap.add_argument("--check-images", type=int, default=8, help="images checked against a full float64 search")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--images", type=int, default=4096, help="pipeline corpus (the small run: a quarter)")
    ap.add_argument("--pipe-batch", type=int, default=64)
    ap.add_argument("--pipe-search", default=None, help="search dtype of the pipeline runs (default: fused-bf16x3)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the CLI's local Ray (default: all)")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--work", default="/tmp/asvr_tokenize_speed")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    OUT = Path(a.out)
    OUT.mkdir(parents=True, exist_ok=True)
    if a.tiny:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (also for the CLI's Ray workers)
        a.batch, a.batches, a.iters, a.check_images = 2, 2, 1, 2
        a.images, a.pipe_batch = min(a.images, 64), 8
    import torch

    sys.path.insert(0, str(HERE))
    cuda = torch.cuda.is_available() and not a.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    DETAIL.update(device=device_name, torch=torch.__version__, cores=os.cpu_count(), tiny=a.tiny)
    try:
        import triton

        DETAIL["triton"] = triton.__version__
    except ImportError:
        DETAIL["triton"] = None
    t0 = time.perf_counter()
    tok = tokenizer_section(a, torch, dev, cuda)
    DETAIL["tokenizer"] = tok
    DETAIL["tokenizer_section_s"] = time.perf_counter() - t0
    for name, res in tok["configurations"].items():
        ROWS.append(
            {
                "device": device_name,
                "configuration": name,
                "tokenizer_img_per_s": res.get("tokenizer_img_per_s"),
                "rvq_img_per_s": res.get("rvq_img_per_s"),
                "codes_equal_float64": bool(res.get("codes_equal_float64", False)),
                "codes_checked_images": res.get("codes_checked_images", 0),
                "pipeline_steady_over_inprocess": None,
                "tiny": a.tiny,
            }
        )
    save()
    if not a.skip_pipeline:
        sd = a.pipe_search or ("fused-bf16x3" if DETAIL["triton"] else "float32")
        if cuda:
            del tok
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        pipe = pipeline_section(a, torch, cuda, sd)
        DETAIL["pipeline"] = pipe
        DETAIL["pipeline_section_s"] = time.perf_counter() - t0
        row = {
            "device": device_name,
            "configuration": f"pipeline {sd}",
            "tokenizer_img_per_s": None,
            "codes_equal_float64": False,  # not checked here: the tokenizer section checks the search
            "pipeline_steady_over_inprocess": pipe.get("pipeline_steady_over_inprocess"),
            "pipeline_steady_img_per_s": pipe.get("cli_steady_img_per_s"),
            "pipeline_startup_s": pipe.get("cli_startup_s"),
            "inprocess_img_per_s": pipe["in_process"]["img_per_s"],
            "gpu_busy_share_cli": (pipe.get("cli_large_gpu") or {}).get("busy_share"),
            "tiny": a.tiny,
        }
        ROWS.append(row)
        # the same search's tokenizer row carries the pipeline ratio too
        for r in ROWS:
            if r["configuration"] == f"{sd} top8" or (sd == "float32" and r["configuration"] == "float32 cascade"):
                r["pipeline_steady_over_inprocess"] = row["pipeline_steady_over_inprocess"]
        save()
    log(json.dumps(ROWS, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
