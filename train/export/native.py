"""Export / load a trained LVLM as a self-describing folder.

Folder layout::

    asvr_config.json        format version, ModelConfig (vision spec with the tokenizer
                            path and fingerprint), weight dtype, and ``inputs``: how the
                            model was trained to read its inputs (conversation template,
                            image preprocessing square/pad, image size, resample;
                            :class:`TrainedInputs`), which ``asvr-eval`` and
                            ``asvr-export --hf-llava`` use unless told otherwise
    model.safetensors       LLM (``llm.*``), projector (``projector.*``), visual head
                            (``head.*``); tied weights stored once
    config.json             the LLM's Hugging Face config (+ generation_config.json)
                            (``asvr_config.json``'s ``vision_tower`` records a --vision-tower:
                            encoder spec with its absolute path and weights sha256, layer,
                            select, grid, fingerprint; absent: the tokenizer's encoder)
    tokenizer files         the LLM's text tokenizer, when given to ``save_exported``

``asvr-train`` writes it to ``RUN/final``; ``save_exported`` writes the whole
folder atomically (``asvr.core.atomic.atomic_dir``).  The frozen
semantic tokenizer (encoder + codebooks) is *not* copied: it is referenced by
path and fingerprint, and ``load_exported`` refuses a tokenizer whose
fingerprint differs (:class:`~asvr.core.errors.FingerprintError`).

Loading from Python::

    from asvr.train.export.native import load_exported
    from asvr.tokenizer.model import SemanticTokenizer
    from transformers import AutoTokenizer

    model = load_exported("runs/sft/final", device="cuda")           # tokenizer from the recorded path
    # or, when the tokenizer artifact moved:
    model = load_exported("runs/sft/final", device="cuda", tokenizer=SemanticTokenizer.load("tok/"))
    text_tok = AutoTokenizer.from_pretrained("runs/sft/final")
    new_ids = model.generate(input_ids, image_mask, vision=pixels_or_features_or_codes, max_new_tokens=64)

Keys are checked strictly: a missing or unexpected tensor, or a shape
mismatch, is an error (never a silent random init).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from asvr.core.atomic import atomic_dir
from asvr.core.errors import AsvrError, check_fingerprint

from asvr.train.model.config import ModelConfig, VisionSpec
from asvr.train.model.lvlm import ASVRModel, build_model

FORMAT_VERSION = 1
CONFIG_FILE = "asvr_config.json"
WEIGHTS_FILE = "model.safetensors"


class ExportError(AsvrError):
    pass


@dataclass(frozen=True, kw_only=True)
class TrainedInputs:
    """How the model was trained to read its inputs; recorded in ``asvr_config.json`` (``inputs``)."""

    template: str
    """The conversation template (``vicuna_v1``, ``chatml``, ``plain``, ...)."""
    preprocess: str
    """Image preprocessing of training (the shards' mode): ``square`` resize or ``pad`` to square."""
    image_size: int
    """Side of the square the LLM's vision input (tower or tokenizer encoder) was fed."""
    resample: str
    """Resize filter (``bicubic``, ...)."""

    @classmethod
    def from_meta(cls, meta: dict) -> "TrainedInputs | None":
        """The record of an export's ``asvr_config.json`` (None: an export written before it existed)."""
        rec = meta.get("inputs")
        if not isinstance(rec, dict):
            return None
        try:
            return cls(**{k: rec[k] for k in ("template", "preprocess", "image_size", "resample")})
        except (KeyError, TypeError):
            raise ExportError(f"{CONFIG_FILE}: bad inputs record {rec!r}") from None


def read_inputs(folder: str | os.PathLike) -> TrainedInputs | None:
    """:meth:`TrainedInputs.from_meta` of an export folder."""
    return TrainedInputs.from_meta(json.loads((Path(folder) / CONFIG_FILE).read_text()))


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one name per storage (tied embeddings); return the aliases."""
    first: dict[tuple, str] = {}
    out, aliases = {}, {}
    for k, v in state.items():
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if key in first:
            aliases[k] = first[key]
        else:
            first[key] = k
            out[k] = v.detach().contiguous().cpu()
    return out, aliases


def save_exported(
    model: ASVRModel, folder: str | os.PathLike, llm_tokenizer=None, inputs: TrainedInputs | None = None
) -> Path:
    """Write the export folder atomically (a temp folder renamed into place).

    ``inputs``: how the model was trained to read its inputs (``asvr-train`` always passes it)."""
    from asvr.train.model.text_tokenizer import save_text_tokenizer
    from asvr.train.loop.run_folder import disk_errors

    folder = Path(folder)
    with (
        disk_errors(folder, "the exported model", "free space, then rerun with --resume auto"),
        atomic_dir(folder) as tmp,
    ):
        tensors, aliases = _dedupe(model.exported_state_dict())
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        model.llm.config.save_pretrained(tmp)
        if getattr(model.llm, "generation_config", None) is not None:
            model.llm.generation_config.save_pretrained(tmp)
        if llm_tokenizer is not None:
            save_text_tokenizer(llm_tokenizer, tmp)
        dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.") if tensors else model.cfg.dtype
        meta = {
            "format_version": FORMAT_VERSION,
            "model": model.cfg.to_dict(),
            "dtype": dtype,
            "tied": aliases,
            "n_tensors": len(tensors),
        }
        if inputs is not None:
            meta["inputs"] = asdict(inputs)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def _load_tokenizer(spec: VisionSpec, needs_encoder: bool, tokenizer):
    """-> (tokenizer or None, codebooks or None)."""
    if tokenizer is None:
        if not spec.path or not Path(spec.path).is_dir():
            raise ExportError(f"the tokenizer this model was trained with ({spec.path}) is not there; pass tokenizer=")
        if needs_encoder:
            from asvr.tokenizer.model import SemanticTokenizer

            tokenizer = SemanticTokenizer.load(spec.path)
        else:  # codebooks are enough: no encoder weights needed
            from asvr.tokenizer.artifact import load_artifact

            tspec, cb = load_artifact(spec.path)
            check_fingerprint(tspec.fingerprint, spec.fingerprint, f"tokenizer {spec.path}", "the model")
            return None, cb
    check_fingerprint(tokenizer.spec.fingerprint, spec.fingerprint, f"tokenizer {tokenizer.path}", "the model")
    return tokenizer, None


def resolve_export_dir(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """``RUN``, ``RUN/final`` or an export folder -> (export folder, run folder or None)."""
    p = Path(path)
    if (p / CONFIG_FILE).is_file():
        export = p
    elif (p / "final" / CONFIG_FILE).is_file():
        export = p / "final"
    else:
        raise ExportError(
            f"{p}: neither an asvr-train run folder (with final/{CONFIG_FILE}) "
            f"nor an exported model (with {CONFIG_FILE})"
        )
    run = export.parent if (export.parent / "train_config.json").is_file() else None
    return export, run


def load_exported(
    folder: str | os.PathLike,
    device: str | torch.device | None = None,
    tokenizer=None,
    attn_implementation: str | None = None,
    vision_tower=None,
) -> ASVRModel:
    """Rebuild the model of an export folder, weights loaded with strict keys, on ``device``
    (default: cuda when available, else cpu).

    An online model runs its recorded vision tower (``vision_tower=`` passes one
    already built; its fingerprint must match), or the tokenizer's encoder when
    none was recorded."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    folder = Path(folder)
    if not (folder / CONFIG_FILE).exists():
        raise ExportError(f"{folder} is not an exported ASVR model (no {CONFIG_FILE})")
    meta = json.loads((folder / CONFIG_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{folder}: export format {meta.get('format_version')} is not {FORMAT_VERSION}")
    cfg = ModelConfig.from_dict(meta["model"])
    cfg.dtype = meta.get("dtype", cfg.dtype)
    if attn_implementation is not None:
        cfg.attn_implementation = attn_implementation
    from asvr.train.model.vision_input import get_vision_input

    needs_encoder = get_vision_input(cfg.vision_input).model_runs_tower and cfg.vision_tower is None
    if cfg.vision is None:
        raise ExportError(f"{folder}: {CONFIG_FILE} records no vision spec")
    tok, codebooks = _load_tokenizer(cfg.vision, needs_encoder, tokenizer)

    from asvr.train.model.lvlm import resolve_attn_implementation

    attn = resolve_attn_implementation(cfg.attn_implementation)
    llm_config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code, local_files_only=True)
    with no_init_weights():  # every weight is overwritten below
        llm = AutoModelForCausalLM.from_config(
            llm_config, dtype=cfg.torch_dtype, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code
        )
    if (folder / "generation_config.json").exists():
        from transformers import GenerationConfig

        llm.generation_config = GenerationConfig.from_pretrained(folder)
    vision = cfg.vision
    model = build_model(cfg, tok, codebooks=codebooks, llm=llm, tower=vision_tower)
    model.cfg.vision = vision  # keep the recorded path even when a moved tokenizer was passed in
    _load_strict(model, folder / WEIGHTS_FILE, meta.get("tied", {}))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()


def _load_strict(model: ASVRModel, path: Path, tied: dict[str, str]) -> None:
    expected = model.exported_state_dict()
    with safe_open(str(path), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    missing = [k for k in expected if k not in stored and tied.get(k) not in stored]
    unexpected = [k for k in stored if k not in expected]
    if missing or unexpected:
        raise ExportError(
            f"{path.name}: {len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
        )
    for k, v in expected.items():
        src = stored[k] if k in stored else stored[tied[k]]
        if tuple(src.shape) != tuple(v.shape):
            raise ExportError(f"{path.name}: {k} has shape {tuple(src.shape)}, the model wants {tuple(v.shape)}")
    full = {k: stored[k] if k in stored else stored[tied[k]] for k in expected}
    frozen = {k: v for k, v in model.state_dict().items() if k.startswith("vision.")}  # the tokenizer's own
    model.load_state_dict({**full, **frozen}, strict=True)


def load_exported_weights(model: ASVRModel, folder: str | os.PathLike) -> None:
    """Load an export folder's weights into an already built ``model`` (e.g. SFT
    initialised from the pretrain export), strict keys; the tokenizer
    fingerprints must match."""
    folder = Path(folder)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    got = (meta.get("model", {}).get("vision") or {}).get("fingerprint", "")
    want = model.cfg.vision.fingerprint if model.cfg.vision else ""
    check_fingerprint(got, want, str(folder), "this model")
    got_tower = (meta.get("model", {}).get("vision_tower") or {}).get("fingerprint", "")
    want_tower = model.cfg.vision_tower.fingerprint if model.cfg.vision_tower is not None else ""
    check_fingerprint(
        got_tower,
        want_tower,
        f"the vision tower {folder}'s projector was trained on",
        "this model's vision tower",
        "an empty fingerprint is the tokenizer's own encoder",
    )
    _load_strict(model, folder / WEIGHTS_FILE, meta.get("tied", {}))
