"""The one reader of LLaVA conversation files (``asvr-pipeline tokenize`` reads
their image paths, ``asvr-train`` / ``asvr-eval loss`` their conversations).

A ``.json`` file holds a list of records ``{id, image?, conversations}``; a
``.jsonl`` file one record per line.  The records are returned as they are
(each reader validates the fields it uses); only an unreadable file or one
that is not a list is refused here, with a one-line :class:`LlavaJSONError`
(a broken ``.jsonl`` line is named by its line number).

Text that is not valid Unicode is refused like bytes that are not UTF-8: JSON
may spell a lone UTF-16 surrogate (``"\\ud800"``), which Python decodes into a
``str`` that every later ``encode`` (file paths, tokenizers, printing) fails
on.  :func:`lone_surrogate` finds it; the scan runs only when the raw text holds
a surrogate escape at all (``ensure_ascii`` JSON spells every emoji as a valid
pair, so those files pay one extra walk over the records).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any
from asvr.core.errors import AsvrError


class LlavaJSONError(AsvrError):
    """An unreadable LLaVA JSON file; the message is one line."""


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def lone_surrogate(obj: Any, where: str = "") -> str | None:
    """The place (``conversations[1].value``) of the first string in ``obj`` (keys included)
    holding a lone surrogate, or None."""
    stack: list[tuple[Any, str]] = [(obj, where)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return at or "value"
        elif isinstance(v, dict):
            for k, x in reversed(list(v.items())):
                if lone_surrogate(k) is not None:
                    return f"{at}.<key>" if at else "<key>"
                stack.append((x, f"{at}.{k}" if at else str(k)))
        elif isinstance(v, list):
            stack.extend((x, f"{at}[{i}]") for i, x in reversed(list(enumerate(v))))
    return None


def _refuse_surrogates(path: Path, rec: Any, where: str) -> None:
    bad = lone_surrogate(rec)
    if bad is not None:
        rid = rec.get("id") if isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)) else None
        rid = f" (id {str(rid).encode('utf-8', 'backslashreplace').decode()!r})" if rid is not None else ""
        raise LlavaJSONError(
            f"{path}: {where}{rid}: {bad} holds a lone UTF-16 surrogate escape (such as \\ud800): "
            "not valid Unicode text; fix or remove the record"
        )


def _parse_jsonl(path: Path, text: str, check: bool) -> list[Any]:
    records = []
    for n, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 etc. are JSON text
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise LlavaJSONError(f"{path}:{n}: not valid JSON ({getattr(e, 'msg', e)})") from None
        if check:
            _refuse_surrogates(path, rec, f"line {n}")
        records.append(rec)
    return records


def read_llava_records(path: str | os.PathLike) -> list[Any]:
    path = Path(path)
    jsonl = path.suffix.lower() == ".jsonl"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        raise LlavaJSONError(f"{path}: not a readable LLaVA JSON file ({e})") from None
    check = _SURROGATE_ESCAPE.search(text) is not None
    try:
        records = _parse_jsonl(path, text, check) if jsonl else json.loads(text)
    except LlavaJSONError:
        raise
    except ValueError as e:
        raise LlavaJSONError(f"{path}: not a readable LLaVA JSON file ({e})") from None
    except RecursionError:  # json's C scanner on e.g. 100k nested brackets
        raise LlavaJSONError(f"{path}: not a readable LLaVA JSON file (nested too deeply)") from None
    if not isinstance(records, list):
        raise LlavaJSONError(f"{path}: expected a JSON list of conversation records")
    if check and not jsonl:
        for i, rec in enumerate(records):
            _refuse_surrogates(path, rec, f"record {i}")
    return records
