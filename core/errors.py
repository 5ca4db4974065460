"""The errors every layer shares, and the one way the four ``asvr-*`` CLIs report them.

Imports nothing but the standard library, so the shard reader, the pipeline
and the trainer use it without torch.

* :class:`AsvrError`: the one base of every expected error the project raises
  (bad input, a refused artifact, a full disk it reports); a ``ValueError``
  so callers written against ``except ValueError`` keep working.  A new
  error type subclasses it and every CLI reports it in one line, with no list
  of types to keep up to date in seven mains.
* :class:`CLIError`: bad input spotted by a CLI itself (a missing folder, a
  flag combination that cannot work).
* :class:`TokenizerError`: an unusable tokenizer artifact.
* :class:`FingerprintError` and :func:`check_fingerprint`: two artifacts made
  with different tokenizers met (docs/ARCHITECTURE.md, contract 1).  The only place a
  fingerprint is compared, so the refusal reads the same everywhere.
* :func:`run_guarded`: an :class:`AsvrError` is one line on stderr and exit code
  2, Ctrl-C one line and exit code 130, a stop signal caught as
  :class:`~asvr.core.signals.Stopped` one line and 128 + signum (143 for
  SIGTERM), never a traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

from asvr.core.signals import Stopped


class AsvrError(ValueError):
    """Base of every error the project expects (a user's input, a refused artifact): a CLI prints
    it as one line and exits 2.  A plain ``ValueError`` is a bug and keeps its traceback."""


class CLIError(AsvrError):
    """A user-facing error: printed as one line, exit code 2."""


class TokenizerError(AsvrError):
    """A tokenizer artifact that cannot be used (missing, malformed, tampered with)."""


class FingerprintError(TokenizerError):
    """Codes, an index, a checkpoint or an export met a tokenizer (or vision tower) other than
    the one that made them."""


def check_fingerprint(got: str, want: str, what: str, against: str, hint: str = "") -> None:
    """Raise :class:`FingerprintError` unless ``got == want``.

    ``what`` names the thing that carries ``got`` (a shard file, an index, an
    export folder), ``against`` the thing that carries ``want`` (this run's
    tokenizer, the index); ``hint`` says how to fix it."""
    if got != want:
        raise FingerprintError(
            f"fingerprint mismatch: {what} has {got[:12] or '(none)'}, "
            f"{against} has {want[:12] or '(none)'}" + (f"; {hint}" if hint else "")
        )


def run_guarded(
    prog: str,
    command: str | None,
    call: Callable[[], object],
    errors: tuple[type[BaseException], ...] = (),
    interrupted: str | Callable[[], str] = "interrupted",
) -> int:
    """Run one (sub)command the way every ``asvr-*`` CLI does.

    An :class:`AsvrError` (or an error of a type in ``errors``: the OS errors a CLI reports, such as
    a missing input file) is one line on
    stderr, ``prog command: error: <first line>``, and exit code 2; Ctrl-C
    prints ``interrupted`` (or what it returns, when a callable) and exits 130.  Anything else is a bug and keeps its
    traceback."""
    where = f"{prog} {command}" if command else prog
    expected: tuple[type[BaseException], ...] = (AsvrError, *errors)
    try:
        return int(call() or 0)  # type: ignore[call-overload]
    except expected as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{where}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted() if callable(interrupted) else interrupted, file=sys.stderr)
        return 130
    except Stopped as e:  # SIGTERM / SIGUSR1 (asvr.core.signals): one line, 128 + signum
        print(f"{where}: {e.message()}", file=sys.stderr)
        return e.exit_code
