"""Load what an evaluation needs from a run folder or an export folder.

``--model`` accepts ``RUN`` (an ``asvr-train`` output folder; its exported
model is ``RUN/final``) or the export folder itself.  Besides the LVLM this
finds:

* the LLM text tokenizer (saved in the export folder by the trainer;
  ``text_tokenizer=`` overrides),
* the conversation template the run trained with (``RUN/train_config.json``;
  ``template=`` overrides; an export folder alone defaults to ``vicuna_v1``),
* the semantic tokenizer with its encoder when images must become model
  input (``online`` and ``features`` inputs always; ``codes`` inputs when a
  benchmark's images have no cached codes): from the path recorded in the
  export, or ``tokenizer_dir=`` when the artifact moved.  Its fingerprint
  must match the one the model was trained with.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from asvr.train.export import CONFIG_FILE, ExportError, load_exported
from asvr.train.templates import ConversationTemplate, get_template

DEFAULT_TEMPLATE = "vicuna_v1"


class EvalError(ValueError):
    """A bad evaluation input; the message is one line."""


@dataclass
class LoadedModel:
    model: "torch.nn.Module"
    text_tokenizer: object
    image_tokenizer: object | None
    """A ``SemanticTokenizer`` (with its encoder) or None when not needed."""
    template: ConversationTemplate
    template_source: str
    export_dir: Path
    run_dir: Path | None
    device: torch.device

    @property
    def vision_input(self) -> str:
        return self.model.cfg.vision_input


def resolve_export(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """``RUN`` or ``RUN/final`` or an export folder -> (export folder, run folder or None)."""
    p = Path(path)
    if (p / CONFIG_FILE).is_file():
        export = p
    elif (p / "final" / CONFIG_FILE).is_file():
        export = p / "final"
    else:
        raise EvalError(f"--model {p}: neither an asvr-train run folder (with final/{CONFIG_FILE}) "
                        f"nor an exported model (with {CONFIG_FILE})")
    run = export.parent if (export.parent / "train_config.json").is_file() else None
    return export, run


def resolve_template(run_dir: Path | None, override: str | None) -> tuple[ConversationTemplate, str]:
    """-> (template, where its name came from)."""
    if override:
        return get_template(override), "--template"
    if run_dir is not None:
        try:
            name = json.loads((run_dir / "train_config.json").read_text()).get("template")
        except (OSError, json.JSONDecodeError) as e:
            raise EvalError(f"{run_dir / 'train_config.json'}: cannot read ({e})") from None
        if name:
            return get_template(name), str(run_dir / "train_config.json")
    return get_template(DEFAULT_TEMPLATE), "default"


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


def load_for_eval(path: str | os.PathLike, *, device: str = "auto", need_encoder: bool = False,
                  tokenizer_dir: str | os.PathLike | None = None, text_tokenizer: str | os.PathLike | None = None,
                  template: str | None = None) -> LoadedModel:
    from transformers import AutoTokenizer

    from asvr.tokenizer import SemanticTokenizer

    export, run = resolve_export(path)
    meta = json.loads((export / CONFIG_FILE).read_text())
    mode = meta["model"]["vision_input"]
    recorded = (meta["model"].get("vision") or {}).get("path")
    dev = resolve_device(device)
    image_tok = None
    found = Path(tokenizer_dir) if tokenizer_dir is not None else find_recorded(recorded, export)
    if found is None:
        raise EvalError(f"the model's tokenizer ({recorded}) is not there; pass --tokenizer TOKENIZER_DIR")
    if need_encoder or mode in ("online", "features") or str(found) != recorded:
        if not found.is_dir():
            raise EvalError(f"--tokenizer {found}: no such folder")
        image_tok = SemanticTokenizer.load(found, device=dev)  # load_exported checks its fingerprint
    model = load_exported(export, device=dev, tokenizer=image_tok)
    src = text_tokenizer or export
    try:
        text_tok = AutoTokenizer.from_pretrained(src, local_files_only=True,
                                                 trust_remote_code=model.cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise EvalError(f"{src}: no text tokenizer there ({str(e).splitlines()[0][:120]}); "
                        f"pass --text-tokenizer LLM_FOLDER") from None
    tmpl, tsrc = resolve_template(run, template)
    return LoadedModel(model=model, text_tokenizer=text_tok, image_tokenizer=image_tok, template=tmpl,
                       template_source=tsrc, export_dir=export, run_dir=run, device=dev)


__all__ = ["EvalError", "ExportError", "LoadedModel", "load_for_eval", "resolve_export", "resolve_template"]
