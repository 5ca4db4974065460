"""Training throughput and MFU: the ASVR LVLM (visual head on) vs a plain
Hugging Face loop on the same LLM, same sequences.

Model: a ~1.3B Llama config (hidden 2048, 24 layers, 16 heads, intermediate
5504, vocab 32000), random weights, bf16 parameters, AdamW (fused on CUDA),
SDPA attention, no DeepSpeed, no gradient checkpointing.  Each sequence is
2048 tokens: BOS, one image of 27x27 = 729 positions, then 1318 text tokens
with labels.  ASVR adds the mlp2x_gelu projector (1152 -> 2048) and the
visual head (D=8, K=16384, width 2048, 3 layers) on the 729 image positions;
vision input ``codes`` with a random codebook tensor (no encoder is imported
or run, so this measures the LVLM step alone).  The baseline runs
``LlamaForCausalLM(input_ids, labels)``: logits for all 2048 positions.

FLOP accounting (model FLOPs, no recomputation counted):
* matmul FLOPs = 6 x (multiply-adds per token of every Linear it applies):
  LLM body params x all tokens; LM head x the tokens whose logits are
  computed (baseline: all, ASVR: label positions only); projector on image
  positions; visual head per image position: projector, D-1 code inputs,
  per depth 3 layers x (4 E^2 attention projections + 4 E^2 depth FFN), and
  one E x K classifier per depth;
* attention FLOPs = 12 x layers x hidden x T per token (PaLM's convention,
  counts the full T x T score matrix; the causal half is ``/2``), and the
  depth attention of the head (negligible, D=8).
MFU = model FLOPs / step time / peak bf16 dense (H100/H200 SXM: 989 TFLOP/s;
``--peak-tflops`` to override).  A square bf16 matmul is timed in the same run
to show the achievable rate.

Measured on one H200 (torch 2.11, transformers 5.17, batch 4 x 2048):
HF LLM only 42.7-43.6k tokens/s, 379-387 TFLOP/s (MFU 0.38-0.39 of spec,
0.485-0.49 of the 783-791 TFLOP/s measured matmul); ASVR 30.3-30.7k tokens/s,
337-341 TFLOP/s (0.34 / 0.43), i.e. 0.70-0.71x the tokens/s for +25% model
FLOPs; the visual head alone runs at 254 TFLOP/s (0.076 s/step).

Fair bare loop (issue 26): the loop above keeps bf16 parameters and no fp32
master copy, which is cheaper than what ``asvr-train`` does.  "ASVR fair" runs
the same LVLM with the CLI's numerics and no DeepSpeed: fp32 parameters
(the master weights) with the forward under ``torch.autocast(bfloat16)`` on
CUDA (fp32 on CPU, as the CLI), fp32 gradients and AdamW state, torch
``AdamW(fused=True)`` on CUDA (``foreach=True`` on CPU), gradient clipping at
1.0 (``clip_grad_norm_(foreach=True)``, no host read), as ``asvr-train
--zero 0`` does on one device.  The CLI is reported against both loops
(``bench/gpu_train_check.py``).  ``--gradient-checkpointing`` runs the ASVR
loops with recomputation (the CLI's flag of the same name); ``--json`` writes
the rows.

    python bench/train_mfu.py --tiny             # CPU smoke check (seconds)
    python bench/train_mfu.py                    # one H100/H200, ~1-2 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass, field

import torch

from asvr.train.data.batch import Batch
from asvr.train.config import ModelConfig, VisionSpec, VisualHeadConfig
from asvr.train.model.lvlm import build_model


@dataclass(kw_only=True)
class Setup:
    hidden: int = 2048
    layers: int = 24
    heads: int = 16
    intermediate: int = 5504
    vocab: int = 32000
    seq: int = 2048
    grid: tuple[int, int] = (27, 27)
    code_dim: int = 1152
    depth: int = 8
    codebook_size: int = 16384
    head: VisualHeadConfig = field(default_factory=VisualHeadConfig)
    batch: int = 4

    @classmethod
    def tiny(cls) -> "Setup":
        return cls(
            hidden=64,
            layers=2,
            heads=4,
            intermediate=128,
            vocab=300,
            seq=64,
            grid=(3, 3),
            code_dim=16,
            depth=3,
            codebook_size=64,
            head=VisualHeadConfig(proj_hidden=32, width=32, head_dim=8),
            batch=2,
        )

    @property
    def image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def llm_config(self) -> dict:
        return dict(
            model_type="llama",
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            intermediate_size=self.intermediate,
            max_position_embeddings=max(4096, self.seq),
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
        )


def make_batch(s: Setup, device, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    b, t, n_img = s.batch, s.seq, s.image_tokens
    ids = torch.randint(3, s.vocab, (b, t), generator=g)
    ids[:, 0] = 1
    image_mask = torch.zeros(b, t, dtype=torch.bool)
    image_mask[:, 1 : 1 + n_img] = True
    labels = ids.clone()
    labels[:, : 1 + n_img] = -100
    codes = torch.randint(0, s.codebook_size, (b, *s.grid, s.depth), generator=g)
    batch = Batch(
        input_ids=ids,
        labels=labels,
        position_ids=torch.arange(t).expand(b, t).contiguous(),
        sample_ids=torch.ones(b, t, dtype=torch.long),
        image_mask=image_mask,
        vision=codes,
        visual_codes=codes.flatten(1, 2),
        visual_loss_mask=torch.ones(b, dtype=torch.bool),
    )
    return batch.to(device)


# --------------------------------------------------------------------------- FLOPs
def llm_flops_per_step(s: Setup, llm, logit_tokens: int) -> tuple[float, int]:
    emb = llm.get_input_embeddings().weight.numel()
    head = llm.get_output_embeddings().weight.numel()
    body = sum(p.numel() for p in llm.parameters()) - emb - head
    tokens = s.batch * s.seq
    matmul = 6 * (body * tokens + head * logit_tokens)
    attn = 12 * s.layers * s.hidden * s.seq * tokens
    return float(matmul + attn), body + head


def asvr_extra_flops_per_step(s: Setup) -> float:
    h, e, d, k, c = s.head, s.head.width, s.depth, s.codebook_size, s.code_dim
    rows = s.batch * s.image_tokens
    projector = c * s.hidden + s.hidden * s.hidden
    per_row = (
        s.hidden * h.proj_hidden
        + h.proj_hidden * e
        + (d - 1) * c * e
        + h.layers * d * (4 * e * e + 2 * e * h.ffn_mult * e)
        + d * e * k
    )
    depth_attn = h.layers * 2 * d * d * e  # QK^T and AV over D depths, multiply-adds
    return float(6 * rows * (projector + per_row + depth_attn))


# --------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_loop(step, device, warmup: int, steps: int) -> tuple[float, float]:
    for _ in range(warmup):
        loss = step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    sec = (time.perf_counter() - t0) / steps
    return sec, float(loss)


def matmul_tflops(device, dtype) -> float:
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def peak_tflops(device, override: float | None) -> float | None:
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if "H100" in name or "H200" in name:
            return 989.4
    return None


def adamw(params, device, lr: float = 1e-5) -> torch.optim.AdamW:
    """torch AdamW as the CLI builds it: fused on CUDA, foreach on CPU (one kernel per group)."""
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.999), **kw)


def autocast(device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the CLI's fp32-master fast path), nothing on CPU (the CLI runs fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fair_step_fn(model, params: list, opt, batch, device, clip: float = 1.0):
    """One step of the fair bare loop: autocast forward, fp32 grads, clip (no host read), AdamW."""

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            loss, _ = model.training_forward(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        opt.step()
        return loss.detach()

    return step


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke check)")
    p.add_argument("--batch", type=int, help="sequences per step (default 4; tiny 2)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 2048; tiny 64)")
    p.add_argument("--warmup", type=int, help="untimed steps (default 3; tiny 1)")
    p.add_argument("--steps", type=int, help="timed steps (default 10; tiny 2)")
    p.add_argument("--peak-tflops", type=float, help="bf16 dense peak of the device")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (ASVR loops)")
    p.add_argument("--only-fair", action="store_true", help="run only the fair bare loop")
    p.add_argument("--json", help="also write the rows to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    s = Setup.tiny() if a.tiny else Setup()
    if a.batch:
        s.batch = a.batch
    if a.seq:
        s.seq = a.seq
    a.warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 3)
    a.steps = a.steps if a.steps is not None else (2 if a.tiny else 10)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    batch = make_batch(s, device)
    vision = VisionSpec(dim=s.code_dim, grid=s.grid, depth=s.depth, codebook_size=s.codebook_size)
    cfg = ModelConfig(
        llm=s.llm_config(),
        vision_input="codes",
        head=s.head,
        vision=vision,
        attn_implementation="sdpa",
        dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
        gradient_checkpointing=a.gradient_checkpointing,
    )
    codebooks = torch.randn(s.depth, s.codebook_size, s.code_dim, device=device) * 0.1
    t_build = time.perf_counter()
    with torch.device(device):  # initialise weights on the device: seconds instead of a minute on CPU
        model = build_model(cfg, codebooks=codebooks)
    model.train()
    print(
        f"built in {time.perf_counter() - t_build:.1f}s on {device} "
        f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})"
    )
    llm = model.llm
    tokens = s.batch * s.seq
    n_label = int((batch.labels[:, 1:] != -100).sum())
    fused = {"fused": True} if device.type == "cuda" else {}
    rows = []
    flops_llm, _ = llm_flops_per_step(s, llm, n_label)
    asvr_flops = flops_llm + asvr_extra_flops_per_step(s)
    head_sec = head_flops = float("nan")

    if not a.only_fair:
        # ---- baseline: plain HF loop on the LLM, same sequences, full logits
        model.set_gradient_checkpointing(False)
        opt = torch.optim.AdamW(llm.parameters(), lr=1e-5, **fused)

        def hf_step():
            opt.zero_grad(set_to_none=True)
            loss = llm(
                input_ids=batch.input_ids, labels=batch.labels, position_ids=batch.position_ids, use_cache=False
            ).loss
            loss.backward()
            opt.step()
            return loss.detach()

        sec, loss = timed_loop(hf_step, device, a.warmup, a.steps)
        flops, n_llm = llm_flops_per_step(s, llm, tokens)
        rows.append(("HF LLM only", sec, loss, flops, peak_mem(device)))
        del opt
        for prm in llm.parameters():
            prm.grad = None
        model.set_gradient_checkpointing(a.gradient_checkpointing)

        # ---- ASVR: text loss + visual head loss, everything trained, bf16 parameters (no master copy)
        groups = model.set_stage("sft")
        opt = torch.optim.AdamW([q for g in groups for q in g["params"]], lr=1e-5, **fused)

        def asvr_step():
            opt.zero_grad(set_to_none=True)
            loss, _ = model.training_forward(batch)
            loss.backward()
            opt.step()
            return loss.detach()

        sec, loss = timed_loop(asvr_step, device, a.warmup, a.steps)
        rows.append(("ASVR (visual head on)", sec, loss, asvr_flops, peak_mem(device)))
        del opt
        head_sec, head_flops = time_head(model, s, batch, cfg, device, dtype, a.steps)
    n_llm = sum(q.numel() for q in llm.parameters()) - llm.get_input_embeddings().weight.numel()
    n_all = sum(q.numel() for q in model.parameters())

    # ---- ASVR fair: the CLI's numerics without DeepSpeed (fp32 master + bf16 autocast, fused AdamW, clip)
    model.float()
    for prm in model.parameters():
        prm.grad = None
    groups = model.set_stage("sft")
    params = [q for g in groups for q in g["params"] if q.requires_grad]
    opt = adamw(params, device)
    sec, loss = timed_loop(fair_step_fn(model, params, opt, batch, device), device, a.warmup, a.steps)
    rows.append(("ASVR fair (fp32 master)", sec, loss, asvr_flops, peak_mem(device)))
    report(a, s, device, dtype, rows, tokens, n_llm, n_all, head_sec, head_flops)
    return 0


def peak_mem(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def time_head(model, s: Setup, batch, cfg, device, dtype, steps: int) -> tuple[float, float]:
    """The visual head alone (projector-free part of the overhead), same rows: (s/step, FLOPs)."""
    codes = batch.visual_codes.reshape(-1, s.depth)
    rows_in = torch.randn(codes.shape[0], s.hidden, device=device, dtype=dtype, requires_grad=True)
    ctx = model.vision.code_context(codes)

    def head_step():
        sums, _ = model.head.loss(rows_in, ctx, codes, cfg.visual_loss_chunk)
        loss = sums.sum() / codes.shape[0]
        loss.backward()
        return loss.detach()

    head_sec, _ = timed_loop(head_step, device, 1, steps)
    head_flops = asvr_extra_flops_per_step(s) - 6 * codes.shape[0] * (s.code_dim * s.hidden + s.hidden * s.hidden)
    return head_sec, head_flops


def report(a, s: Setup, device, dtype, rows, tokens, n_llm, n_all, head_sec, head_flops) -> None:
    peak = peak_tflops(device, a.peak_tflops)
    mm = matmul_tflops(device, dtype)
    print(
        f"LLM params {n_llm / 1e6:.1f}M without input embeddings, LVLM params {n_all / 1e6:.1f}M; batch {s.batch} x {s.seq} "
        f"tokens, {s.image_tokens} image positions per sequence, D={s.depth}, K={s.codebook_size}"
        f"{', gradient checkpointing' if a.gradient_checkpointing else ''}"
    )
    print(f"dense matmul in this run: {mm:.1f} TFLOP/s; peak used for MFU: {peak or 'n/a'} TFLOP/s")
    print("MFU = model TFLOP/s / spec peak; MFU@mm = / the dense matmul rate measured above")
    print(
        f"{'loop':<24}{'step s':>9}{'tokens/s':>11}{'TFLOP/step':>12}{'TFLOP/s':>9}{'MFU':>7}{'MFU@mm':>8}"
        f"{'peak GiB':>10}{'loss':>9}"
    )
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "loops": {}}
    for name, sec, loss, flops, mem in rows:
        tflops = flops / sec / 1e12
        mfu = f"{tflops / peak:.3f}" if peak else "n/a"
        print(
            f"{name:<24}{sec:>9.4f}{tokens / sec:>11.0f}{flops / 1e12:>12.2f}{tflops:>9.1f}{mfu:>7}{tflops / mm:>8.3f}"
            f"{mem:>10.1f}{loss:>9.3f}"
        )
        out["loops"][name] = {
            "step_time_s": sec,
            "tokens_per_s": tokens / sec,
            "model_tflops": tflops,
            "mfu": tflops / peak if peak else None,
            "gpu_mem_peak_gib": None if mem != mem else mem,
            "loss": loss,
        }
    by = {name: sec for name, sec, *_ in rows}
    if head_sec == head_sec:
        print(
            f"visual head alone (fwd+bwd, no optimizer): {head_sec:.4f} s/step, {head_flops / head_sec / 1e12:.1f} TFLOP/s"
        )
    if "HF LLM only" in by:
        print(f"ASVR / HF tokens/s = {by['HF LLM only'] / by['ASVR (visual head on)']:.3f}")
        print(
            f"ASVR fair / ASVR bf16-params tokens/s = {by['ASVR (visual head on)'] / by['ASVR fair (fp32 master)']:.3f}"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
