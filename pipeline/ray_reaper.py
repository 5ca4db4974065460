"""Tie a local Ray to the driver that started it, also across ``kill -9`` of the driver.

What Ray offers: GCS and raylet of a local Ray are started with
``PR_SET_PDEATHSIG`` (Ray's kernel fate-sharing), so they die with the driver,
and workers exit when their raylet is gone.  Its agents (``DashboardAgent``,
``RuntimeEnvAgent``) notice the raylet's death within ~2 s but then try to
report it to the GCS, which is dead too, and wait out a hard-coded 60 s timeout
(``publish_error_to_driver(..., 60)``).  Measured on the 2-core machine: a
driver killed mid-job left nothing after 2.5 s, but one killed while Ray was
starting left both agents alive for 64-70 s.

So the driver also starts this reaper (stdlib only, its own session): it holds
the read end of a pipe whose write end only the driver has, and every process
of that local Ray carries ``ASVR_RAY_OWNER=<token>`` in its environment (set
around ``ray.init`` only, inherited by GCS, raylet and everything they start).
When the pipe closes (the driver exited, crashed or was killed) the reaper
SIGKILLs every process with that token and exits.  After a normal
``ray.shutdown()`` there is nothing left to kill.  Measured with the reaper
(tests/test_hostile_inputs.py, slow): 0.1-0.2 s from the kill until no process
of that Ray is left, in both cases; its cost is one ~40 ms Python start.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from contextlib import contextmanager

MARK = "ASVR_RAY_OWNER"


def owned_processes(token: str) -> list[int]:
    """Processes whose environment carries ``ASVR_RAY_OWNER=<token>`` (Linux ``/proc``)."""
    needle = f"{MARK}={token}".encode() + b"\0"
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if needle in f.read() + b"\0":
                    found.append(int(d))
        except OSError:
            continue
    return found


class Reaper:
    """Started by the driver before ``ray.init``; :meth:`marked` wraps the ``ray.init`` call."""

    def __init__(self):
        self.token = f"{os.getpid()}-{secrets.token_hex(8)}"
        r, self._w = os.pipe()  # both ends close-on-exec: Ray's children never hold the write end
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", __name__, self.token],
                stdin=r,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )  # a Ctrl-C to the driver's group spares it
        finally:
            os.close(r)

    @contextmanager
    def marked(self):
        """The environment Ray's processes inherit carries the token while they are started."""
        old = os.environ.get(MARK)
        os.environ[MARK] = self.token
        try:
            yield
        finally:
            if old is None:
                os.environ.pop(MARK, None)
            else:
                os.environ[MARK] = old

    def close(self) -> None:
        """After ``ray.shutdown()``: the reaper removes stragglers, if any, and exits."""
        if self._w is not None:
            os.close(self._w)
            self._w = None
            self.proc.wait()


def _main(token: str) -> None:
    sys.stdin.buffer.read()  # returns at EOF: the driver closed its end, or died
    for pid in owned_processes(token):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


if __name__ == "__main__":
    _main(sys.argv[1])
