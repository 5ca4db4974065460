"""The ``argparse`` parser of every ``asvr-*`` command: a usage mistake is one line.

argparse answers a mistyped flag with the whole usage (30 lines for
``asvr-train``) and the error last, and never suggests the flag that was
meant (``suggest_on_error`` arrives in Python 3.14).  :class:`OneLineParser`
prints ``prog: error: <what>`` plus, for an unknown or ambiguous flag, the
closest options (``difflib.get_close_matches``, the standard library's
ratio matcher) and a pointer to ``--help``; the exit code stays argparse's 2.
Subcommand parsers inherit the class (``add_subparsers`` uses the parent's).
"""

from __future__ import annotations

import argparse
import difflib
import re
from typing import NoReturn

_UNKNOWN = re.compile(r"unrecognized arguments: (.*)")


class OneLineParser(argparse.ArgumentParser):
    def options(self) -> list[str]:
        """Every long option, the subcommands' too (argparse reports their leftovers at the top)."""
        out: list[str] = []
        for a in self._actions:
            out += [s for s in a.option_strings if s.startswith("--")]
            if isinstance(a, argparse._SubParsersAction):
                for sub in dict.fromkeys(a.choices.values()):
                    out += sub.options() if isinstance(sub, OneLineParser) else []
        return list(dict.fromkeys(out))

    def suggest(self, word: str) -> list[str]:
        flag = word.split("=", 1)[0]
        return difflib.get_close_matches(flag, self.options(), n=2, cutoff=0.75)

    def error(self, message: str) -> NoReturn:
        m = _UNKNOWN.match(message)
        if m:
            hints = []
            for word in m.group(1).split():
                if word.startswith("-"):
                    close = self.suggest(word)
                    if close:
                        hints.append(f"{word.split('=', 1)[0]}: did you mean {' or '.join(close)}?")
            if hints:
                message = f"{message} ({'; '.join(hints)})"
        self.exit(2, f"{self.prog}: error: {message}; {self.prog} --help lists the options\n")
