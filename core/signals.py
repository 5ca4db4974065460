"""Stop signals (SIGTERM, SIGUSR1) as an exception that a command turns into one line and 128 + signum.

A scheduler preempts a job with SIGTERM and, after a grace period, SIGKILL
(SLURM's ``--signal=USR1@90`` sends SIGUSR1 first).  Python's default for
SIGTERM kills the process where it stands; under Ray the driver instead ran
the handler ``ray.init`` installs (``sys.exit``) into Ray's native shutdown
and died with its stack dump and exit code 134.  Stdlib only, in the base
package, so every command can use it (``asvr-pipeline tokenize`` does; a
``pack`` command would wrap its units the same way):

* :class:`StopSignals` (a context manager, main thread only, a no-op
  elsewhere) installs handlers that raise :class:`Stopped`, a
  ``BaseException`` like ``KeyboardInterrupt``, so no ``except Exception``
  swallows it and ``finally`` blocks (Ray's shutdown, closing files) run.
* :meth:`StopSignals.deferred` marks a unit of work that must finish (a
  shard and its marker): a signal inside it only sets a flag, and the unit's
  end raises :class:`Stopped`.  So a stop finishes the unit being committed
  and abandons those still in flight, which a rerun redoes.
* Only the first signal counts: a second one while stopping (a scheduler's
  repeat, an impatient ``kill``) is ignored rather than interrupting the
  cleanup; SIGKILL after the grace period stays the hard stop.
* :meth:`StopSignals.reinstall` puts the handlers back after a library
  replaced them (``ray.init`` sets its own SIGTERM handler).
* :func:`asvr.core.errors.run_guarded` prints the one line
  (``prog command: stopped by SIGTERM; <detail>``) and returns ``128 + signum``
  (143 for SIGTERM), the code shells and schedulers expect.  ``detail`` is
  set by whoever knows how to resume (the pipeline: units written, "rerun the
  same command").

Trade-off: Python runs handlers between bytecodes of the main thread, so a
call stuck in native code delays the stop until it returns; it never loses it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class SignalExit(BaseException):
    """A stop signal ended the command (a BaseException, like KeyboardInterrupt: no ``except
    Exception`` swallows it): the exit code a shell expects and the signal's name.  The base of
    :class:`Stopped` and of ``asvr-train``'s ``Preempted`` (which says what it saved)."""

    signum: int

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class Stopped(SignalExit):
    """A stop signal ended the command; ``detail`` says what was kept and how to go on."""

    def __init__(self, signum: int, detail: str = ""):
        super().__init__(signum, detail)
        self.signum = signum
        self.detail = detail

    def message(self) -> str:
        return f"stopped by {self.name}" + (f"; {self.detail}" if self.detail else "")


class StopSignals:
    """Handlers for ``signals`` for the life of the block (see module doc)."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self._deferring = 0
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            return  # already stopping: let the cleanup finish
        self.received = signum
        if not self._deferring:
            raise Stopped(signum)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal works in the main thread only (a notebook's worker thread: defaults kept)
        for s in self.signals:
            old = signal.signal(s, self._handle)
            self._old.setdefault(s, old)

    def reinstall(self) -> None:
        """Put the handlers back (a library such as Ray replaced them); the first originals are kept
        for :meth:`__exit__`."""
        if self._old:
            for s in self.signals:
                signal.signal(s, self._handle)

    def __enter__(self) -> "StopSignals":
        self._install()
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)  # type: ignore[arg-type]
        self._old.clear()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A unit that must finish: a signal inside only sets :attr:`received`; the block's end raises
        :class:`Stopped` (unless the block raised something else)."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if self.received is not None and not self._deferring:
            raise Stopped(self.received)
