"""The one reader of LLaVA conversation files (``asvr-pipeline tokenize`` reads
their image paths, ``asvr-train`` / ``asvr-eval loss`` their conversations).

A ``.json`` file holds a list of records ``{id, image?, conversations}``; a
``.jsonl`` file one record per line.  The records are returned as they are
(each reader validates the fields it uses); only an unreadable file or one
that is not a list is refused here, with a one-line :class:`LlavaJSONError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class LlavaJSONError(ValueError):
    """An unreadable LLaVA JSON file; the message is one line."""


def read_llava_records(path: str | os.PathLike) -> list[Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        records = (
            [json.loads(line) for line in text.splitlines() if line.strip()]
            if path.suffix.lower() == ".jsonl"
            else json.loads(text)
        )
    except (OSError, ValueError) as e:
        raise LlavaJSONError(f"{path}: not a readable LLaVA JSON file ({e})") from None
    except RecursionError:  # json's C scanner on e.g. 100k nested brackets
        raise LlavaJSONError(f"{path}: not a readable LLaVA JSON file (nested too deeply)") from None
    if not isinstance(records, list):
        raise LlavaJSONError(f"{path}: expected a JSON list of conversation records")
    return records
