"""Packed stream at reference row size (27x27 grid, depth 8): per-rank peak RSS, time to the
first batch and loader tokens/s, for N synthetic images (2 image samples of 729 + 30 tokens per
2048-token row, as pretraining packs them).

    .venv/bin/python bench/packed_stream.py --sizes 10000 100000 [--world 8]
    .venv/bin/python bench/packed_stream.py --pack 20000   # pack on 2 CPUs vs the in-process build

Each size is written once under --dir, then measured in a fresh process (rank 0 of --world),
so RSS is that of one training rank's loader alone.

``--pack N``: N reference-size images in code shards and N pretraining conversations (tiny
demo LLM tokenizer), built twice in one run: today's in-process start-up
(``build_training_data`` + the epoch's packing plan) and ``asvr-pipeline pack --num-cpus 2``
(Ray start-up included, shards written); prints both times and the ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GRID, DEPTH, MAX_LEN, IMG, TEXT = (27, 27), 8, 2048, 729, 30
ROWS_PER_SHARD = 4096


def write(folder: Path, n_images: int) -> None:
    from asvr.core.packed import PackedMeta, rows_to_table, write_packed_shard

    meta = PackedMeta("f" * 64, GRID, DEPTH, 4096, "square", "t" * 64, "plain", MAX_LEN, IMG)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n_rows = n_images // 2
    L = 2 * (IMG + TEXT)
    for s, start in enumerate(range(0, n_rows, ROWS_PER_SHARD)):
        n = min(ROWS_PER_SHARD, n_rows - start)
        codes = rng.integers(0, 4096, (n, 2 * GRID[0] * GRID[1] * DEPTH), dtype=np.uint16)
        ids = rng.integers(0, 32000, (n, L), dtype=np.int32)
        rows = {
            "input_ids": list(ids),
            "labels": list(ids),
            "sample_ids": [[f"s{2 * (start + i)}", f"s{2 * (start + i) + 1}"] for i in range(n)],
            "sample_offsets": [[0, IMG + TEXT, L]] * n,
            "image_keys": [[f"k{2 * (start + i)}", f"k{2 * (start + i) + 1}"] for i in range(n)],
            "image_offsets": [[0, IMG + TEXT]] * n,
            "codes": list(codes),
        }
        write_packed_shard(folder / f"packed-{s:05d}.parquet", rows_to_table(meta, rows))
    (folder / "manifest.json").write_text(json.dumps({"complete": True, "run": meta.to_dict()}))


def measure(folder: Path, world: int, batches: int) -> dict:
    t0 = time.perf_counter()
    from asvr.train.data.packed_stream import PackedCollator, PackedCorpus, PackedStreamLoader

    corpus = PackedCorpus.open(folder, {})
    loader = PackedStreamLoader(corpus, PackedCollator(corpus.meta, pad_id=0), rows=1, seed=0, rank=0, world=world)
    it = iter(loader)
    b = next(it)
    first = time.perf_counter() - t0
    tokens, t1 = 0, time.perf_counter()
    for _ in range(batches):
        b = next(it)
        tokens += b.num_tokens
    dt = time.perf_counter() - t1
    return {
        "rows": corpus.n_rows,
        "first_batch_s": round(first, 2),
        "tokens_per_s": round(tokens / dt),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }


def pack_corpus(root: Path, n: int) -> tuple[Path, Path, Path]:
    """N images of codes (parquet shards of 4096), N conversations, a tiny LLM folder."""
    from asvr.core.shards import ShardMeta, rows_to_table, write_parquet_shard
    from asvr.demo.tiny_llm import make_tiny_llm

    words = ["red", "green", "blue", "circle", "square", "wave", "stripe", "bright", "dark", "sky"]
    codes, data, llm = root / "codes", root / "data.json", root / "llm"
    if data.exists():
        return codes, data, llm
    codes.mkdir(parents=True, exist_ok=True)
    meta = ShardMeta("f" * 64, GRID, DEPTH, 4096, "square")
    rng = np.random.default_rng(0)
    for s, a in enumerate(range(0, n, 4096)):
        b = min(n, a + 4096)
        keys = [f"img{i:08d}.jpg" for i in range(a, b)]
        c = rng.integers(0, 4096, (b - a, GRID[0] * GRID[1] * DEPTH), dtype=np.uint16)
        table = rows_to_table(meta, keys, c, ["0" * 64] * (b - a), [384] * (b - a), [384] * (b - a), [None] * (b - a))
        write_parquet_shard(codes / f"part-{s:05d}.parquet", table)
    caps = [" ".join(words[(i * 7 + j) % len(words)] for j in range(5 + i % 20)) for i in range(n)]
    convs = [
        {"id": f"c{i}", "image": f"img{i:08d}.jpg",
         "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": caps[i]}]}
        for i in range(n)
    ]  # fmt: skip
    make_tiny_llm(llm, "llama", caps[:200] + ["Describe."])
    data.write_text(json.dumps(convs))
    return codes, data, llm


def bench_pack(root: Path, n: int) -> None:
    from transformers import AutoTokenizer

    from asvr.pipeline.job.pack import PackConfig, run_pack
    from asvr.train.data.dataset import DataConfig, build_training_data
    from asvr.train.data.packing import PackingConfig, plan_epoch
    from asvr.train.data.sources import CodeStore
    from asvr.train.data.templates import get_template

    codes, data, llm = pack_corpus(root, n)
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(llm)
    store = CodeStore.open(codes, "f" * 64)
    cfg = DataConfig(data=[str(data)], codes=str(codes), packing=PackingConfig(max_len=MAX_LEN))
    built = build_training_data(cfg, get_template("plain"), tok, store, False)
    plan = plan_epoch(built.lengths, cfg.packing, 0, 0)
    t_mem = time.perf_counter() - t
    out = root / "packed"
    t = time.perf_counter()
    lines = run_pack(
        PackConfig(codes=str(codes), data=[str(data)], model=str(llm), out=str(out), max_len=MAX_LEN,
                   unit_size=4096, num_cpus=2, overwrite=True, progress=False)
    )  # fmt: skip
    t_pack = time.perf_counter() - t
    print(f"in-process build: {len(built.samples)} samples, {len(plan)} micro-batches in {t_mem:.1f} s")
    print(f"pack (2 CPUs): {lines[0]}; {t_pack:.1f} s")
    print(f"pack / in-process = {t_pack / t_mem:.2f}x the time ({n / t_pack:.0f} vs {n / t_mem:.0f} samples/s)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--dir", default="/tmp/asvr_packed_bench")
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--pack", type=int, metavar="N", help="time pack against the in-process build of N samples")
    a = p.parse_args()
    if a.pack:
        bench_pack(Path(a.dir) / f"pack{a.pack}", a.pack)
        return
    if a.measure:
        print(json.dumps(measure(Path(a.measure), a.world, a.batches)))
        return
    out = {}
    for n in a.sizes:
        folder = Path(a.dir) / f"n{n}"
        if not (folder / "manifest.json").exists():
            t = time.perf_counter()
            write(folder, n)
            print(f"wrote {n} images in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        r = subprocess.run(
            [sys.executable, __file__, "--measure", str(folder), "--world", str(a.world), "--batches", str(a.batches)],
            capture_output=True,
            text=True,
            check=True,
        )
        out[n] = json.loads(r.stdout)
        print(n, out[n], flush=True)
    lo, hi = min(out), max(out)
    print(f"RSS {hi}/{lo}: {out[hi]['peak_rss_gb'] / out[lo]['peak_rss_gb']:.2f}x")


if __name__ == "__main__":
    main()
