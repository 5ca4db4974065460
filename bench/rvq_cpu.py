"""RVQ encoding on CPU: the exact fast path (``ResidualQuantizer.encode``,
float32 search + certified float64 re-rank) against the float64 numpy
reference, on the same inputs.  Prints times, the speed-up, code agreement
(must be 100%) and the share of searches that fell back; bfloat16 search is
timed too, for information (on CPU it is emulated and slow).

    .venv/bin/python bench/rvq_cpu.py [--n 2000] [--big]

Data: codebooks and features with the structure of real ones (features near
codebook entries, shrinking residual scale per depth), float32.

Measured on the 2-core dev box (shared with other jobs, load ~8), torch 2 threads:
  N=2000 D=4 K=1024 C=320:   reference 64.6 s, fp32 1.58 s (x41), 100% equal, 0% fallback;
                             bf16 11.7 s (x5.5), 100% equal, 0.013% fallback
  N=2000 D=4 K=4096 C=1152:  reference 614 s, fp32 5.41 s (x113), 100% equal, 0% fallback;
  (--big, ~11 min)           bf16 27.9 s (x22), 100% equal, 5.2% fallback
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from asvr.tokenizer.rvq.quantizer import ResidualQuantizer, rvq_encode_reference


def make(n: int, d: int, k: int, c: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    cb = np.stack([rng.standard_normal((k, c)) * 0.6**i for i in range(d)]).astype(np.float32)
    x = cb[0][rng.integers(0, k, n)] + 0.5 * rng.standard_normal((n, c))
    return x.astype(np.float32), cb


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def run_case(n: int, d: int, k: int, c: int) -> None:
    x, cb = make(n, d, k, c)
    q = ResidualQuantizer(torch.from_numpy(cb))
    xt = torch.from_numpy(x)
    q.encode(xt[:64])  # warm the prepared-codebook cache
    t_ref, ref = timed(lambda: rvq_encode_reference(x, cb))
    t_f32, (c32, s32) = timed(lambda: q.encode(xt, search_dtype="float32", return_stats=True), repeat=3)
    t_bf, (cbf, sbf) = timed(lambda: q.encode(xt, search_dtype="bfloat16", candidates=32, return_stats=True))
    print(f"N={n} D={d} K={k} C={c}  threads={torch.get_num_threads()}")
    print(f"  float64 numpy reference : {t_ref:8.3f} s")
    print(
        f"  exact fp32 search       : {t_f32:8.3f} s   speed-up x{t_ref / t_f32:.1f}   "
        f"agreement {100 * (c32.numpy() == ref).mean():.3f}%   fallback {100 * s32.fallback_fraction:.3f}% "
        f"(full float64 {100 * s32.full_rows / s32.rows:.3f}%)"
    )
    print(
        f"  exact bf16 search (info): {t_bf:8.3f} s   speed-up x{t_ref / t_bf:.1f}   "
        f"agreement {100 * (cbf.numpy() == ref).mean():.3f}%   fallback {100 * sbf.fallback_fraction:.3f}%"
    )
    assert (c32.numpy() == ref).all() and (cbf.numpy() == ref).all(), "codes differ from the reference"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--big", action="store_true", help="also C=1152, K=4096 (the reference's dim)")
    args = p.parse_args()
    run_case(args.n, 4, 1024, 320)
    if args.big:
        run_case(args.n, 4, 4096, 1152)


if __name__ == "__main__":
    main()
