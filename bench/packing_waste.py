"""Padding waste: sequence packing vs pad-to-longest batches, on LLaVA-like lengths.

Lengths are synthetic but shaped like LLaVA-1.5's two stages (576 image tokens
for CLIP-L/336, or 729 for SigLIP/384):
* pretrain (558k captions): image + a short caption, lognormal median 20 tokens;
* sft (665k): image + a conversation, lognormal median 170 tokens, clipped to
  [20, 1500]; 6% text-only samples (ShareGPT-like, lognormal median 500).

Waste = padding slots / all token slots of the micro-batches (each padded to
its longest row).  Baselines: random pad-to-longest (no sampler) and LLaVA's
``group_by_modality_length`` megabatch sort (8 GPUs).  Prints one table and
the ratio of wasted slots, packing vs the baseline.

    python bench/packing_waste.py [--n 100000] [--image-tokens 576]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from asvr.train.data.packing import PackingConfig, padding_waste, plan_epoch


def llava_like_lengths(n: int, stage: str, image_tokens: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    if stage == "pretrain":
        text = np.clip(rng.lognormal(np.log(20), 0.5, n), 5, 200)
        return (image_tokens + 1 + text).astype(int).tolist()
    text = np.clip(rng.lognormal(np.log(170), 0.9, n), 20, 1500)
    has_image = rng.random(n) >= 0.06
    text_only = np.clip(rng.lognormal(np.log(500), 0.8, n), 20, 2000)
    return np.where(has_image, image_tokens + 40 + text, 40 + text_only).astype(int).tolist()


def grouped_plan(lengths: list[int], rows: int, world: int, seed: int) -> list[list[list[int]]]:
    """LLaVA's length-grouped sampler: megabatches of rows*world samples sorted by length."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    mega = rows * world
    plan = []
    for s in range(0, len(order), mega):
        chunk = sorted(order[s : s + mega].tolist(), key=lambda i: -lengths[i])
        plan.extend([[i] for i in chunk[j : j + rows]] for j in range(0, len(chunk), rows))
    return plan


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--image-tokens", type=int, default=576)
    p.add_argument("--max-len", type=int, default=2048)
    a = p.parse_args(argv)
    print(
        f"{a.n} samples, {a.image_tokens} image tokens, max_len {a.max_len}; waste = padding share of the "
        f"token slots (micro-batch padded to its longest row); fill = real tokens / (rows x max_len)"
    )
    print(
        f"{'stage':9} {'samples/mb':>10} {'pad-to-longest':>15} {'LLaVA grouped':>14} {'packed rows/mb':>15} "
        f"{'packed waste':>13} {'packed fill':>12} {'vs random':>10} {'vs grouped':>11} {'plan s':>7}"
    )
    for stage in ("pretrain", "sft"):
        lengths = [min(x, a.max_len) for x in llava_like_lengths(a.n, stage, a.image_tokens)]
        for rows in (4, 16):
            naive = padding_waste(
                plan_epoch(lengths, PackingConfig(max_len=a.max_len, rows=rows, pack=False), 0, 0), lengths
            )
            grouped = padding_waste(grouped_plan(lengths, rows, 8, 0), lengths)
            # about the same tokens per micro-batch: rows samples of ~mean length vs packed rows of max_len
            prow = max(1, round(rows * float(np.mean(lengths)) / a.max_len))
            t = time.perf_counter()
            plan = plan_epoch(lengths, PackingConfig(max_len=a.max_len, rows=prow), 0, 0)
            dt = time.perf_counter() - t
            packed = padding_waste(plan, lengths)
            fill = sum(lengths) / (sum(len(mb) for mb in plan) * a.max_len)
            ratio = lambda base: f"{base / packed:.0f}x" if packed > 1e-4 else "no pad"  # noqa: E731
            print(
                f"{stage:9} {rows:>10} {naive:>15.1%} {grouped:>14.1%} {prow:>15} {packed:>13.2%} {fill:>12.1%} "
                f"{ratio(naive):>10} {ratio(grouped):>11} {dt:>7.2f}"
            )


if __name__ == "__main__":
    main()
