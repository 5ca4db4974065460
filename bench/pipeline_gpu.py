"""GPU stage throughput for a SigLIP-so400m-sized tokenizer (random weights, built from a config).

Measures the pipeline's own stages, in process (the GPU machines here carry no
Ray): the encode actor's ``Encoder.__call__`` on decoded uint8 batches (H2D,
normalisation, encoder, exact RVQ 8x16384x1152), split into its parts, in fp32
and bf16; and the decode stage (``stages.decode_one``) of 1024x768 JPEGs over
all CPU cores, with and without ``--fast-decode``.  The pipeline's rate on such
a machine is min(decode rate over the cores left to decode tasks, encode rate).
Compare with DESIGN.md's floor: (666+220) GFLOP / 779 TFLOP/s ~ 880 img/s.

Usage (on a GPU machine): python bench/pipeline_gpu.py [--work DIR] [--batch 64]
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

try:  # as bench.x (tests) or as python bench/x.py (the script's folder on sys.path)
    from bench._common import siglip_config
except ModuleNotFoundError:
    from _common import siglip_config


def build_so400m_tokenizer(work: Path) -> Path:
    import torch
    from transformers import SiglipVisionModel

    from asvr.tokenizer.artifact import TokenizerSpec, save_artifact

    from asvr.tokenizer.encoders.base import default_encoder_spec

    enc_dir, tok_dir = work / "siglip", work / "tok"
    if (tok_dir / "tokenizer.json").exists():
        return tok_dir
    cfg = siglip_config()
    torch.manual_seed(0)
    SiglipVisionModel(cfg).save_pretrained(enc_dir)
    enc = default_encoder_spec("siglip", str(enc_dir))
    spec = TokenizerSpec(
        encoder=enc, preprocess="square", grid=(27, 27), dim=1152, depth=8, codebook_size=16384, shared_codebook=False
    )
    save_artifact(tok_dir, spec, torch.randn(8, 16384, 1152) * 0.05)
    return tok_dir


def timed(fn, reps: int):
    import torch

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        r = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps, r


def encode_bench(tok_dir: Path, batch: int, reps: int) -> None:
    import torch

    from asvr.pipeline.job.stages import Encoder, TokenizerBuilder

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (batch, 384, 384, 3), dtype=np.uint8)
    block = {"idx": np.arange(batch), "ok": np.ones(batch, bool), "pixels": pixels}
    for dtype in ("bfloat16", "float32"):
        enc = Encoder(TokenizerBuilder(str(tok_dir), "cuda", 0, dtype))
        tok = enc.tok
        ad = torch.bfloat16 if dtype == "bfloat16" else None
        t_all, _ = timed(lambda: enc(block), reps)
        t_norm, x = timed(lambda: enc.normalise(pixels), reps)
        t_feat, f = timed(lambda: tok.features(x, dtype=ad), reps)
        t_q, _ = timed(lambda: tok.quantizer.encode(f, search_dtype="bfloat16", candidates=32), reps)
        print(
            f"encoder {dtype}, batch {batch}: Encoder() {batch / t_all:.0f} img/s | H2D+normalise "
            f"{batch / t_norm:.0f}, features {batch / t_feat:.0f}, RVQ {batch / t_q:.0f} img/s",
            flush=True,
        )
        enc = tok = None  # free the GPU memory before the next dtype
        torch.cuda.empty_cache()


def _decode_worker(args):
    datas, fast = args
    from asvr.pipeline.job.stages import decode_one
    from asvr.tokenizer.preprocess import PreprocessConfig

    cfg = PreprocessConfig(image_size=384, fast_decode=fast)
    for d in datas:
        decode_one(d, cfg)
    return len(datas)


def decode_bench(n_per_core: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:768, 0:1024] / 1024
    datas = []
    for i in range(16):
        a = np.stack([np.sin(xx * rng.uniform(2, 9) + yy * rng.uniform(2, 9)) for _ in range(3)], -1)
        buf = io.BytesIO()
        Image.fromarray(((a * 0.5 + 0.5) * 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        datas.append(buf.getvalue())
    cores = os.cpu_count() or 1
    for fast in (False, True):
        t0 = time.perf_counter()
        _decode_worker((datas[:4], fast))
        one = 4 / (time.perf_counter() - t0)
        work = [(datas * (n_per_core // len(datas) + 1))[:n_per_core]] * (cores - 1)
        with mp.Pool(cores - 1) as pool:
            t0 = time.perf_counter()
            total = sum(pool.map(_decode_worker, [(w, fast) for w in work]))
            dt = time.perf_counter() - t0
        print(
            f"decode+resize 1024x768 -> 384 ({'fast' if fast else 'full'}): {one:.0f} img/s on one core, "
            f"{total / dt:.0f} img/s on {cores - 1} processes",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/asvr_gpu_bench")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--decode-per-core", type=int, default=160)
    args = ap.parse_args()
    import torch

    print(torch.cuda.get_device_name(0), flush=True)
    decode_bench(args.decode_per_core)
    t0 = time.perf_counter()
    tok_dir = build_so400m_tokenizer(Path(args.work))
    print(f"built tokenizer in {time.perf_counter() - t0:.0f}s", flush=True)
    encode_bench(tok_dir, args.batch, args.reps)


if __name__ == "__main__":
    main()
