"""Recall@10 and queries/s of the approximate retrieval indexes against exact search.

Vectors are made the way `asvr-tokenizer index` makes them (mean of the
dequantized patch features, L2-normalised) from synthetic code grids with
topic structure, so neighbours are meaningful: T topics, each a sparse
Dirichlet distribution over the K codes of every depth; an image mixes two
topics (weight ~ U(0.5, 1)) over its H x W patches.  Codebooks are Gaussian
with the per-depth scale decay of a residual quantizer (1, 1/2, 1/4, ...).
Queries are held-out images drawn the same way.

Baseline: exact IndexFlatIP in the same run (ground truth and queries/s).
Compared: IVF{nlist},PQ{C/8},Refine(SQ8), what `plan_index` picks for
N >= 100k (nprobe, k_factor as stored, then 2x nprobe, then k_factor 8), the
same PQ without the refine, and HNSW32,Flat (`plan_index(kind="hnsw")`:
efConstruction 80, efSearch 64/128/256).

    .venv/bin/python bench/retrieval_recall.py            # 100k x 320-d, ~3-5 min on 2 cores
    .venv/bin/python bench/retrieval_recall.py --dim 1152 # the published tokenizer's width
"""

from __future__ import annotations

import argparse
import os
import time

import faiss
import numpy as np
import torch

from asvr.tokenizer.codes.retrieval import ImageVectorizer, apply_search_params, new_faiss_index, plan_index


def synthetic_codes(n: int, rng, topics: int, depth: int, k: int, patches: int, alpha: float = 0.05) -> np.ndarray:
    """[n, patches, depth] codes from a two-topic mixture (vectorised inverse-CDF sampling)."""
    cdf = np.cumsum(rng.dirichlet(np.full(k, alpha), size=(topics, depth)), axis=-1)  # [T, D, K]
    cdf[..., -1] = 1.0
    flat = (cdf + np.arange(topics * depth).reshape(topics, depth, 1)).ravel()  # row r's cdf shifted by r
    a, b = rng.integers(0, topics, n), rng.integers(0, topics, n)
    w = rng.uniform(0.5, 1.0, n)
    topic = np.where(rng.random((n, patches)) < w[:, None], a[:, None], b[:, None])  # [n, P]
    row = topic[..., None] * depth + np.arange(depth)  # [n, P, D]
    idx = np.searchsorted(flat, row + rng.random(row.shape), side="right") - row * k
    return np.minimum(idx, k - 1).astype(np.uint16)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def recall_at(exact: np.ndarray, got: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(exact, got)]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--dim", type=int, default=320)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--k", type=int, default=256, help="codebook size")
    p.add_argument("--grid", type=int, default=7)
    p.add_argument("--topics", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    scale = torch.tensor([0.5**d for d in range(args.depth)])[:, None, None]
    cb = torch.randn(args.depth, args.k, args.dim) * scale
    vec = ImageVectorizer(cb, args.depth, batch=2048)
    codes, t_gen = timed(
        lambda: synthetic_codes(args.n + args.queries, rng, args.topics, args.depth, args.k, args.grid**2)
    )
    xq_all, t_vec = timed(lambda: vec(codes.reshape(len(codes), args.grid, args.grid, args.depth)))
    xb, xq = xq_all[: args.n], xq_all[args.n :]
    print(
        f"{args.n} vectors x {args.dim}-d (+{args.queries} queries), codes {args.depth}x{args.k}, "
        f"grid {args.grid}x{args.grid}; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, "
        f"load avg {os.getloadavg()[0]:.1f}; sampling {t_gen:.1f}s, vectors {t_vec:.1f}s"
    )

    rows = []
    flat = faiss.IndexFlatIP(args.dim)
    _, t_build = timed(lambda: flat.add(xb))
    (_, exact), t_q = timed(lambda: flat.search(xq, 10))
    qps_exact = len(xq) / t_q
    rows.append(("Flat (exact)", "", t_build, 1.0, qps_exact, 4 * args.dim))
    sims, _ = flat.search(xq, 10)
    rand = np.einsum("ij,ij->i", xq, xb[rng.integers(0, args.n, len(xq))])
    print(
        f"median cosine: 1st neighbour {np.median(sims[:, 0]):.3f}, 10th {np.median(sims[:, 9]):.3f}, "
        f"random pair {np.median(rand):.3f}"
    )

    def run(factory: str, params_list: list[dict], train_n: int):
        index = new_faiss_index(factory, args.dim)

        def build():
            if not index.is_trained:
                index.train(xb[rng.choice(args.n, min(args.n, train_n), replace=False)])
            index.add(xb)

        _, tb = timed(build)
        bytes_per = faiss.serialize_index(index).size / args.n
        for params in params_list:
            apply_search_params(index, params)
            (_, got), tq = timed(lambda: index.search(xq, 10))
            rows.append(
                (
                    factory,
                    ",".join(f"{k}={v:g}" for k, v in params.items()),
                    tb,
                    recall_at(exact, got),
                    len(xq) / tq,
                    bytes_per,
                )
            )
            tb = float("nan")  # build time shown once per factory

    hnsw = plan_index(args.n, args.dim, "hnsw")
    run(hnsw.factory, [{"efSearch": 64}, hnsw.search_params, {"efSearch": 256}], 0)
    ivf = plan_index(args.n, args.dim, "ivfpq")
    run(
        ivf.factory,
        [
            ivf.search_params,
            {**ivf.search_params, "nprobe": 2 * ivf.search_params["nprobe"]},
            {**ivf.search_params, "k_factor": 8},
        ],
        ivf.train_size,
    )
    run(ivf.factory.rsplit(",", 1)[0], [{"nprobe": ivf.search_params["nprobe"]}], ivf.train_size)

    print(
        f"\n{'index':34s} {'search params':22s} {'build s':>8s} {'recall@10':>10s} {'queries/s':>10s} "
        f"{'x exact':>8s} {'bytes/vec':>9s}"
    )
    for name, params, tb, rec, qps, bpv in rows:
        tb_s = "" if tb != tb else f"{tb:8.1f}"
        print(f"{name:34s} {params:22s} {tb_s:>8s} {rec:10.3f} {qps:10.0f} {qps / qps_exact:8.1f} {bpv:9.0f}")


if __name__ == "__main__":
    main()
