"""``asvr-pipeline tokenize`` (Ray) on one GPU machine vs the same stages in one process (issue 13).

Generates a corpus of distinct 1024x768 JPEGs, a SigLIP-so400m-sized tokenizer
artifact (random 27-layer tower, 8 x 16384 x 1152 codebooks sampled from the
residuals of its own features on the corpus, so near ties look like a trained
codebook's), then, for each ``--search-dtype`` asked:

* in process: ``stages.decode_one`` on a pool of (cores - 1) processes feeding
  ``stages.Encoder`` (bf16 encoder, exact RVQ) batch by batch in the main
  process: img/s, after a warm-up batch;
* the CLI: ``asvr-pipeline tokenize --encoder-dtype bfloat16`` in a
  subprocess: its own img/s (Ray start and tokenizer load included), the
  outer wall clock, the GPU busy share (``nvidia-smi`` utilisation sampled
  every 200 ms while it runs) and the decode CPUs Ray had;
* codes of the CLI and of the in-process loop compared key by key.

Results go to ``OUT/gpu_pipeline_ray.json`` as they come.

    python bench/gpu_pipeline_ray.py --tiny        # CPU, small tokenizer, seconds
    python bench/gpu_pipeline_ray.py --images 4096 --search-dtype float32 fused-bf16x3   # GPU
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

try:  # as bench.x (tests) or as python bench/x.py (the script's folder on sys.path)
    from bench._common import siglip_config, run_cli, tokenize_cmd
except ModuleNotFoundError:
    from _common import siglip_config, run_cli, tokenize_cmd

OUT = Path(os.environ.get("OUT", "/tmp"))
RESULTS: dict = {}


def save(**kw) -> None:
    RESULTS.update(kw)
    (OUT / "gpu_pipeline_ray.json").write_text(json.dumps(RESULTS, indent=1))


def log(msg: str) -> None:
    print(msg, flush=True)


def _make_jpeg(args) -> None:
    path, seed, size = args
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / w
    base = np.stack([np.sin(xx * rng.uniform(3, 30) + yy * rng.uniform(3, 30)) for _ in range(3)], -1)
    arr = ((base * 0.4 + 0.5 + rng.normal(0, 0.05, (h, w, 3))) * 255).clip(0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, format="JPEG", quality=90)


def _decode(args):
    from asvr.pipeline.job.stages import decode_one

    path, cfg = args
    return decode_one(Path(path).read_bytes(), cfg)[0]


def build_tokenizer(work: Path, images: list[Path], tiny: bool, device: str) -> Path:
    import torch
    from transformers import SiglipVisionModel

    from asvr.tokenizer.model import SemanticTokenizer

    from asvr.tokenizer.artifact import TokenizerSpec, save_artifact

    from asvr.tokenizer.encoders.base import default_encoder_spec

    if tiny:
        cfg = siglip_config(tiny=True)
        depth, k = 3, 64
    else:
        cfg = siglip_config()
        depth, k = 8, 16384
    torch.manual_seed(0)
    with torch.device(device):
        SiglipVisionModel(cfg).save_pretrained(work / "siglip")
    side = cfg.image_size // cfg.patch_size
    spec = TokenizerSpec(
        encoder=default_encoder_spec("siglip", str(work / "siglip")),
        preprocess="square",
        grid=(side, side),
        dim=cfg.hidden_size,
        depth=depth,
        codebook_size=k,
        shared_codebook=False,
    )
    tok_dir = work / "tok"
    save_artifact(tok_dir, spec, torch.zeros(depth, k, cfg.hidden_size))
    tok = SemanticTokenizer.load(tok_dir, device=device)
    pix = tok.preprocess_images([p.read_bytes() for p in images[:64]])
    with torch.no_grad():
        r = tok.features(torch.from_numpy(pix).to(device), dtype=torch.bfloat16 if device == "cuda" else None)
    r = r.reshape(-1, cfg.hidden_size).float()
    g = torch.Generator().manual_seed(1)
    books = []
    for _ in range(depth):
        idx = (
            torch.randperm(r.shape[0], generator=g)[:k]
            if r.shape[0] >= k
            else torch.randint(0, r.shape[0], (k,), generator=g)
        ).to(r.device)
        book = r[idx] + 0.01 * r.std() * torch.randn(k, r.shape[1], device=r.device)
        books.append(book)
        r = r - book[((book * book).sum(1)[None] - 2 * r @ book.T).argmin(1)]
    spec.encoder.weights_sha256 = ""
    save_artifact(tok_dir, spec, torch.stack(books).cpu())
    return tok_dir


def in_process(tok_dir: Path, images: list[Path], batch: int, search_dtype: str, procs: int, device: str) -> dict:
    import torch

    from asvr.pipeline.job.stages import Encoder, TokenizerBuilder
    from asvr.tokenizer.model import SemanticTokenizer

    tok = SemanticTokenizer.load(tok_dir)
    cfg = tok.preprocess_config()
    enc = Encoder(
        TokenizerBuilder(str(tok_dir), device, 0, "bfloat16" if device == "cuda" else "float32", search_dtype)
    )
    codes = {}
    with mp.get_context("fork").Pool(procs) as pool:
        it = pool.imap(_decode, [(str(p), cfg) for p in images], chunksize=8)
        t0 = None
        done = 0
        for s in range(0, len(images), batch):
            px = np.stack([next(it) for _ in images[s : s + batch]])
            n = len(px)
            out = enc({"idx": np.arange(n), "ok": np.ones(n, bool), "pixels": px})
            for i, c in enumerate(out["codes"]):
                codes[images[s + i].name] = c
            if t0 is None:  # the first batch pays the warm-up (kernels compile, pool spins up)
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            else:
                done += n
        dt = time.perf_counter() - t0
    return {"img_s": done / dt if dt > 0 else 0.0, "images": done, "seconds": dt, "decode_procs": procs}, codes


def gpu_sampler(stop: threading.Event, samples: list) -> None:
    try:
        p = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
            stdout=subprocess.PIPE,
            text=True,
        )
    except FileNotFoundError:
        return
    for line in p.stdout:
        if stop.is_set():
            break
        try:
            samples.append(float(line.strip()))
        except ValueError:
            pass
    p.terminate()


def cli_run(
    tok_dir: Path, images_dir: Path, out: Path, batch: int, search_dtype: str, cuda: bool, timeout: float
) -> dict:
    cmd = tokenize_cmd(images_dir, tok_dir, out, batch, search_dtype, cuda)
    samples: list = []
    stop = threading.Event()
    th = threading.Thread(target=gpu_sampler, args=(stop, samples), daemon=True)
    if cuda:
        th.start()
    t0 = time.perf_counter()
    rc, text = run_cli(cmd, timeout)
    wall = time.perf_counter() - t0
    stop.set()
    res = {"rc": rc, "outer_wall_s": wall, "cmd": " ".join(cmd[2:])}
    for line in text.splitlines():
        if " img/s" in line and "images in" in line:
            res["cli_summary"] = line.strip()
            res["cli_img_s"] = float(line.split("=")[1].split()[0])
        if line.startswith("time:"):
            res["stage_seconds"] = line.strip()
    busy = [x for x in samples if x > 0]
    if samples:
        res["gpu_util_mean_all_samples"] = float(np.mean(samples))
        res["gpu_util_mean_while_busy"] = float(np.mean(busy)) if busy else 0.0
        res["gpu_busy_share_of_samples"] = len(busy) / len(samples)
    if rc != 0:
        res["log_tail"] = text[-2000:]
    return res


def main(argv=None) -> int:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--work", default="/tmp/asvr_gpu_pipeline")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--search-dtype", nargs="+", default=["float32", "fused-bf16x3"])
    ap.add_argument("--timeout", type=float, default=200)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    OUT = Path(a.out)
    OUT.mkdir(parents=True, exist_ok=True)
    import torch

    cuda = torch.cuda.is_available() and not a.tiny
    device = "cuda" if cuda else "cpu"
    if a.tiny:
        a.images, a.batch = min(a.images, 48), 8
        os.environ["TRITON_INTERPRET"] = "1"
    cores = os.cpu_count() or 1
    save(device=torch.cuda.get_device_name() if cuda else "cpu", cores=cores, images=a.images, batch=a.batch)
    work = Path(a.work)
    imgs_dir = work / "images"
    imgs_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = [imgs_dir / f"im{i:05d}.jpg" for i in range(a.images)]
    todo = [(str(p), i, (1024, 768)) for i, p in enumerate(paths) if not p.exists()]
    with mp.get_context("fork").Pool(max(1, cores - 1)) as pool:
        pool.map(_make_jpeg, todo, chunksize=8)
    log(f"corpus: {a.images} JPEGs 1024x768 in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    tok_dir = build_tokenizer(work, paths, a.tiny, device)
    if cuda:
        torch.cuda.empty_cache()
    log(f"tokenizer built in {time.perf_counter() - t0:.1f}s")
    procs = max(1, cores - 1)
    for sd in a.search_dtype:
        res, codes = in_process(tok_dir, paths, a.batch, sd, procs, device)
        log(
            f"in-process {sd}: {res['img_s']:.1f} img/s ({res['images']} images after a warm-up batch, "
            f"{procs} decode processes)"
        )
        save(**{f"in_process_{sd}": res})
        if cuda:
            torch.cuda.empty_cache()
        res = cli_run(tok_dir, imgs_dir, work / f"codes_{sd}", a.batch, sd, cuda, a.timeout)
        res["cli_over_in_process"] = res.get("cli_img_s", 0) / max(RESULTS[f"in_process_{sd}"]["img_s"], 1e-9)
        res["decode_cpus"] = cores - 1  # Ray's CPUs minus the encode actor's one
        try:
            import pyarrow.parquet as pq

            tabs = [pq.read_table(f) for f in sorted((work / f"codes_{sd}").glob("part-*.parquet"))]
            got = {
                k: np.asarray(c)
                for t in tabs
                for k, c in zip(t.column("key").to_pylist(), t.column("codes").to_pylist())
            }
            same = [np.array_equal(got[k].reshape(-1), codes[k].reshape(-1)) for k in got if k in codes]
            res["codes_equal_in_process_share"] = float(np.mean(same)) if same else None
        except Exception as e:  # the comparison is a bonus: never lose the timing for it
            res["codes_compare_error"] = f"{type(e).__name__}: {e}"[:200]
        log(f"CLI {sd}: {json.dumps(res)[:1500]}")
        save(**{f"cli_{sd}": res})
    log("summary: " + json.dumps(RESULTS)[:4000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
