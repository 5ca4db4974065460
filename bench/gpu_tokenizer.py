"""GPU benchmark of the semantic tokenizer at production size (issues 2 and 3).

SigLIP-so400m/14@384-sized vision tower (random weights; 26 of 27 layers run,
as the semantic layer is the second to last) + 8 x 16384 x 1152 RVQ codebooks.
Codebooks are not Gaussian noise: each depth's codes are sampled from the
residuals of real encoder outputs, so near-ties look like a trained codebook's.

Variants, same pixels, one process:
  reference   bf16 encoder (eager) + fp32 RVQ by full fp32 distances, as the reference
  exact-fp32  bf16 encoder + our exact RVQ, fp32 candidate search + fp64 re-rank
  exact-fp16  bf16 encoder + our exact RVQ, fp16 candidate search + fp64 re-rank + certificate
              (also bf16 and tf32 search; same codes, more uncertified rows)
  (+ compiled encoder if --compile)
Code agreement is checked against the fp32 reference and against float64 (our
full float64 search) on a subset.  Decode side (issue 3): JPEG decode +
preprocess of 1024x768 photos on all cores with multiprocessing, with and without
PIL draft, and host->device copy of the pixel batches.

Run: python bench/gpu_tokenizer.py [--batch 64] [--iters 6] [--out DIR]
Needs torch + transformers + pillow + safetensors only.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:  # as bench.x (tests) or as python bench/x.py (the script's folder on sys.path)
    from bench._common import siglip_config
except ModuleNotFoundError:
    from _common import siglip_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install


def _import_tokenizer():
    try:
        from asvr.tokenizer.rvq.quantizer import ResidualQuantizer, rvq_encode_reference
    except ImportError:  # not installed: load the module file directly
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "quantizer", Path(__file__).resolve().parents[1] / "tokenizer" / "quantizer.py"
        )
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        ResidualQuantizer, rvq_encode_reference = mod.ResidualQuantizer, mod.rvq_encode_reference
    return ResidualQuantizer, rvq_encode_reference


def cuda_time(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return float(np.median(times))


def build_encoder(layers_total=27, feature_layer=26, small=False):
    from transformers import SiglipVisionModel

    if small:
        cfg = siglip_config(tiny=True)
        feature_layer = 2
    else:
        cfg = siglip_config(num_hidden_layers=layers_total)
    cfg.num_hidden_layers = feature_layer  # layers above the semantic one are never built
    cfg._attn_implementation = "sdpa"
    model = SiglipVisionModel(cfg).eval().requires_grad_(False)
    return model, cfg, feature_layer


class Tower(torch.nn.Module):
    def __init__(self, model, layer):
        super().__init__()
        self.model, self.layer = model, layer

    def forward(self, pixels):
        hs = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[self.layer]
        b, n, c = hs.shape
        s = int(n**0.5)
        return hs.reshape(b, s, s, c)


def realistic_codebooks(feats: torch.Tensor, depth: int, k: int, gen) -> torch.Tensor:
    """Codes sampled from residuals of real features (one greedy pass, fp32)."""
    x = feats.reshape(-1, feats.shape[-1]).float()
    r = x.clone()
    books = []
    for _ in range(depth):
        idx = torch.randint(0, r.shape[0], (k,), generator=gen, device="cpu").to(r.device)
        book = r[idx] + 0.01 * r[idx].std() * torch.randn(k, r.shape[1], device=r.device)
        books.append(book)
        d = (book * book).sum(1)[None] - 2 * r @ book.T
        r = r - book[d.argmin(1)]
    return torch.stack(books)


def reference_rvq_fp32(feats: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """The reference's fp32 quantizer: full fp32 distances (tf32 off)."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    x = feats.reshape(-1, feats.shape[-1]).float()
    r = x.clone()
    out = []
    for d in range(books.shape[0]):
        b = books[d]
        dist = (b * b).sum(1)[None] - 2 * r @ b.T
        idx = dist.argmin(1)
        out.append(idx)
        r = r - b[idx]
    torch.backends.cuda.matmul.allow_tf32 = prev
    return torch.stack(out, 1).reshape(*feats.shape[:-1], books.shape[0])


# ------------------------------------------------------------------ decode side
def _make_jpegs(n: int, size=(1024, 768)) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        w, h = size
        yy, xx = np.mgrid[0:h, 0:w] / w
        base = np.stack([np.sin(xx * rng.uniform(3, 30) + yy * rng.uniform(3, 30)) for _ in range(3)], -1)
        arr = ((base * 0.4 + 0.5 + rng.normal(0, 0.05, (h, w, 3))) * 255).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _decode_one(args):
    data, fast = args
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if fast:
        img.draft("RGB", (384, 384))
    img = img.convert("RGB").resize((384, 384), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) * (1 / 255)
    return ((arr - 0.5) / 0.5).transpose(2, 0, 1).copy()


def decode_bench(n_images: int, procs: int) -> dict:
    jpegs = _make_jpegs(16)
    work = [(jpegs[i % len(jpegs)], False) for i in range(n_images)]
    res = {}
    t0 = time.perf_counter()
    for w in work[:32]:
        _decode_one(w)
    res["decode_img_s_1core"] = 32 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for w in work[:32]:
        _decode_one((w[0], True))
    res["decode_draft_img_s_1core"] = 32 / (time.perf_counter() - t0)
    with mp.get_context("fork").Pool(procs) as pool:
        for fast in (False, True):
            t0 = time.perf_counter()
            pool.map(_decode_one, [(w[0], fast) for w in work], chunksize=8)
            res[f"decode{'_draft' if fast else ''}_img_s_{procs}cores"] = n_images / (time.perf_counter() - t0)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--k", type=int, default=16384)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--small", action="store_true", help="tiny sizes for a CPU smoke run")
    ap.add_argument("--out", default=os.environ.get("OUT", tempfile.gettempdir()))
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args()
    ResidualQuantizer, _ = _import_tokenizer()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.small:
        args.k, args.batch, args.iters = 256, 4, 2
    results: dict = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "batch": args.batch,
        "depth": args.depth,
        "k": args.k,
    }
    timer = cuda_time if dev.type == "cuda" else (lambda fn, iters, warmup=1: _cpu_time(fn, iters))
    gen = torch.Generator().manual_seed(0)

    # ---- encoder
    t0 = time.perf_counter()
    with torch.device(dev):
        model, cfg, layer = build_encoder(small=args.small)
    tower = Tower(model.to(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32), layer)
    results["build_s"] = time.perf_counter() - t0
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    pix = torch.randn(args.batch, 3, cfg.image_size, cfg.image_size, generator=gen).to(dev, dt)
    with torch.no_grad():
        feats = tower(pix).float()
        books = realistic_codebooks(feats, args.depth, args.k, gen).contiguous()
        enc_s = timer(lambda: tower(pix), args.iters)
    results["encoder_img_s"] = args.batch / enc_s
    n_rows = feats.shape[0] * feats.shape[1] * feats.shape[2]
    print(
        f"encoder: {results['encoder_img_s']:.1f} img/s  grid {tuple(feats.shape[1:3])}  rows/batch {n_rows}",
        flush=True,
    )

    q = ResidualQuantizer(books.clone())
    q.to(dev)
    with torch.no_grad():
        ref = reference_rvq_fp32(feats, books)
        ref_s = timer(lambda: reference_rvq_fp32(feats, books), args.iters)
        results["rvq_fp32_reference_img_s"] = args.batch / ref_s
        variants = {"fp32": ("float32", 8), "tf32": ("tf32", 16), "bf16": ("bfloat16", 16), "fp16": ("float16", 16)}
        for name, (sd, cand) in variants.items():
            codes, st = q.encode(feats, search_dtype=sd, candidates=cand, block_rows=16384, return_stats=True)
            s = timer(lambda: q.encode(feats, search_dtype=sd, candidates=cand, block_rows=16384), args.iters)
            results[f"rvq_exact_{name}_img_s"] = args.batch / s
            results[f"rvq_exact_{name}_fallback"] = st.fallback_fraction
            results[f"rvq_exact_{name}_full_f64"] = st.full_rows / max(1, st.rows)
            results[f"rvq_exact_{name}_agree_fp32ref"] = float((codes == ref).float().mean())
            print(
                f"rvq exact {name}: {args.batch / s:.1f} img/s fallback {st.fallback_fraction:.4%} full-f64 {st.full_rows / max(1, st.rows):.4%} "
                f"agree-fp32ref {results[f'rvq_exact_{name}_agree_fp32ref']:.6f}",
                flush=True,
            )
            if name == "fp16":
                exact_codes = codes
        # float64 ground truth on a subset of images (full float64 search)
        sub = feats[: min(4, args.batch)]
        f64 = q.encode(sub, search_dtype="float32", candidates=args.k)
        results["agree_exact_fp16_vs_float64"] = float((exact_codes[: sub.shape[0]] == f64).float().mean())
        results["agree_fp32ref_vs_float64"] = float((ref[: sub.shape[0]] == f64).float().mean())
        # naive bf16 search without re-rank (what DESIGN.md calls 97.9%)
        r = feats.reshape(-1, feats.shape[-1]).float()
        naive = []
        for d in range(args.depth):
            b = books[d]
            dist = (b * b).sum(1)[None].bfloat16() - 2 * (r.bfloat16() @ b.bfloat16().T)
            idx = dist.float().argmin(1)
            naive.append(idx)
            r = r - b[idx]
        naive = torch.stack(naive, 1).reshape(ref.shape)
        results["agree_naive_bf16_vs_fp32ref"] = float((naive == ref).float().mean())

        # ---- end to end: pixels on device -> codes
        def e2e_ref():
            return reference_rvq_fp32(tower(pix).float(), books)

        results["e2e_reference_img_s"] = args.batch / timer(e2e_ref, args.iters)
        for sd in ("float32", "float16"):

            def e2e_ours():
                return q.encode(tower(pix).float(), search_dtype=sd, candidates=16, block_rows=16384)

            results[f"e2e_ours_{sd}_img_s"] = args.batch / timer(e2e_ours, args.iters)
            results[f"e2e_speedup_{sd}"] = results[f"e2e_ours_{sd}_img_s"] / results["e2e_reference_img_s"]
            print(
                f"end to end: reference {results['e2e_reference_img_s']:.1f} img/s, ours ({sd} search) "
                f"{results[f'e2e_ours_{sd}_img_s']:.1f} img/s (x{results[f'e2e_speedup_{sd}']:.2f})",
                flush=True,
            )
        if args.compile and dev.type == "cuda":
            t0 = time.perf_counter()
            ctower = torch.compile(tower)
            ctower(pix)
            results["compile_s"] = time.perf_counter() - t0
            results["encoder_compiled_img_s"] = args.batch / timer(lambda: ctower(pix), args.iters)
            results["e2e_ours_compiled_img_s"] = args.batch / timer(
                lambda: q.encode(ctower(pix).float(), search_dtype="float32", candidates=16, block_rows=16384),
                args.iters,
            )
            print(
                f"compiled: encoder {results['encoder_compiled_img_s']:.1f}, e2e {results['e2e_ours_compiled_img_s']:.1f} img/s",
                flush=True,
            )
        # host -> device of a pinned uint8 vs float32 batch
        if dev.type == "cuda":
            host = torch.empty(args.batch, 3, cfg.image_size, cfg.image_size, dtype=torch.float32).pin_memory()
            results["h2d_float32_img_s"] = args.batch / timer(lambda: host.to(dev, non_blocking=True), args.iters)
            host8 = torch.empty(args.batch, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8).pin_memory()
            results["h2d_uint8_img_s"] = args.batch / timer(lambda: host8.to(dev, non_blocking=True), args.iters)
    if not args.skip_decode:
        results.update(decode_bench(512 if not args.small else 32, os.cpu_count() or 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_tokenizer.json").write_text(json.dumps(results, indent=2))
    print("\n| metric | value |\n|---|---|")
    for k, v in results.items():
        print(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")


def _cpu_time(fn, iters):
    fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


if __name__ == "__main__":
    main()
