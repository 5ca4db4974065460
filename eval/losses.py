"""Held-out losses: text loss / perplexity and visual-token accuracy per depth.

The held-out conversations go through the trainer's own data path
(``assemble_data`` -> ``Collator`` -> :class:`~asvr.train.data.batch.Batch`),
so templates, image placement and visual targets are exactly what training
saw.  Samples are batched one per row, longest first (little padding); the
results are sums over all tokens / positions, so they do not depend on the
batching.

Per batch one LLM forward (``model.hidden_states``) gives

* text: CE and top-1 hits of the LM head on the label positions (the same
  shifted, per-sample positions as ``training_forward``), in row chunks so a
  150k vocabulary never makes a ``[tokens, V]`` block larger than
  ``chunk x V``;
* visual, teacher-forced (the training objective): the head's per-depth
  states given the ground-truth codes of the shallower depths, then per depth
  the CE, hits@1 (argmax, as the training metric) and hits@k (top-k) of the
  classifier, in row chunks: peak extra memory ``chunk x K`` floats, never
  ``[N, D, K]`` (8 x 729 x 16384 fp32 is 382 MB per image);
* visual, free-running ("greedy"): the head's own codes depth by depth
  (``VisualHead.predict``, row-chunked), accuracy per depth against the
  targets: how well the model reconstructs the codes without being told the
  coarser ones.

Perplexity is ``exp`` of the token-weighted mean text CE.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from asvr.train.data.batch import Batch
from asvr.train.data.dataset import DataConfig, assemble_data, open_codes
from asvr.train.data.packing import PackingConfig
from asvr.train.model.vision_input import get_vision_input
from asvr.train.model.visual_loss import IGNORE_INDEX

from asvr.eval.loading import EvalError, LoadedModel


# --------------------------------------------------------------------------- chunked scoring
@torch.no_grad()
def chunked_scores(
    x: torch.Tensor, logits_fn, target: torch.Tensor, ks: Sequence[int] = (5,), chunk: int = 1024
) -> tuple[float, torch.Tensor, dict[int, int]]:
    """``logits_fn(x[rows]) -> [rows, K]`` scored ``chunk`` rows at a time.

    Returns (CE sum, argmax-correct bool ``[N]``, ``{k: rows whose target is in the top k}``).
    Logits are reduced in at least fp32; memory peaks at one ``chunk x K`` block."""
    ce = 0.0
    hit1 = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    topk = {k: 0 for k in ks}
    for s in range(0, x.shape[0], chunk):
        logits = logits_fn(x[s : s + chunk])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        t = target[s : s + chunk]
        ce += float(F.cross_entropy(logits, t, reduction="sum"))
        hit1[s : s + chunk] = logits.argmax(-1) == t
        if ks:
            top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
            for k in ks:
                topk[k] += int((top[:, :k] == t[:, None]).any(-1).sum())
    return ce, hit1, topk


@dataclass
class LossSums:
    """Sums over tokens / positions; ``+`` adds two batches."""

    depth: int
    ks: tuple[int, ...] = (5,)
    text_ce: float = 0.0
    text_tokens: int = 0
    text_hits: int = 0
    vis_positions: int = 0
    vis_ce: list[float] = field(default_factory=list)
    vis_hits1: list[int] = field(default_factory=list)
    vis_hitsk: dict[int, list[int]] = field(default_factory=dict)
    vis_greedy_hits: list[int] = field(default_factory=list)
    vis_all_depths: int = 0
    """Positions whose teacher-forced argmax is right at every depth."""
    images: int = 0

    def __post_init__(self):
        d = self.depth
        self.vis_ce = self.vis_ce or [0.0] * d
        self.vis_hits1 = self.vis_hits1 or [0] * d
        self.vis_hitsk = self.vis_hitsk or {k: [0] * d for k in self.ks}
        self.vis_greedy_hits = self.vis_greedy_hits or [0] * d

    def add(self, o: "LossSums") -> None:
        self.text_ce += o.text_ce
        self.text_tokens += o.text_tokens
        self.text_hits += o.text_hits
        self.vis_positions += o.vis_positions
        self.vis_all_depths += o.vis_all_depths
        self.images += o.images
        for d in range(self.depth):
            self.vis_ce[d] += o.vis_ce[d]
            self.vis_hits1[d] += o.vis_hits1[d]
            self.vis_greedy_hits[d] += o.vis_greedy_hits[d]
            for k in self.ks:
                self.vis_hitsk[k][d] += o.vis_hitsk[k][d]


@torch.no_grad()
def batch_sums(model, batch: Batch, ks: Sequence[int] = (5,), chunk: int = 1024, greedy: bool = True) -> LossSums:
    """Text and visual sums of one batch (see module doc).  ``model`` is an ``ASVRModel``."""
    v = model.cfg.vision
    out = LossSums(depth=v.depth, ks=tuple(ks))
    h = model.hidden_states(batch)

    # text: the shifted label positions of each sample (as training_forward)
    labels = batch.labels[:, 1:]
    keep = (labels != IGNORE_INDEX) & (batch.sample_ids[:, 1:] == batch.sample_ids[:, :-1])
    if keep.any():
        ce, hit, _ = chunked_scores(h[:, :-1][keep], model.llm.get_output_embeddings(), labels[keep], (), chunk)
        out.text_ce, out.text_tokens, out.text_hits = ce, int(keep.sum()), int(hit.sum())

    # visual: the image positions whose image has a visual target
    rows = model.target_rows(h, batch.image_mask)
    n_img = rows.shape[0] // v.tokens_per_image
    if batch.visual_codes is None or n_img == 0:
        return out
    codes = batch.visual_codes.reshape(-1, v.depth).to(h.device)
    img_keep = batch.visual_loss_mask if batch.visual_loss_mask is not None else torch.ones(n_img, dtype=torch.bool)
    keep_rows = img_keep.to(h.device).repeat_interleave(v.tokens_per_image)
    rows, codes = rows[keep_rows], codes[keep_rows]
    out.images = int(img_keep.sum())
    out.vis_positions = rows.shape[0]
    if rows.shape[0] == 0:
        return out
    states = model.head.states(rows, model.vision.code_context(codes))  # [N, D, width]
    all_right = torch.ones(rows.shape[0], dtype=torch.bool, device=h.device)
    for d, clf in enumerate(model.head.classifiers):
        ce, hit1, topk = chunked_scores(states[:, d], clf.logits, codes[:, d], ks, chunk)
        out.vis_ce[d], out.vis_hits1[d] = ce, int(hit1.sum())
        for k in ks:
            out.vis_hitsk[k][d] = topk[k]
        all_right &= hit1
    out.vis_all_depths = int(all_right.sum())
    if greedy:
        cumulative = model.vision.quantizer.cumulative
        for s in range(0, rows.shape[0], chunk):
            pred = model.head.predict(rows[s : s + chunk], cumulative)
            right = (pred == codes[s : s + chunk]).sum(0)
            for d in range(v.depth):
                out.vis_greedy_hits[d] += int(right[d])
    return out


# --------------------------------------------------------------------------- the held-out set
@dataclass(kw_only=True)
class LossEvalConfig:
    """The held-out set and how it is measured: the options of ``asvr-eval loss`` (``asvr.core.config_cli``)."""

    codes: str
    """Code shards holding the held-out images (written with the model's tokenizer)."""
    data: list[str]
    """Held-out LLaVA JSON file(s)."""
    images: str | None = None
    """Image root (needed by online/features models)."""
    batch_size: int = 8
    """Samples per forward pass."""
    max_samples: int | None = None
    """Only the first N usable samples (file order)."""
    max_len: int = 4096
    """Tokens per sample: longer samples are truncated after their image (refused when the image does not fit)."""
    topk: int = 5
    """k of the visual acc@k."""
    chunk: int = 1024
    """Rows per classifier chunk (memory: chunk x K floats)."""
    greedy: bool = field(default=True, metadata={"flag": "--no-greedy"})
    """(--no-greedy) skip the free-running (non-teacher-forced) code accuracy."""
    skip_bad_samples: bool = False
    """Skip malformed/missing samples instead of failing."""
    progress: bool = field(default=True, metadata={"flag": "--quiet"})
    """(--quiet) no progress bar."""

    def __post_init__(self):
        if self.batch_size < 1 or self.chunk < 1 or self.topk < 1:
            raise EvalError("--batch-size, --chunk and --topk must be >= 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise EvalError("--max-samples must be >= 1")


def evaluate_loss(lm: LoadedModel, cfg: LossEvalConfig) -> dict:
    """Run the held-out evaluation; returns the report dict (see :func:`summarize`)."""
    from tqdm import tqdm

    model = lm.model
    if get_vision_input(lm.vision_input).uses_tower and not cfg.images:
        raise EvalError(f"this model's vision input is {lm.vision_input!r}: pass --images (the image root)")
    store = open_codes(cfg.codes, model.cfg.vision)
    dcfg = DataConfig(
        data=cfg.data,
        codes=cfg.codes,
        images=cfg.images,
        vision_input=lm.vision_input,
        image_tokens=model.cfg.image_tokens,
        skip_bad_samples=cfg.skip_bad_samples,
        packing=PackingConfig(max_len=cfg.max_len, pack=False),
    )
    data, collate = assemble_data(dcfg, lm.template, lm.text_tokenizer, store, tower=lm.tower, progress=False)
    n = len(data.samples) if cfg.max_samples is None else min(cfg.max_samples, len(data.samples))
    order = sorted(range(n), key=lambda i: -len(data.samples[i].encoded))
    batches = [order[s : s + cfg.batch_size] for s in range(0, n, cfg.batch_size)]
    assert model.cfg.vision is not None  # ASVRModel refuses a config without one
    total = LossSums(depth=model.cfg.vision.depth, ks=(cfg.topk,))
    t0 = time.perf_counter()
    model.eval()
    for idx in tqdm(batches, desc="held-out loss", unit="batch", disable=not cfg.progress):
        batch = collate([[i] for i in idx]).to(lm.device)
        total.add(batch_sums(model, batch, (cfg.topk,), cfg.chunk, cfg.greedy))
    out = summarize(total, n_samples=n, n_bad=len(data.bad), seconds=time.perf_counter() - t0, topk=cfg.topk)
    out["preprocess"] = store.meta.preprocess  # the LLM's images are preprocessed as the targets were
    return out


def _ratio(a: float, b: int) -> float | None:
    return a / b if b else None


def summarize(s: LossSums, *, n_samples: int, n_bad: int, seconds: float, topk: int) -> dict:
    text_loss = _ratio(s.text_ce, s.text_tokens)
    depths = []
    for d in range(s.depth):
        depths.append(
            {
                "depth": d,
                "loss": _ratio(s.vis_ce[d], s.vis_positions),
                "acc1": _ratio(s.vis_hits1[d], s.vis_positions),
                f"acc{topk}": _ratio(s.vis_hitsk[topk][d], s.vis_positions),
                "acc_greedy": _ratio(s.vis_greedy_hits[d], s.vis_positions),
            }
        )
    vis_losses = [x["loss"] for x in depths if x["loss"] is not None]
    return {
        "n_samples": n_samples,
        "n_bad_samples_skipped": n_bad,
        "n_images": s.images,
        "seconds": seconds,
        "text": {
            "tokens": s.text_tokens,
            "loss": text_loss,
            "perplexity": math.exp(text_loss) if text_loss is not None and text_loss < 700 else None,
            "acc1": _ratio(s.text_hits, s.text_tokens),
        },
        "visual": {
            "positions": s.vis_positions,
            "topk": topk,
            "loss": sum(vis_losses) / len(vis_losses) if vis_losses else None,
            "acc1_all_depths": _ratio(s.vis_all_depths, s.vis_positions),
            "per_depth": depths,
        },
        "sums": asdict(s),
    }
