"""Save an LLM's text tokenizer so that it reloads tokenizing as it did in training.

``PreTrainedTokenizer.save_pretrained`` does not write every setting that
changes the ids.  Measured with transformers 5.24 on a Llama SentencePiece
tokenizer loaded with ``legacy=True`` (from a ``tokenizer_config.json`` that
says so, or as a keyword): the saved ``tokenizer_config.json`` has no
``legacy`` key, the reloaded tokenizer is ``legacy=False``, and ``"a</s>USER"``
reads ``[1, 259, 2, 281, 277]`` instead of ``[1, 259, 2, 294, 281, 277]``
(SentencePiece's ``▁`` after a special token is gone), so every turn after
the first ``</s>`` of a multi-turn prompt changes.  :func:`save_text_tokenizer`
writes ``legacy`` back; :func:`first_difference` compares two id lists.
Both exports (``RUN/final`` and ``asvr-export --hf-llava``) save through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

CONFIG = "tokenizer_config.json"


def save_text_tokenizer(tokenizer, folder: str | Path) -> None:
    """``tokenizer.save_pretrained(folder)`` plus the settings it leaves out (``legacy``).

    ``folder`` is the temporary folder of an ``atomic_dir`` (the caller's)."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    write_back_settings(tokenizer, folder)


def write_back_settings(tokenizer, folder: str | Path) -> None:
    """Add to ``folder/tokenizer_config.json`` what ``save_pretrained`` left out (``legacy``)."""
    folder = Path(folder)
    legacy = getattr(tokenizer, "legacy", None)
    path = folder / CONFIG
    if isinstance(legacy, bool) and path.is_file():
        cfg = json.loads(path.read_text())
        if cfg.get("legacy") != legacy:
            cfg["legacy"] = legacy
            path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first position where two id lists differ (the shorter one's length when one is a
    prefix of the other), or None when they are equal."""
    a, b = list(a), list(b)
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


__all__ = ["save_text_tokenizer", "write_back_settings", "first_difference"]
