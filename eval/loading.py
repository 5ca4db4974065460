"""Load what an evaluation needs from a run folder or an export folder.

``--model`` accepts ``RUN`` (an ``asvr-train`` output folder; its exported
model is ``RUN/final``) or the export folder itself.  Besides the LVLM this
finds:

* the LLM text tokenizer (saved in the export folder by the trainer;
  ``text_tokenizer=`` overrides),
* how the model was trained to read its inputs: the conversation template and
  the image preprocessing (``square`` / ``pad``) recorded in the export
  (``asvr_config.json``'s ``inputs``; ``template=`` / a bench's ``--preprocess``
  override).  Exports written before that record fall back to
  ``RUN/train_config.json`` for the template (else ``vicuna_v1``) and to the
  mode of the run's ``--codes`` shards (else the tokenizer's) for the preprocessing.  ``template_source`` and
  ``preprocess_source`` say which was used; the reports print them.
* the semantic tokenizer with its encoder when images must become model
  input through it (``online`` and ``features`` inputs without a recorded
  vision tower; ``codes`` inputs when a benchmark's images have no cached
  codes): from the path recorded in the export, or ``tokenizer_dir=`` when
  the artifact moved.  Its fingerprint must match the one the model was
  trained with.
* the LLM's vision tower (``online``/``features``): the one the export
  recorded (``--vision-tower`` at training; ``vision_tower_dir=`` when its
  weights moved, checked against the recorded sha256), else the tokenizer's
  encoder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from asvr.train.export.native import CONFIG_FILE, ExportError, TrainedInputs, load_exported, resolve_export_dir
from asvr.train.model.lvlm import ASVRModel
from asvr.train.data.templates import ConversationTemplate, get_template
from asvr.core.errors import AsvrError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_TEMPLATE = "vicuna_v1"


class EvalError(AsvrError):
    """A bad evaluation input; the message is one line."""


@dataclass
class LoadedModel:
    model: ASVRModel
    text_tokenizer: PreTrainedTokenizerBase
    image_tokenizer: object | None
    """A ``SemanticTokenizer`` (with its encoder) or None when not needed."""
    tower: object | None
    """The ``VisionTower`` of online/features models, else None."""
    preprocess: str
    """The image preprocessing (square | pad) of training as recorded, else the tokenizer's mode."""
    template: ConversationTemplate
    template_source: str
    export_dir: Path
    run_dir: Path | None
    device: torch.device
    preprocess_source: str = "tokenizer"
    """Where ``preprocess`` came from: the export's record or the tokenizer artifact."""
    inputs: TrainedInputs | None = None
    """The export's record of training (None: an export written before it existed)."""

    @property
    def vision_input(self) -> str:
        return self.model.cfg.vision_input


def resolve_export(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """``RUN`` or ``RUN/final`` or an export folder -> (export folder, run folder or None)."""
    try:
        return resolve_export_dir(path)
    except ExportError as e:
        raise EvalError(f"--model {e}") from None


def resolve_template(
    run_dir: Path | None, override: str | None, inputs: TrainedInputs | None = None, export: Path | None = None
) -> tuple[ConversationTemplate, str]:
    """-> (template, where its name came from): ``--template``, the export's record, the run's config."""
    if override:
        return get_template(override), "--template"
    if inputs is not None:
        return get_template(inputs.template), f"{export / CONFIG_FILE if export else CONFIG_FILE} (inputs)"
    if run_dir is not None:
        try:
            name = json.loads((run_dir / "train_config.json").read_text()).get("template")
        except (OSError, json.JSONDecodeError) as e:
            raise EvalError(f"{run_dir / 'train_config.json'}: cannot read ({e})") from None
        if name:
            return get_template(name), str(run_dir / "train_config.json")
    return get_template(DEFAULT_TEMPLATE), "default"


def _run_shards_mode(run: Path | None) -> tuple[str, str] | None:
    """Exports written before the ``inputs`` record: the preprocessing mode of the shards the run
    trained on (``RUN/train_config.json``'s ``codes``), when they are still there."""
    from asvr.core.shards import ShardError, list_shards, read_meta

    if run is None:
        return None
    try:
        codes = json.loads((run / "train_config.json").read_text()).get("codes")
        shards = list_shards(codes) if codes and Path(codes).is_dir() else []
        return (read_meta(shards[0]).preprocess, f"the run's --codes {codes}") if shards else None
    except (OSError, json.JSONDecodeError, ShardError):
        return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def find_recorded(recorded: str | None, export: Path) -> Path | None:
    """The tokenizer folder recorded in the export: as written (absolute, or relative to
    the working directory), else relative to a folder above the export (a run moved
    together with its tokenizer, or evaluated from another directory).  The fingerprint
    check in ``load_exported`` rejects a wrong artifact."""
    if not recorded:
        return None
    p = Path(recorded)
    if p.is_dir():
        return p
    if not p.is_absolute():
        for up in export.resolve().parents:
            if (up / p).is_dir():
                return up / p
    return None


def _preprocess(inputs, run, image_tok, found: Path, export: Path) -> tuple[str, str]:
    """The preprocessing the model was trained with -> (mode, where it was read)."""
    from asvr.tokenizer.artifact import load_artifact

    if inputs is not None:
        return inputs.preprocess, f"{export / CONFIG_FILE} (inputs)"
    if (shards_mode := _run_shards_mode(run)) is not None:
        return shards_mode
    preprocess = (
        image_tok.spec.preprocess if image_tok is not None else load_artifact(found, verify=False)[0].preprocess
    )
    return preprocess, f"tokenizer {found} (the export records no training preprocessing)"


def _text_tokenizer(src, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise EvalError(
            f"{src}: no text tokenizer there ({str(e).splitlines()[0][:120]}); pass --text-tokenizer LLM_FOLDER"
        ) from None


def _separate_tower(tower_rec: dict, vision_tower_dir, dev):
    """The vision tower an export records (``--vision-tower`` names another folder for its weights)."""
    from asvr.train.model.config import VisionTowerSpec
    from asvr.train.model.vision_tower import load_vision_tower

    spec = VisionTowerSpec(**tower_rec)
    if vision_tower_dir is not None:
        spec.encoder = {**spec.encoder, "weights": str(Path(vision_tower_dir).resolve())}
    return load_vision_tower(spec).to(dev)


def load_for_eval(
    path: str | os.PathLike,
    *,
    device: str = "auto",
    need_encoder: bool = False,
    tokenizer_dir: str | os.PathLike | None = None,
    text_tokenizer: str | os.PathLike | None = None,
    template: str | None = None,
    vision_tower_dir: str | os.PathLike | None = None,
) -> LoadedModel:
    from asvr.tokenizer.model import SemanticTokenizer
    from asvr.train.model.vision_input import get_vision_input
    from asvr.train.model.vision_tower import VisionTower

    export, run = resolve_export(path)
    meta = json.loads((export / CONFIG_FILE).read_text())
    try:
        inputs = TrainedInputs.from_meta(meta)
    except ExportError as e:
        raise EvalError(f"{export}: {e}") from None
    mode = get_vision_input(meta["model"]["vision_input"])
    tower_rec = meta["model"].get("vision_tower")
    recorded = (meta["model"].get("vision") or {}).get("path")
    dev = resolve_device(device)
    image_tok = None
    found = Path(tokenizer_dir) if tokenizer_dir is not None else find_recorded(recorded, export)
    if found is None:
        raise EvalError(f"the model's tokenizer ({recorded}) is not there; pass --tokenizer TOKENIZER_DIR")
    if vision_tower_dir is not None and tower_rec is None:
        raise EvalError("--vision-tower: this model was trained without a separate vision tower")
    tokenizer_encoder = (mode.uses_tower and tower_rec is None) or (need_encoder and not mode.uses_tower)
    if tokenizer_encoder or str(found) != recorded:
        if not found.is_dir():
            raise EvalError(f"--tokenizer {found}: no such folder")
        image_tok = SemanticTokenizer.load(found, device=dev)  # load_exported checks its fingerprint
    tower = _separate_tower(tower_rec, vision_tower_dir, dev) if tower_rec is not None and mode.uses_tower else None
    model = load_exported(export, device=dev, tokenizer=image_tok, vision_tower=tower)
    if tower is None and mode.uses_tower:
        tower = VisionTower.from_tokenizer(image_tok)
    preprocess, preprocess_source = _preprocess(inputs, run, image_tok, found, export)
    text_tok = _text_tokenizer(text_tokenizer or export, model.cfg.trust_remote_code)
    tmpl, tsrc = resolve_template(run, template, inputs, export)
    return LoadedModel(
        model=model,
        text_tokenizer=text_tok,
        image_tokenizer=image_tok,
        tower=tower,
        preprocess=preprocess,
        template=tmpl,
        template_source=tsrc,
        preprocess_source=preprocess_source,
        inputs=inputs,
        export_dir=export,
        run_dir=run,
        device=dev,
    )


__all__ = ["EvalError", "ExportError", "LoadedModel", "load_for_eval", "resolve_export", "resolve_template"]
