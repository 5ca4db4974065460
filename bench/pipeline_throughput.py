"""End-to-end ``asvr-pipeline tokenize`` throughput / a bare in-process loop, shard bytes, fast decode.

Same tokenizer (embedded EfficientNet-Lite0 + random codebooks D=4, K=256),
same images, same machine, measured in one run:

1. bare loop: read bytes, ``SemanticTokenizer.encode_images`` in batches
   (torch on all cores), tokenizer load not timed;
2. the CLI as a subprocess on a fresh local Ray with ``--num-cpus 2``,
   timed end to end (Ray start, tokenizer load in the actor, discovery,
   shards, manifest: everything a user waits for);
3. bytes per image in the Parquet shards vs raw uint16 codes (H*W*D*2) and
   vs the source JPEG bytes;
4. ``--fast-decode``: decode+resize img/s of 1024x768 JPEGs with and without
   PIL draft, and the fraction of codes equal to a full decode.

Usage: .venv/bin/python bench/pipeline_throughput.py [--images 2000] [--work DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import build_tiny_tokenizer, make_image  # noqa: E402


def make_corpus(folder: Path, n: int, size=(256, 192)) -> list[Path]:
    paths = []
    for i in range(n):
        p = folder / f"{i % 10}" / f"img_{i:06d}.jpg"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            make_image(i, size).save(p, "JPEG", quality=90)
        paths.append(p)
    return sorted(paths)


def bare_loop(tok, paths: list[Path], batch: int) -> tuple[float, dict]:
    t0 = time.perf_counter()
    codes = {}
    for i in range(0, len(paths), batch):
        chunk = paths[i : i + batch]
        c = tok.encode_images([p.read_bytes() for p in chunk]).numpy()
        for p, ci in zip(chunk, c):
            codes[p] = ci
    return time.perf_counter() - t0, codes


def fast_decode_check(tok, n: int) -> dict:
    from asvr.tokenizer.preprocess import load_and_preprocess

    datas = []
    for i in range(n):
        buf = io.BytesIO()
        make_image(10_000 + i, (1024, 768)).save(buf, "JPEG", quality=90)
        datas.append(buf.getvalue())
    res = {}
    pixels = {}
    for fast in (False, True):
        cfg = tok.preprocess_config(fast_decode=fast)
        t0 = time.perf_counter()
        px = np.stack([load_and_preprocess(d, cfg)[0] for d in datas])
        res[f"decode_img_s_{'fast' if fast else 'full'}"] = n / (time.perf_counter() - t0)
        pixels[fast] = px
    a = tok.encode_pixels(pixels[False]).numpy()
    b = tok.encode_pixels(pixels[True]).numpy()
    res["code_agreement"] = float((a == b).mean())
    res["code_agreement_depth0"] = float((a[..., 0] == b[..., 0]).mean())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--work", default="/tmp/asvr_pipeline_bench")
    ap.add_argument("--fast-decode-images", type=int, default=64)
    args = ap.parse_args()

    import torch

    from asvr.core.shards import load_codes
    from asvr.tokenizer.model import SemanticTokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = build_tiny_tokenizer(work / "tok", depth=4, k=256)
    paths = make_corpus(work / "images", args.images)
    folder = work / "images"
    tok = SemanticTokenizer.load(tok_dir)
    print(
        f"{len(paths)} images 256x192 JPEG, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"load {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    t_bare, bare_codes = bare_loop(tok, paths, args.batch_size)
    print(f"bare loop: {t_bare:.1f}s = {len(paths) / t_bare:.2f} img/s", flush=True)

    out = work / "out"
    cmd = [
        str(Path(sys.executable).parent / "asvr-pipeline"),
        "tokenize",
        str(folder),
        "--tokenizer",
        str(tok_dir),
        "--out",
        str(out),
        "--num-cpus",
        "2",
        "--batch-size",
        str(args.batch_size),
        "--no-progress",
        "--overwrite",
    ]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    t_cli = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"CLI failed: {proc.stderr[-2000:]}")
    print(proc.stdout.strip())
    print(f"CLI end to end: {t_cli:.1f}s = {len(paths) / t_cli:.2f} img/s", flush=True)

    _, cli_codes = load_codes(out)
    same = all(np.array_equal(cli_codes[p.relative_to(folder).as_posix()], bare_codes[p]) for p in paths)
    manifest = json.loads((out / "manifest.json").read_text())
    shard_bytes = sum((out / s["file"]).stat().st_size for s in manifest["shards"])
    n = manifest["counts"]["encoded"]
    raw = 7 * 7 * 4 * 2
    jpeg = sum(p.stat().st_size for p in paths) / len(paths)
    print(f"codes equal to the bare loop: {same}")
    print(
        f"parquet bytes/image {shard_bytes / n:.1f}; raw uint16 codes {raw} ({shard_bytes / n / raw:.2f}x); "
        f"source JPEG {jpeg:.0f} ({shard_bytes / n / jpeg:.4f}x)"
    )
    fd = fast_decode_check(tok, args.fast_decode_images) if args.fast_decode_images else {}
    if fd:
        print(
            f"fast decode 1024x768: {fd['decode_img_s_full']:.1f} -> {fd['decode_img_s_fast']:.1f} img/s "
            f"({fd['decode_img_s_fast'] / fd['decode_img_s_full']:.2f}x), codes equal {fd['code_agreement']:.3f} "
            f"(depth 0: {fd['code_agreement_depth0']:.3f})"
        )
    print(f"RATIO cli/bare throughput = {t_bare / t_cli:.3f} (target >= 0.85)")


if __name__ == "__main__":
    main()
