"""The next micro-batch built while the device runs the current one (issue 26, ``--no-prefetch``
turns it off).

:class:`Prefetcher` wraps a loader (``PackedLoader`` or the ``--packed`` stream): one daemon
thread pulls the loader's iterator one batch ahead (a queue of one), pins it on CUDA so that
``Batch.to(device, non_blocking=True)`` is an asynchronous copy, and records the loader's state
and epoch *after that batch*: :attr:`state` / :attr:`epoch` are those of the last batch handed
out, not of the one being built, so a checkpoint resumes at the next unconsumed micro-batch
(bitwise resume holds with the thread on; tests/test_train_fast_path_26.py).  The loaders'
random numbers are their own seeded numpy generators, so building batches in another thread
changes no random stream.  With ``--num-workers N > 0`` the DataLoader's workers already build
batches ahead; the thread then only hides the hand-over.  An error in the thread is raised in
the training loop at the batch it concerns.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch

from asvr.train.data.batch import Batch


class Prefetcher:
    """Iterator of (pinned on CUDA) batches of ``loader``, built ``ahead`` in a thread or inline."""

    def __init__(self, loader: Any, device: torch.device, enabled: bool = True):
        self.loader = loader
        self.pin = device.type == "cuda"
        self.state: dict = loader.state_dict()
        self.epoch: int = loader.epoch
        self._it = iter(loader)
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if enabled:
            self._thread = threading.Thread(target=self._work, name="asvr-prefetch", daemon=True)
            self._thread.start()

    def _build(self) -> tuple[Batch, dict, int]:
        batch = next(self._it)
        if self.pin:
            batch = batch.pin_memory()
        return batch, self.loader.state_dict(), self.loader.epoch

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                item: Any = self._build()
            except BaseException as e:  # noqa: BLE001 - handed to the training loop, raised there
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Batch:
        item = self._queue.get() if self._thread is not None else self._build()
        if isinstance(item, BaseException):
            raise item
        batch, self.state, self.epoch = item
        return batch

    def close(self) -> None:
        """Stop the thread (the batch it holds is dropped; the loader state is the consumed one's)."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.1)
