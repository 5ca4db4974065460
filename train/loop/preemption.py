"""Preemption and time-based checkpoints for ``asvr-train``: when to save, when to stop.

A scheduler preempts a job with SIGTERM and, after a grace period, SIGKILL;
SLURM's ``--signal=USR1@90`` sends SIGUSR1 ahead of the time limit.  Before
this module both killed ``asvr-train`` at once with nothing saved (and
``--save-every`` defaulted to 0: a run lost everything since its start).

* :class:`StopSignals` installs handlers for SIGTERM and SIGUSR1 for the
  whole command.  Before the step loop (loading data, building the model) a
  signal raises :class:`Preempted` at once: there is nothing new to save.
  Inside the loop (:meth:`StopSignals.deferred`) it only sets a flag, so the
  current optimizer step ends, a checkpoint is written, and the command
  exits with one line and ``128 + signum`` (143 for SIGTERM), the code a
  shell and schedulers expect.  The time to stop is one step plus one save.
* :class:`SaveClock` says when to save: every ``--save-every`` steps, every
  ``--save-every-minutes`` of wall time (default 30, so a preemption without
  a grace period loses at most that), and on a stop signal.  With more than
  one rank the decision is collective: each rank's flags are combined with a
  MAX all-reduce over a CPU (gloo) group, so every rank saves and stops at
  the same step even when the signal reached one rank only; the reduction is
  two integers on the host, no device sync.  One rank runs no collective.

Ctrl-C keeps Python's KeyboardInterrupt (stop now, one line, exit 130).
A signal sent to the whole process group (SLURM) also reaches forked
DataLoader workers: they ignore it and are shut down by the trainer.  Under
``torchrun`` the agent forwards SIGTERM to every rank and sends SIGKILL 30 s
later (torch.distributed.elastic's default), so a save must fit in that.
Trade-off: signal handlers run between bytecodes of the main thread, so a
step stuck in native code delays the flag, never loses it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from asvr.core.signals import STOP_SIGNALS, SignalExit


class Preempted(SignalExit):
    """A stop signal ended the run (a BaseException, like KeyboardInterrupt: no ``except Exception``
    swallows it).  ``saved``: the checkpoint written on the way out, None when there was nothing to save."""

    def __init__(self, signum: int, saved: str | None = None, step: int | None = None):
        super().__init__(signum, saved, step)
        self.signum = signum
        self.saved = saved
        self.step = step

    def message(self, run_dir: str, newest: str | None) -> str:
        """The one line the command prints; ``newest``: the newest complete checkpoint in ``run_dir``."""
        if self.saved is not None:
            return (
                f"{self.name} at step {self.step}: saved checkpoint {self.saved} in {run_dir}/checkpoints; "
                "rerun the same command with --resume auto to continue"
            )
        if newest is not None:
            return (
                f"{self.name} outside the training steps: nothing new to save; rerun the same command with "
                f"--resume auto to continue from {newest} in {run_dir}/checkpoints"
            )
        return f"{self.name} before the first checkpoint: nothing saved in {run_dir}; rerun the same command to start"


@dataclass
class StopSignals:
    """SIGTERM/SIGUSR1 handlers for the life of the block (main thread only; elsewhere a no-op)."""

    received: int | None = None
    _deferring: bool = False
    _old: dict = field(default_factory=dict)
    _pid: int = field(default_factory=os.getpid)

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker (a process-group signal): the trainer stops it in order
        if self._deferring:
            self.received = signum
        else:
            raise Preempted(signum)

    def __enter__(self) -> "StopSignals":
        for s in STOP_SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (a notebook's worker thread): keep the defaults
                break
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    @contextlib.contextmanager
    def deferred(self) -> Iterator["StopSignals"]:
        """Inside the block a signal only sets :attr:`received` (checked at each step's end);
        one that arrived before the block raised already."""
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False


@dataclass
class SaveClock:
    """Per step: save now? stop now?  ``reduce_max`` combines the ranks' flags (None: one rank)."""

    every_steps: int
    every_minutes: float
    signals: StopSignals
    reduce_max: Callable[[list[int]], list[int]] | None = None
    clock: Callable[[], float] = time.monotonic
    _last: float = field(init=False)

    def __post_init__(self) -> None:
        self._last = self.clock()

    def poll(self, step: int) -> tuple[bool, int | None]:
        """-> (save a checkpoint at this step, the stop signal or None); the same on every rank."""
        due = bool(self.every_steps and step % self.every_steps == 0)
        due = due or bool(self.every_minutes and self.clock() - self._last >= 60 * self.every_minutes)
        signum = self.signals.received or 0
        if self.reduce_max is not None:
            due_i, signum = self.reduce_max([int(due), signum])
            due = bool(due_i)
        if due or signum:
            self._last = self.clock()
        return due or bool(signum), signum or None


def gloo_reduce_max(world: int) -> Callable[[list[int]], list[int]] | None:
    """A MAX all-reduce of a few ints over a CPU group (collective: every rank calls it); None for one rank."""
    if world <= 1:
        return None
    import torch
    import torch.distributed as dist

    group = dist.new_group(backend="gloo")

    def reduce_max(values: list[int]) -> list[int]:
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return [int(v) for v in t.tolist()]

    return reduce_max
