"""Peak memory of the visual loss: chunked (asvr.train.model.visual_loss) vs naive.

Both compute, from the head states ``x [N, D, E]`` and one ``Linear(E, K)``
per depth, the mean over depths of the per-depth CE, then backward.  Naive
materialises the ``[N, D, K]`` logits (and autograd keeps the softmax); the
chunked Function keeps one ``chunk x K`` block.  Values and gradients are
compared in the same run.

Memory measurement:
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
  (exact bytes held by tensors), minus what was allocated before the step.
* CPU: each variant runs in a fresh subprocess; peak = ``ru_maxrss`` after
  the step minus the RSS just before it (large tensors are mmap'd by glibc,
  so RSS follows tensor memory; small-allocator noise is a few MB).

Usage::

    python bench/visual_loss_memory.py                 # CPU: N=729 D=8 K=16384 E=256 fp32
    python bench/visual_loss_memory.py --device cuda --width 2048 --images 4 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from asvr.train.model.visual_loss import linear_cross_entropy


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def setup(a, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = getattr(torch, a.dtype)
    n = a.images * 729
    x = (torch.randn(n, a.depth, a.width, generator=g) * 0.5).to(device, dt).requires_grad_(True)
    ws = [
        (torch.randn(a.k, a.width, generator=g) / a.width**0.5).to(device, dt).requires_grad_(True)
        for _ in range(a.depth)
    ]
    bs = [torch.zeros(a.k, device=device, dtype=dt, requires_grad=True) for _ in range(a.depth)]
    t = torch.randint(0, a.k, (n, a.depth), generator=g).to(device)
    return x, ws, bs, t


def step(variant, a, x, ws, bs, t):
    if variant == "naive":
        logits = torch.stack([F.linear(x[:, d], ws[d], bs[d]) for d in range(a.depth)], 1)  # [N, D, K]
        loss = torch.stack([F.cross_entropy(logits[:, d].float(), t[:, d]) for d in range(a.depth)]).mean()
    else:
        loss = (
            torch.stack(
                [linear_cross_entropy(x[:, d], ws[d], bs[d], t[:, d], a.chunk)[0] for d in range(a.depth)]
            ).mean()
            / x.shape[0]
        )
    loss.backward()
    return loss.detach()


def run_one(variant, a) -> dict:
    device = torch.device(a.device)
    x, ws, bs, t = setup(a, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        loss = step(variant, a, x, ws, bs, t)
        torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _rss_bytes()
        t0 = time.perf_counter()
        loss = step(variant, a, x, ws, bs, t)
        sec = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    grads = [x.grad] + [w.grad for w in ws] + [b.grad for b in bs]
    return {
        "variant": variant,
        "loss": float(loss),
        "peak_bytes": int(peak),
        "seconds": sec,
        "grad_norm": float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads))),
        "grads": [g.float().cpu() for g in grads] if a.keep_grads else None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=1, help="images per batch (729 positions each)")
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--k", type=int, default=16384)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--only", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--keep-grads", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if a.only:  # CPU child process: one variant, JSON on stdout
        r = run_one(a.only, a)
        r.pop("grads")
        print(json.dumps(r))
        return 0
    if a.device == "cuda":
        a.keep_grads = True
        res = [run_one(v, a) for v in ("naive", "chunked")]
        diff = max(float((g1 - g2).abs().max()) for g1, g2 in zip(res[0]["grads"], res[1]["grads"]))
    else:
        res = []
        for v in ("naive", "chunked"):
            out = subprocess.run(
                [sys.executable, __file__, "--only", v]
                + [
                    f"--{k.replace('_', '-')}={getattr(a, k)}"
                    for k in ("device", "images", "depth", "k", "width", "chunk", "dtype")
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            res.append(json.loads(out.stdout.strip().splitlines()[-1]))
        a.keep_grads = True  # gradients compared in-process on a smaller slice of the same problem
        small = argparse.Namespace(**{**vars(a), "k": min(a.k, 2048)})
        g1, g2 = run_one("naive", small)["grads"], run_one("chunked", small)["grads"]
        diff = max(float((x - y).abs().max()) for x, y in zip(g1, g2))
    n = a.images * 729
    print(
        f"visual loss, N={n} positions, D={a.depth}, K={a.k}, width={a.width}, {a.dtype} on {a.device}, chunk={a.chunk}"
    )
    print(
        f"naive [N,D,K] logits alone: {n * a.depth * a.k * torch.finfo(getattr(torch, a.dtype)).bits / 8 / 2**20:.0f} MiB"
    )
    print(f"{'variant':<8} {'loss':>10} {'peak MiB':>10} {'seconds':>8}")
    for r in res:
        print(f"{r['variant']:<8} {r['loss']:>10.6f} {r['peak_bytes'] / 2**20:>10.1f} {r['seconds']:>8.3f}")
    print(f"loss |diff| = {abs(res[0]['loss'] - res[1]['loss']):.2e}, max |grad diff| = {diff:.2e}")
    print(f"peak memory ratio naive / chunked = {res[0]['peak_bytes'] / max(res[1]['peak_bytes'], 1):.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
