"""One training run per workdir: a lock file that names its holder.

`train` holds `<workdir>/.lock` while it runs (process 0 only in a multi-process run). A second run on the
same workdir is refused at once with one line naming the holder (host, PID, start time), instead of both
runs saving the same steps and crashing. Readers (`jaxgpt.sample`, `jaxgpt.eval`, exports,
`checkpoint.load_run`) never look at the lock.

A lock whose holder is gone is taken over:
- same host: the PID no longer exists, or it now names another process (its start time differs from the one
  recorded: the PID was reused), or the machine rebooted since (another boot id);
- another host (a shared filesystem): the holder touches the file every `HEARTBEAT_S` seconds; a lock not
  touched for `STALE_AFTER_S` seconds is stale. Hosts sharing a workdir must keep their clocks in sync.

A run that stalls past that (a frozen VM) and wakes to find its lock taken over stops before its next write
(`WorkdirLock.check`, raising WorkdirLost), so the two runs never both write.

Checking and replacing the lock happens under an exclusive `flock` of `<workdir>/.lock.guard`, so two runs
starting together cannot both take it; the lock file itself is written to a temporary name and renamed, so
a reader never sees half of it. This module imports no JAX.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from jaxgpt.io.workdir import Workdir

HEARTBEAT_S = 30.0  # the holder touches the lock file this often
STALE_AFTER_S = 300.0  # a lock of another host untouched this long is stale (its holder is presumed dead)


class WorkdirLocked(RuntimeError):
    """The workdir is held by a live run."""


class WorkdirLost(WorkdirLocked):
    """Another run took over this run's lock (this run stalled past STALE_AFTER_S): it must stop writing."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """When `pid` started, as an opaque token (clock ticks since boot on Linux); None where unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name before ")" may hold spaces


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def me() -> dict[str, Any]:
    """This process as a lock holder."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": process_start(pid), "boot_id": _boot_id(),
            "started": time.time(), "token": uuid.uuid4().hex}


def stale_reason(holder: dict[str, Any], age_s: float, stale_after_s: float = STALE_AFTER_S) -> str | None:
    """Why the holder of a lock is gone (None: it may be alive). `age_s`: seconds since its last heartbeat."""
    if holder.get("host") != socket.gethostname():
        return f"no heartbeat from host {holder.get('host')} for {age_s:.0f} s" if age_s > stale_after_s else None
    if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
        return "the machine rebooted since"
    pid = int(holder.get("pid", -1))
    if pid <= 0 or not _pid_exists(pid):
        return f"PID {pid} is gone"
    start = process_start(pid)
    if holder.get("start") and start and start != holder["start"]:
        return f"PID {pid} now belongs to another process"
    return None


def describe(holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return f"host {holder.get('host')}, PID {holder.get('pid')}, started {started}"


class WorkdirLock:
    """`with WorkdirLock(workdir):` hold the workdir for one run (see the module docstring).

    Raises WorkdirLocked when a live run holds it. `taken_over` tells why a stale lock was replaced (None when
    there was none).
    """

    def __init__(self, workdir: str | os.PathLike, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S) -> None:
        self.workdir = Path(workdir)
        self.path, self.guard_path = Workdir(self.workdir).lock, Workdir(self.workdir).lock_guard
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.holder: dict[str, Any] | None = None
        self.taken_over: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @contextlib.contextmanager
    def _guard(self):
        """Exclusive among processes that check or replace the lock (released by the kernel if one dies)."""
        with open(self.guard_path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read(self) -> tuple[dict[str, Any], float] | None:
        """(holder, seconds since its heartbeat), or None when there is no lock file."""
        try:
            st, text = self.path.stat(), self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
            if not isinstance(holder, dict) or "pid" not in holder:
                raise ValueError("no holder")
        except ValueError:
            raise WorkdirLocked(f"{self.path} is not a jaxgpt lock file; if no run uses {self.workdir}, delete it "
                                "and run again") from None
        return holder, time.time() - st.st_mtime

    def acquire(self) -> "WorkdirLock":
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self._guard():
            found = self._read()
            if found is not None:
                reason = stale_reason(*found, stale_after_s=self.stale_after_s)
                if reason is None:
                    raise WorkdirLocked(
                        f"{self.workdir} is in use by another training run ({describe(found[0])}); wait for it to "
                        f"end or stop it, or use another --workdir (if that run is gone, delete {self.path})")
                self.taken_over = f"took over the lock of {describe(found[0])}: {reason}"
            holder = me()
            tmp = self.path.with_name(f"{self.path.name}.{holder['token']}")
            tmp.write_text(json.dumps(holder))
            os.replace(tmp, self.path)
            self.holder = holder
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="workdir-lock-heartbeat")
        self._beat.start()
        return self

    def _still_mine(self) -> bool:
        try:
            return json.loads(self.path.read_text()).get("token") == self.holder["token"]
        except (OSError, ValueError):
            return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(OSError):
                if self._still_mine():
                    os.utime(self.path)

    def check(self) -> None:
        """Raise WorkdirLost when the lock is no longer this run's: another run took it over while this one
        stalled (a frozen VM, SIGSTOP) past STALE_AFTER_S. The trainer calls it before every checkpoint and
        metrics flush, so a run that wakes up stops before writing over its successor."""
        if self.holder is None:
            return
        try:  # one read: the holder now, or None when the file is gone
            now = json.loads(self.path.read_text())
        except FileNotFoundError:
            now = None
        except (OSError, ValueError):  # unreadable for a moment (a shared filesystem): the next write looks again
            return
        if isinstance(now, dict) and now.get("token") == self.holder["token"]:
            return
        by = (f"by {describe(now)}" if isinstance(now, dict) else
              "(the lock file is gone)" if now is None else "(the lock file was replaced)")
        raise WorkdirLost(f"{self.workdir}: this run lost its lock {by} while it was stalled past "
                          f"{self.stale_after_s:.0f} s; it stops without writing, and the other run keeps the "
                          "workdir")

    def release(self) -> None:
        """Remove the lock if this process still holds it (never a lock another run has taken over since)."""
        if self.holder is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        with self._guard():
            if self._still_mine():
                self.path.unlink()
        self.holder = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def holder_of(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The recorded holder of a workdir's lock (live or stale), or None; for tools that report on a run."""
    try:
        return json.loads(Workdir(workdir).lock.read_text())
    except (OSError, ValueError):
        return None
