"""Module docstrings as ``--help`` text: the docstrings are written in
reStructuredText (``literal``, ``Examples::``, :mod:`x`), a terminal shows
plain text.  One function, used by every ``asvr-*`` parser that prints a
docstring."""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:mod|class|func|meth|attr|data|obj):`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def plain(doc: str | None) -> str:
    """``text`` -> text, :mod:`a.b` -> a.b, a paragraph ending in ``::`` -> ``:``."""
    text = _ROLE.sub(r"\1", doc or "")
    text = _LITERAL.sub(r"\1", text)
    return re.sub(r"::$", ":", text, flags=re.M)
