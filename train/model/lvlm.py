"""The ASVR LVLM: any Hugging Face causal LM + vision projector + visual head.

Composition, one module for every backbone (Llama/Vicuna, Qwen2, Mistral are
tested): the LLM's input embedding module embeds the text, projected vision
features are scattered into the image positions, the *base* model runs on
``inputs_embeds``, and the LM head is applied only to the positions that
carry a text label.  No model file is copied or patched.

``training_forward(batch)`` returns ``(loss, metrics)`` with

    loss = text CE (shifted, mean over label tokens)
         + visual_loss_weight * mean_d visual CE_d (mean over image positions)

metrics: ``loss, loss_text, loss_visual, loss_visual_d{d}`` and
``acc_visual_d{d}`` (teacher-forced top-1) for ``d = 0..D-1``,
``n_text_tokens, n_visual_tokens`` - detached tensors (no host sync here;
call ``.item()`` when logging).  A batch without label tokens has
``loss_text = 0``; images whose ``visual_loss_mask`` is False, and samples
without an image, add nothing to the visual loss.  The projector and the
head still run on empty tensors then, so every trainable parameter gets a
(zero) gradient each step, which DDP/ZeRO need.

Packed rows: a 4D additive float mask ``[B, 1, T, T]`` (block-diagonal causal
from ``sample_ids``; padding attends only to itself so no row is all -inf)
goes to the HF model with ``position_ids``, ``attn_implementation="sdpa"``.
Rows holding a single unpadded sample get no mask (SDPA's ``is_causal``
fast path).  With ``flash_attention_2`` the mask is dropped and HF derives
the varlen segments from ``position_ids`` restarting at 0.

Not supported: LLMs whose logits are post-processed after the LM head
(e.g. Gemma-2 final-logit soft-capping); ``build_model`` refuses them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from asvr.core.errors import check_fingerprint

from asvr.train.data.batch import Batch
from asvr.train.config import STAGES
from asvr.train.model.config import ModelConfig, VisionSpec
from asvr.train.model.projector import build_projector
from asvr.train.model.vision_input import VisionInput, get_vision_input
from asvr.train.model.vision_tower import VisionTower, check_tower_grid, load_vision_tower
from asvr.train.model.visual_head import VisualHead
from asvr.train.model.visual_loss import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedModel


# --------------------------------------------------------------------------- attention
def packed_causal_mask(sample_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T]`` sample ids (0 = padding) -> additive mask ``[B, 1, T, T]``:
    0 where query and key are in the same sample and key <= query, else the
    dtype's minimum.  Padding queries see only themselves."""
    t = sample_ids.shape[1]
    same = sample_ids[:, :, None] == sample_ids[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=sample_ids.device).tril()
    allowed = same & causal & (sample_ids[:, :, None] > 0)
    allowed |= torch.eye(t, dtype=torch.bool, device=sample_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=sample_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def resolve_attn_implementation(name: str) -> str:
    if name != "auto":
        return name
    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        return "flash_attention_2"
    return "sdpa"


# --------------------------------------------------------------------------- the model
def _input_embeddings(llm: PreTrainedModel) -> nn.Embedding:
    """The LLM's token embedding (transformers types it a plain Module)."""
    return cast(nn.Embedding, llm.get_input_embeddings())


class ASVRModel(nn.Module):
    # Typed here: torch's Module.__getattr__ types submodules Tensor | Module.
    llm: PreTrainedModel

    def __init__(self, cfg: ModelConfig, llm: PreTrainedModel, vision: VisionInput):
        super().__init__()
        if cfg.vision is None:
            raise ValueError("ModelConfig.vision must be set (build_model fills it from the tokenizer)")
        self.cfg = cfg
        self.llm = llm
        self.vision = vision
        hidden = _input_embeddings(llm).embedding_dim
        v = cfg.vision
        self.projector = build_projector(cfg.projector, cfg.input_dim, hidden)
        self.head = VisualHead(cfg.head, hidden, v.dim, v.depth, v.codebook_size)
        self.attn_implementation = llm.config._attn_implementation
        self.set_gradient_checkpointing(cfg.gradient_checkpointing)

    # ------------------------------------------------------------------ stages
    def _groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "projector": list(self.projector.parameters()),
            "visual_head": list(self.head.parameters()),
            "llm": list(self.llm.parameters()),
        }

    def trainable_parameters(self, stage: str) -> list[dict[str, Any]]:
        """Optimizer parameter groups that ``stage`` trains, ``[{"name", "params"}]``:
        pretrain: projector + visual head; sft: also the LLM.  The frozen
        tokenizer (encoder, codebooks) is never trained."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        names = ["projector", "visual_head"] + (["llm"] if stage == "sft" else [])
        groups = self._groups()
        seen: set[int] = set()
        out = []
        for n in names:
            ps = [p for p in groups[n] if id(p) not in seen]
            seen.update(id(p) for p in ps)
            out.append({"name": n, "params": ps})
        return out

    def set_stage(self, stage: str) -> list[dict[str, Any]]:
        """Set ``requires_grad`` for ``stage``; returns its parameter groups."""
        groups = self.trainable_parameters(stage)
        self.requires_grad_(False)
        for g in groups:
            for p in g["params"]:
                p.requires_grad_(True)
        return groups

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute LLM decoder layers (HF's checkpointing, non-reentrant so a
        frozen LLM still passes gradients to the projector) and head layers."""
        kw = {"use_reentrant": False}
        if hasattr(self.llm, "activation_checkpointing_enable"):  # transformers >= 5.2x names
            if enabled:
                self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                self.llm.activation_checkpointing_disable()
        elif enabled:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        else:
            self.llm.gradient_checkpointing_disable()
        self.head.gradient_checkpointing = enabled

    # ------------------------------------------------------------------ pieces
    @property
    def vision_spec(self) -> VisionSpec:
        """``cfg.vision``, always set (the constructor refuses a config without one)."""
        assert self.cfg.vision is not None
        return self.cfg.vision

    @property
    def hidden_size(self) -> int:
        return _input_embeddings(self.llm).embedding_dim

    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor, vision: torch.Tensor | None) -> torch.Tensor:
        """Text embeddings with projected vision features in the image positions."""
        embed = _input_embeddings(self.llm)
        ids = input_ids.masked_fill(image_mask, 0).clamp(0, embed.num_embeddings - 1)
        x = embed(ids)
        feats = self.vision(vision)
        n_pos = int(image_mask.sum())
        if feats.shape[0] * feats.shape[1] != n_pos:
            raise ValueError(f"{feats.shape[0]} images x {feats.shape[1]} tokens do not fill {n_pos} image positions")
        proj = self.projector(feats.reshape(-1, feats.shape[-1]).to(x.dtype))
        return x.masked_scatter(image_mask[..., None], proj.to(x.dtype)) if n_pos else x + 0 * proj.sum()

    def target_rows(self, h: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states of the image positions that carry a visual target, ``[N*H*W, H]``
        in image order (a cls_patch tower's CLS position, first in each image, has none)."""
        rows = h[image_mask]
        extra = self.cfg.image_tokens - self.vision_spec.tokens_per_image
        if extra:
            rows = rows.view(-1, self.cfg.image_tokens, rows.shape[-1])[:, extra:].reshape(-1, rows.shape[-1])
        return rows

    def attention_mask(self, sample_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        if self.attn_implementation == "flash_attention_2":
            return None
        if bool((sample_ids == 1).all()):
            return None  # one unpadded sample per row: plain causal
        return packed_causal_mask(sample_ids, dtype)

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """Last hidden states ``[B, T, H]`` of the base model."""
        x = self.embed(batch.input_ids, batch.image_mask, batch.vision)
        out = self.llm.base_model(
            inputs_embeds=x,
            attention_mask=self.attention_mask(batch.sample_ids, x.dtype),
            position_ids=batch.position_ids,
            use_cache=False,
        )
        return out.last_hidden_state

    # ------------------------------------------------------------------ losses
    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.training_forward(batch)

    def training_forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h = self.hidden_states(batch)
        loss_text, n_text = self._text_loss(h, batch)
        sums, hits, n_vis = self._visual_loss_sums(h, batch)
        denom = max(n_vis, 1)
        per_depth = sums / denom
        loss_visual = per_depth.mean()
        loss = loss_text + self.cfg.visual_loss_weight * loss_visual
        metrics: dict[str, torch.Tensor] = {
            "loss": loss.detach(),
            "loss_text": loss_text.detach(),
            "loss_visual": loss_visual.detach(),
            "n_text_tokens": torch.tensor(n_text),
            "n_visual_tokens": torch.tensor(n_vis),
        }
        for d in range(per_depth.shape[0]):
            metrics[f"loss_visual_d{d}"] = per_depth[d].detach()
            metrics[f"acc_visual_d{d}"] = hits[d].detach().float() / denom
        return loss, metrics

    def _text_loss(self, h: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, int]:
        labels = batch.labels[:, 1:]
        keep = (labels != IGNORE_INDEX) & (batch.sample_ids[:, 1:] == batch.sample_ids[:, :-1])
        rows = h[:, :-1][keep]
        logits = self.llm.get_output_embeddings()(rows).float()
        n = int(keep.sum())
        return F.cross_entropy(logits, labels[keep], reduction="sum") / max(n, 1), n

    def _visual_loss_sums(self, h: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, int]:
        v = self.vision_spec
        rows = self.target_rows(h, batch.image_mask)  # [N*HW, H] in image order
        n_img = rows.shape[0] // v.tokens_per_image
        if batch.visual_codes is None or n_img == 0:
            keep = torch.zeros(rows.shape[0], dtype=torch.bool, device=h.device)
            codes = torch.zeros(rows.shape[0], v.depth, dtype=torch.long, device=h.device)
        else:
            codes = batch.visual_codes.reshape(-1, v.depth)
            if codes.shape[0] != rows.shape[0]:
                raise ValueError(
                    f"visual_codes give {codes.shape[0]} positions, the batch has {rows.shape[0]} image positions"
                )
            img_keep = (
                batch.visual_loss_mask
                if batch.visual_loss_mask is not None
                else torch.ones(n_img, dtype=torch.bool, device=h.device)
            )
            keep = img_keep.to(h.device).repeat_interleave(v.tokens_per_image)
        rows, codes = rows[keep], codes[keep].to(h.device)
        if batch.text_only_codes is not None and batch.text_only_codes.numel():
            # the ASVR code gives each text-only sample zero hidden states and a grey dummy image's codes
            extra = batch.text_only_codes.reshape(-1, v.depth).to(h.device)
            rows = torch.cat([rows, rows.new_zeros(extra.shape[0], rows.shape[1])])
            codes = torch.cat([codes, extra])
        sums, hits = self.head.loss(rows, self.vision.code_context(codes), codes, self.cfg.visual_loss_chunk)
        return sums, hits, rows.shape[0]

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        image_mask: torch.Tensor,
        vision: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Greedy generation (HF ``generate`` on ``inputs_embeds`` with a KV cache).
        ``input_ids``/``image_mask`` ``[B, T]`` as in :class:`Batch` (left-pad
        several prompts and give the 2D ``attention_mask``).  Returns the new
        token ids ``[B, <= max_new_tokens]``."""
        x = self.embed(input_ids, image_mask, vision)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        kw = dict(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
        if self.llm.generation_config.pad_token_id is None and self.llm.generation_config.eos_token_id is not None:
            kw["pad_token_id"] = self.llm.generation_config.eos_token_id
        kw.update(generate_kwargs)
        # A causal LM: generate comes from GenerationMixin, which the PreTrainedModel type lacks.
        return self.llm.generate(inputs_embeds=x, attention_mask=attention_mask, **kw)  # type: ignore[operator]

    @torch.no_grad()
    def predict_codes(self, batch: Batch) -> torch.Tensor:
        """Greedy visual codes ``[N_images, H*W, D]`` from the head (no teacher forcing)."""
        h = self.hidden_states(batch)
        rows = self.target_rows(h, batch.image_mask)
        codes = self.head.predict(rows, lambda c: self.vision.quantizer.cumulative(c))
        return codes.view(-1, self.vision_spec.tokens_per_image, self.vision_spec.depth)

    def exported_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights to export: LLM, projector, head; not the frozen tokenizer."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vision.")}


# --------------------------------------------------------------------------- builders
def load_llm_config(llm: str | dict, trust_remote_code: bool = False):
    from transformers import AutoConfig

    if isinstance(llm, dict):
        d = dict(llm)
        if "model_type" not in d:
            raise ValueError("an LLM config dict needs a model_type (llama, qwen2, mistral, ...)")
        return AutoConfig.for_model(d.pop("model_type"), **d)
    p = Path(llm)
    if p.is_file() and p.suffix == ".json":
        return load_llm_config(json.loads(p.read_text()), trust_remote_code)
    if not p.is_dir():
        raise FileNotFoundError(f"LLM {llm!r} is neither a folder nor a config .json (nothing is downloaded)")
    return AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code, local_files_only=True)


def _check_supported(config) -> None:
    if getattr(config, "final_logit_softcapping", None):
        raise ValueError(f"{config.model_type}: final-logit soft-capping is not supported by this LVLM")


def build_llm(cfg: ModelConfig) -> PreTrainedModel:
    """The HF causal LM of ``cfg.llm``: weights from a folder that has them, random init from a config."""
    from transformers import AutoModelForCausalLM

    attn = resolve_attn_implementation(cfg.attn_implementation)
    config = load_llm_config(cfg.llm, cfg.trust_remote_code)
    _check_supported(config)
    folder = Path(cfg.llm) if isinstance(cfg.llm, str) else None
    has_weights = (
        folder is not None and folder.is_dir() and any(f.suffix in (".safetensors", ".bin") for f in folder.iterdir())
    )
    if has_weights and isinstance(cfg.llm, str):  # has_weights: cfg.llm is a folder path
        return AutoModelForCausalLM.from_pretrained(
            cfg.llm,
            dtype=cfg.torch_dtype,
            attn_implementation=attn,
            trust_remote_code=cfg.trust_remote_code,
            local_files_only=True,
        )
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(
        config, dtype=cfg.torch_dtype, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code
    )


def build_model(
    cfg: ModelConfig,
    tokenizer=None,
    *,
    codebooks: torch.Tensor | None = None,
    llm: PreTrainedModel | None = None,
    tower: VisionTower | None = None,
) -> ASVRModel:
    """Build the LVLM.  ``tokenizer`` (a ``SemanticTokenizer``) gives the vision
    spec, the frozen codebooks and, for ``online``, the default tower (its
    encoder).  Without it pass ``codebooks`` ``[D or 1, K, C]`` and
    ``cfg.vision``.  ``tower``: the ``VisionTower`` an ``online`` model runs
    (default: rebuilt from ``cfg.vision_tower``, else the tokenizer's encoder).
    ``llm`` skips ``build_llm``."""
    if tokenizer is not None:
        s = tokenizer.spec
        cfg.vision = VisionSpec(
            dim=s.dim,
            grid=tuple(s.grid),
            depth=s.depth,
            codebook_size=s.codebook_size,
            fingerprint=s.fingerprint,
            path=str(Path(tokenizer.path).resolve()) if tokenizer.path else None,
        )
        codebooks = tokenizer.quantizer.codebooks
    elif codebooks is None or cfg.vision is None:
        raise ValueError("build_model needs a tokenizer, or codebooks and cfg.vision")
    if cfg.vision_tower is not None:
        check_tower_grid(cfg.vision_tower, cfg.vision.grid)
    if get_vision_input(cfg.vision_input).model_runs_tower and tower is None:
        if cfg.vision_tower is not None:
            tower = load_vision_tower(cfg.vision_tower)
        elif tokenizer is not None:
            tower = VisionTower.from_tokenizer(tokenizer)
    if tower is not None and cfg.vision_tower is not None:
        check_fingerprint(
            tower.spec.fingerprint, cfg.vision_tower.fingerprint, "the vision tower given", "the configured one"
        )
    vision = VisionInput(cfg.vision_input, cfg.vision, codebooks, tower, tokens=cfg.image_tokens, dim=cfg.input_dim)
    llm = build_llm(cfg) if llm is None else llm
    model = ASVRModel(cfg, llm, vision)
    model.projector.to(cfg.torch_dtype)
    model.head.to(cfg.torch_dtype)
    return model
