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
SIGKILLs every process of that Ray and exits.  After a normal
``ray.shutdown()`` there is nothing left to kill.

The environment alone misses some.  Ray's agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) are started by the raylet, and in about half of the
runs measured here (Ray 2.60, ``setproctitle`` installed, 2 busy cores) their
``/proc/PID/environ`` held no token; retitled, their command line names nothing
of Ray either.  A driver killed then left them for 62-63 s, and by the time the
reaper looked the GCS and raylet (the processes that do carry the token) were
already gone by fate-sharing.  So the reaper watches while the driver lives:
every 0.5 s (:class:`Watch`, ~2 ms a scan: each process's environment and
command line are read once) it records this Ray's processes by (pid, start
time), and a process is this Ray's when

1. its environment carries the token;
2. its command line names this Ray's session folder (GCS, raylet, log
   monitor: ``--session-dir=``, ``--log_dir=``); the folder is read off the
   command lines of tagged processes, and written into the pipe by the driver
   once ``ray.init`` returns;
3. its stdout or stderr is a file under that folder (workers: ``logs/worker-*``);
4. its parent is one of this Ray's processes (the agents are the raylet's
   children), transitively; recorded, so it still counts after the parent died.

At EOF it kills the known and the found ones (the same start time: a reused
pid is never hit), and scans again until nothing of that Ray has been seen for
0.3 s.  Measured (5 kills right after both agents were up, 3 of them with
token-less agents; bench-style probe in the closing note of issue 23): nothing
left after 0.33-0.43 s, against 62-63 s before; tests/test_hostile_inputs.py
(slow) measures the mid-job kill.
"""

from __future__ import annotations

import os
import re
import secrets
import select
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Sequence

MARK = "ASVR_RAY_OWNER"


_SESSION = re.compile(rb"(/[^\0\s=]*/session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+)")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _stat(pid: int) -> tuple[bytes, int, int]:
    """(state letter, parent pid, start time in clock ticks) from ``/proc/PID/stat``
    (``b"?", 0, 0`` when it is gone)."""
    stat = _read(f"/proc/{pid}/stat")
    try:
        fields = stat[stat.rindex(b")") + 2 :].split()  # after "pid (comm) "
        return fields[0], int(fields[1]), int(fields[19])
    except (ValueError, IndexError):
        return b"?", 0, 0


def _outputs(pid: int) -> list[bytes]:
    out = []
    for fd in (1, 2):
        try:
            out.append(os.fsencode(os.readlink(f"/proc/{pid}/fd/{fd}")))
        except OSError:
            pass
    return out


class Watch:
    """What the reaper knows of one Ray: its session folders and its processes, kept across scans
    by (pid, start time), so a process stays known after its parent died or its title changed."""

    def __init__(self, token: str, session_dirs: Sequence[str] = ()):
        self.needle = f"{MARK}={token}".encode() + b"\0"
        self.sessions = {os.fsencode(s.rstrip("/")) for s in session_dirs if s}
        self.known: dict[int, int] = {}  # pid -> start time of this Ray's processes
        self._marked: dict[tuple[int, int], bool] = {}  # (pid, start) -> rules 1-3 hold (read once)

    def add_session(self, session_dir: bytes) -> None:
        if session_dir and session_dir not in self.sessions:
            self.sessions.add(session_dir)
            self._marked = {k: v for k, v in self._marked.items() if v}  # look again with the new folder

    def _is_marked(self, pid: int) -> bool:
        cmd = _read(f"/proc/{pid}/cmdline")
        if self.needle in _read(f"/proc/{pid}/environ") + b"\0":
            for m in _SESSION.findall(cmd):
                self.add_session(m)
            return True
        return any(s in cmd for s in self.sessions) or any(
            o.startswith(s + b"/") for o in _outputs(pid) for s in self.sessions
        )

    def scan(self) -> set[int]:
        """One pass over ``/proc`` (a process's environment and command line are read once):
        the live processes of this Ray, which :attr:`known` then holds too."""
        me = os.getpid()
        stat = {int(d): _stat(int(d)) for d in os.listdir("/proc") if d.isdigit() and int(d) != me}
        live = {p: st for p, st in stat.items() if st[0] not in (b"Z", b"X", b"?")}  # zombies are dead already
        owned = {p for p, st in live.items() if self.known.get(p) == st[2]}
        for p, st in live.items():
            key = (p, st[2])
            if key not in self._marked:
                self._marked[key] = self._is_marked(p)
            if self._marked[key]:
                owned.add(p)
        grew = True
        while grew:  # children of this Ray's processes, transitively (agents are the raylet's)
            new = {p for p, st in live.items() if p not in owned and st[1] in owned}
            owned |= new
            grew = bool(new)
        self._marked = {k: v for k, v in self._marked.items() if k[0] in live}
        self.known = {p: live[p][2] for p in owned}
        return owned


def owned_processes(token: str, session_dirs: Sequence[str] = ()) -> list[int]:
    """The live processes of the local Ray tagged with ``token`` (see the module doc for the four
    rules); ``session_dirs``: its session folder(s), when known (Linux ``/proc``)."""
    return sorted(Watch(token, session_dirs).scan())


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

    def watch_session(self, session_dir: str | None) -> None:
        """After ``ray.init``: this Ray's session folder (``address_info["session_dir"]``), so the
        reaper also knows processes by it (rules 2 and 3), whatever their environment holds."""
        if session_dir and self._w is not None:
            os.write(self._w, os.fsencode(session_dir) + b"\n")

    def close(self) -> None:
        """After ``ray.shutdown()``: the reaper removes stragglers, if any, and exits."""
        if self._w is not None:
            os.close(self._w)
            self._w = None
            self.proc.wait()


def _main(token: str, every_s: float = 0.5, settle_s: float = 0.3, most_s: float = 5.0) -> None:
    watch = Watch(token)
    pending = b""
    while True:  # until EOF (the driver closed its end, or died), scanning every ``every_s``
        ready, _, _ = select.select([sys.stdin.buffer], [], [], every_s)
        if ready:
            chunk = os.read(sys.stdin.fileno(), 65536)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                watch.add_session(line.strip().rstrip(b"/"))
        watch.scan()  # remembers this Ray's processes while their parents are alive
    # Kill, and scan again until nothing of this Ray has been seen for ``settle_s``: a raylet dying
    # with the driver may still be starting an agent.  Nothing found at all (after a normal
    # ray.shutdown()): exit at once.
    killed = False
    quiet_since = start = time.monotonic()
    while time.monotonic() - start < most_s:
        found = watch.scan()
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if found:
            killed, quiet_since = True, time.monotonic()
        elif not killed or time.monotonic() - quiet_since >= settle_s:
            break
        time.sleep(0.05)


if __name__ == "__main__":
    _main(sys.argv[1])
