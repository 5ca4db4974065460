"""Write a trained ASVR model as a standard Hugging Face LLaVA folder.

At inference an ASVR model *is* a LLaVA-1.5: vision tower -> ``mlp2x_gelu``
projector -> LLM.  The visual head only trains the LLM's image positions and
is not needed to answer questions, so the export leaves it out of the model
and saves it beside (``OUT/asvr_visual_head/``: a sub-folder, so serving
stacks that glob ``OUT/*.safetensors`` never see it).  transformers
(``LlavaForConditionalGeneration`` + ``AutoProcessor``), vLLM and lmms-eval's
``llava_hf`` then load ``OUT`` as any LLaVA.

How each piece maps (checked by ``tests/test_hf_llava_export.py``: the same
logits, to fp32 tolerance, and the same greedy answers as ``asvr-eval`` on
``RUN/final``, for ``square`` and ``pad`` images):

* vision tower: the Hugging Face SigLIP/CLIP tower the LLM was fed with
  (``--vision-tower`` as recorded in the export, else the tokenizer's encoder),
  truncated at its feature layer exactly as in training (the layers above were
  never built), so ``vision_feature_layer = -1`` of the exported tower is the
  training layer.  SigLIP has no CLS token (``select_strategy = "full"``);
  CLIP's is dropped (``"default"``, LLaVA's ``patch``) or kept with
  ``--vision-tower-select cls_patch`` (``"full"``, one more image token).
* projector: ``projector.0`` / ``projector.2`` -> ``linear_1`` / ``linear_2``
  (both GELUs are the exact erf form).  Other projector kinds are refused.
* language model: the LLM's base model and LM head, unchanged.  The text
  tokenizer gains the special token ``<image>``; the embedding matrices grow
  to hold it (rounded up to a multiple of 64, as LLaVA-HF checkpoints do).
  The new rows are zero and never reach the model (image positions carry
  vision features), and ``generation_config.suppress_tokens`` keeps greedy
  decoding off them, so answers equal the original model's.
* processor: ``LlavaImageProcessor`` with the tokenizer's preprocessing: a
  bicubic (or recorded) resize to ``S x S`` with no centre crop, for ``pad``
  first a square canvas of ``int(255 * mean)`` (LLaVA's ``expand2square``),
  then ``/255`` and the tower's mean/std.  It does not apply EXIF orientation,
  which the ASVR loaders do: images with an EXIF rotation differ.
* chat template: the run's conversation template (``vicuna_v1``, ``chatml``,
  ``plain``) as Jinja, so ``apply_chat_template(..., add_generation_prompt=True)``
  renders the prompt ``asvr-eval`` asks with.  The processor's *ids* are checked
  against the training stream at export time (:mod:`asvr.train.export.hf_prompt`: one
  space after ``<image>`` for ``legacy=False`` SentencePiece tokenizers, no BOS
  for templates trained without one); a folder that would prompt differently is
  refused with the first differing position.
* ``asvr_inputs.json``: how the model was trained to read its inputs (template,
  preprocessing, image size, resample; from the export's ``inputs`` record, else
  ``RUN/train_config.json`` and the tokenizer's mode); ``asvr-eval bench`` reports it.
"""

from __future__ import annotations

import json
import re
import os
from dataclasses import replace
from pathlib import Path
from typing import cast

import torch

from asvr.core.atomic import atomic_dir

from asvr.train.model.config import ModelConfig
from asvr.train.export.hf_processor import IMAGE_TOKEN, chat_template, save_processor
from asvr.train.export.hf_tower import HFExportError, HFTower, hf_tower
from asvr.train.export.native import CONFIG_FILE, ExportError, TrainedInputs, load_exported, resolve_export_dir
from asvr.train.model.vision_input import get_vision_input

HEAD_DIR = "asvr_visual_head"
INPUTS_FILE = "asvr_inputs.json"
VOCAB_MULTIPLE = 64


# --------------------------------------------------------------------------- resolving the run
def run_template_name(run: Path | None, default: str = "vicuna_v1") -> str:
    """The conversation template a run trained with (``RUN/train_config.json``)."""
    if run is None:
        return default
    try:
        return json.loads((run / "train_config.json").read_text()).get("template") or default
    except (OSError, json.JSONDecodeError) as e:
        raise HFExportError(f"{run / 'train_config.json'}: cannot read ({e})") from None


# --------------------------------------------------------------------------- the export
def _llava_config(model, tower: HFTower, image_token_id: int, vocab: int):
    from transformers import LlavaConfig

    text_config = model.llm.config.to_dict()
    text_config["vocab_size"] = vocab
    vision_config = tower.model.config.to_dict()
    return LlavaConfig(
        # image_token_id is LlavaConfig's attribute_map alias of image_token_index (untyped as a keyword)
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,  # type: ignore[call-arg]
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        vision_feature_layer=-1,
        vision_feature_select_strategy=tower.strategy,
        image_seq_length=model.vision.tokens,
        tie_word_embeddings=bool(getattr(model.llm.config, "tie_word_embeddings", False)),
    )


def _grown(weight: torch.Tensor, rows: int) -> torch.Tensor:
    out = torch.zeros(rows, weight.shape[1], dtype=weight.dtype)
    out[: weight.shape[0]] = weight.detach().cpu()
    return out


def _state_dict(model, tower: HFTower, vocab: int) -> dict[str, torch.Tensor]:
    """``LlavaForConditionalGeneration`` keys -> tensors (contiguous, CPU)."""
    proj = model.projector
    if not (
        isinstance(proj, torch.nn.Sequential)
        and len(proj) == 3
        and isinstance(proj[1], torch.nn.GELU)
        and proj[1].approximate == "none"
    ):
        raise HFExportError(f"the projector is {model.cfg.projector}; LLaVA holds mlp2x_gelu only")
    sd: dict[str, torch.Tensor] = {}
    for k, v in tower.model.state_dict().items():
        sd[f"model.vision_tower.{k}"] = v
    for i, name in ((0, "linear_1"), (2, "linear_2")):
        linear = cast(torch.nn.Linear, proj[i])  # checked above: Linear, GELU, Linear
        sd[f"model.multi_modal_projector.{name}.weight"] = linear.weight
        sd[f"model.multi_modal_projector.{name}.bias"] = linear.bias
    emb = model.llm.get_input_embeddings().weight
    emb_name = next((n for n, p in model.llm.base_model.named_parameters() if p is emb), None)
    if emb_name is None:
        raise HFExportError("cannot find the LLM's input embedding among its weights")
    for k, v in model.llm.base_model.state_dict().items():
        sd[f"model.language_model.{k}"] = _grown(v, vocab) if k == emb_name else v
    if not getattr(model.llm.config, "tie_word_embeddings", False):
        sd["lm_head.weight"] = _grown(model.llm.get_output_embeddings().weight, vocab)
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def _save_head(model, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir()
    state = {k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    v = model.cfg.vision
    meta = {
        "head": model.cfg.to_dict()["head"],
        "llm_hidden_size": model.hidden_size,
        "dim": v.dim,
        "depth": v.depth,
        "codebook_size": v.codebook_size,
        "tokenizer_fingerprint": v.fingerprint,
        "note": "ASVR's training-only visual head (not part of the LLaVA model in the folder above)",
    }
    (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")


def _reference_tokenizer(run_dir: Path | None, export_tok, trust_remote_code: bool):
    """The text tokenizer training used: the LLM folder of ``RUN/train_config.json`` when it is
    still there, else the export's own (saved by the trainer)."""
    from transformers import AutoTokenizer

    llm = _run_config(run_dir).get("model")
    if llm and Path(llm).is_dir():
        try:
            return AutoTokenizer.from_pretrained(llm, local_files_only=True, trust_remote_code=trust_remote_code)
        except (OSError, ValueError):
            pass
    return export_tok


def _run_config(run: Path | None) -> dict:
    if run is None or not (run / "train_config.json").is_file():
        return {}
    try:
        cfg = json.loads((run / "train_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HFExportError(f"{run / 'train_config.json'}: cannot read ({e})") from None
    return cfg if isinstance(cfg, dict) else {}


_OUR_SHARDS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")


def check_export_target(out: Path, overwrite: bool) -> None:
    """``OUT`` must be new, an empty folder, or (with ``overwrite``) an earlier LLaVA export:
    a file or a folder of other things is refused before any work, never replaced."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise HFExportError(f"--hf-llava {out} is a file, not a folder; give a new or empty folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not is_hf_llava(out):
        first = sorted(p.name for p in out.iterdir())[0]
        raise HFExportError(
            f"--hf-llava {out} holds files that are not a LLaVA export (like {first}); give a new or empty folder"
        )
    if not overwrite:
        raise HFExportError(f"--hf-llava {out} holds an earlier LLaVA export; --overwrite replaces it")


def _foreign(out: Path, written: Path) -> list[str]:
    """Names in the earlier export ``out`` that this export does not write (user files: never removed)."""
    new = {p.name for p in written.iterdir()}
    return sorted(p.name for p in out.iterdir() if p.name not in new and not _OUR_SHARDS.match(p.name))


def _trained_model(export: Path, tokenizer):
    """The exported model with its Hugging Face tower -> (model config, tower, inputs, model)."""
    from asvr.tokenizer.model import SemanticTokenizer

    meta = json.loads((export / CONFIG_FILE).read_text())
    cfg = ModelConfig.from_dict(meta["model"])
    if not get_vision_input(cfg.vision_input).uses_tower:
        hf_tower(cfg, None)  # raises the one-line reason
    if tokenizer is None:
        path = (meta["model"].get("vision") or {}).get("path")
        if not path or not Path(path).is_dir():
            raise HFExportError(f"the tokenizer this model was trained with ({path}) is not there")
        tokenizer = SemanticTokenizer.load(path)
    tower = hf_tower(cfg, tokenizer)
    inputs = TrainedInputs.from_meta(meta)
    if inputs is not None:  # the export's record of training (older exports: the tokenizer's mode)
        tower = replace(tower, preprocess=inputs.preprocess)
    model = load_exported(
        export, tokenizer=tokenizer, vision_tower=tower.tower if cfg.vision_tower is not None else None
    )
    return cfg, tower, inputs, model


def _image_token_vocab(text_tok, model) -> tuple[int, int, int]:
    """Add ``<image>`` to the text tokenizer when it lacks it -> (its id, the LLM's vocabulary,
    the vocabulary grown to hold the id, rounded up to :data:`VOCAB_MULTIPLE`)."""
    if IMAGE_TOKEN not in text_tok.get_vocab():
        text_tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    image_token_id = cast(int, text_tok.convert_tokens_to_ids(IMAGE_TOKEN))  # one token in, one id out
    old_vocab = cast(torch.nn.Embedding, model.llm.get_input_embeddings()).weight.shape[0]
    vocab = max(
        old_vocab,
        -(-(image_token_id + 1) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE if image_token_id >= old_vocab else old_vocab,
    )
    return image_token_id, old_vocab, vocab


def _hf_llava_model(model, tower: HFTower, text_tok, image_token_id: int, old_vocab: int, vocab: int):
    """The ``LlavaForConditionalGeneration`` holding the trained weights (strictly: every key lines
    up), with the LLM's generation config; the grown rows are never generated."""
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    config = _llava_config(model, tower, image_token_id, vocab)
    state = _state_dict(model, tower, vocab)
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise HFExportError(f"LLaVA weights do not line up: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        hf.tie_weights()
    gen = (
        GenerationConfig.from_model_config(model.llm.config)
        if model.llm.generation_config is None
        else GenerationConfig.from_dict(model.llm.generation_config.to_dict())
    )
    gen.suppress_tokens = list(range(old_vocab, vocab)) or None
    if gen.pad_token_id is None:
        gen.pad_token_id = text_tok.pad_token_id if text_tok.pad_token_id is not None else gen.eos_token_id
    hf.generation_config = gen
    return hf


def export_hf_llava(
    run: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tokenizer=None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write ``out`` (atomically: a temp folder renamed into place) from a run or export folder.

    ``tokenizer`` (a ``SemanticTokenizer``) overrides the recorded tokenizer path.  ``out`` is
    refused when it is a file or holds anything but an earlier export (that one only with
    ``overwrite``, and only when it holds nothing this export would not write again)."""
    from transformers import AutoTokenizer

    from asvr.train.data.templates import get_template
    from asvr.train.loop.run_folder import disk_errors

    out = Path(out)
    check_export_target(out, overwrite)
    export, run_dir = resolve_export_dir(run)
    cfg, tower, inputs, model = _trained_model(export, tokenizer)

    def export_tokenizer():
        return AutoTokenizer.from_pretrained(export, local_files_only=True, trust_remote_code=cfg.trust_remote_code)

    text_tok = export_tokenizer()
    reference = _reference_tokenizer(run_dir, export_tokenizer(), cfg.trust_remote_code)
    template_name, template_source = (
        (inputs.template, str(export / CONFIG_FILE)) if inputs is not None else (run_template_name(run_dir), "run")
    )
    template = get_template(template_name)
    hf = _hf_llava_model(model, tower, text_tok, *_image_token_vocab(text_tok, model))
    with disk_errors(out, "the LLaVA export", "free space and run asvr-export again"):
        with atomic_dir(out, replace=overwrite) as tmp:
            hf.save_pretrained(tmp, max_shard_size=max_shard_size)
            after = save_processor(tmp, tower, text_tok, template, reference, model.vision.tokens)
            record = {
                "template": template.name,
                "template_source": template_source,
                "preprocess": tower.preprocess,
                "image_size": tower.image_size,
                "resample": tower.resample,
                "after_image": after,
                "note": "how the model was trained to read its inputs; the processor and chat template apply it",
            }
            (tmp / INPUTS_FILE).write_text(json.dumps(record, indent=2) + "\n")
            _save_head(model, tmp / HEAD_DIR)
            foreign = _foreign(out, tmp) if out.is_dir() else []
            if foreign:
                raise HFExportError(
                    f"--hf-llava {out}: the earlier export there also holds {', '.join(foreign[:3])}, which this "
                    "export does not write; move them away first (nothing was replaced)"
                )
    return out


def read_hf_inputs(folder: str | os.PathLike) -> dict | None:
    """``OUT/asvr_inputs.json`` of an ``asvr-export --hf-llava`` folder (None: another LLaVA)."""
    p = Path(folder) / INPUTS_FILE
    try:
        rec = json.loads(p.read_text()) if p.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def is_hf_llava(folder: str | os.PathLike) -> bool:
    """A folder holding a Hugging Face LLaVA (``config.json`` with ``model_type: llava``)."""
    p = Path(folder) / "config.json"
    try:
        return p.is_file() and json.loads(p.read_text()).get("model_type") == "llava"
    except (OSError, json.JSONDecodeError):
        return False


__all__ = [
    "HFExportError",
    "export_hf_llava",
    "chat_template",
    "is_hf_llava",
    "read_hf_inputs",
    "resolve_export_dir",
    "ExportError",
]
