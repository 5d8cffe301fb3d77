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

A workdir in a bucket (gs://...) gets `BucketLock` (`WorkdirLock(url)` returns one), with the same
guarantees and messages and no flock: the .lock object is created only if absent (a generation
precondition, `if_generation_match=0`), so of two runs creating it one gets "412 Precondition Failed". The
holder rewrites it every `HEARTBEAT_S` on the precondition that it is still the generation it wrote last; a
lock whose object is older than `STALE_AFTER_S` (by the bucket's clock against this host's: keep them in sync
with NTP) and whose holder is not a live process of this host is taken over by replacing that generation, so
two takers cannot both win. A heartbeat that finds another generation marks the lock lost, and `check`
raises WorkdirLost; `check` reads the object itself only once the last heartbeat is older than half of
`stale_after_s` (before that no other run may take it over), so a healthy run pays no request per check.
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

from jaxgpt.io import paths
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
    there was none). A bucket URL gets a `BucketLock`.
    """

    def __new__(cls, workdir: str | os.PathLike, *args: Any, **kwargs: Any) -> WorkdirLock:
        return super().__new__(BucketLock if cls is WorkdirLock and paths.is_url(workdir) else cls)

    def __init__(self, workdir: str | os.PathLike, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S) -> None:
        self.workdir = Path(workdir)
        wd = Workdir(self.workdir)
        self.path, self.guard_path = Path(wd.lock), Path(wd.lock_guard)  # a local disk: os calls on plain paths
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
            raise _foreign(self.workdir, self.path) from None
        return holder, time.time() - st.st_mtime

    def acquire(self) -> "WorkdirLock":
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self._guard():
            found = self._read()
            if found is not None:
                reason = stale_reason(*found, stale_after_s=self.stale_after_s)
                if reason is None:
                    raise _refused(self.workdir, found[0], self.path)
                self.taken_over = f"took over the lock of {describe(found[0])}: {reason}"
            holder = me()
            tmp = self.path.with_name(f"{self.path.name}.{holder['token']}")
            tmp.write_text(json.dumps(holder))
            os.replace(tmp, self.path)
            self.holder = holder
        self._start_heartbeat()
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
        raise _lost(self.workdir, now, self.stale_after_s)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="workdir-lock-heartbeat")
        self._beat.start()

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()

    def release(self) -> None:
        """Remove the lock if this process still holds it (never a lock another run has taken over since)."""
        if self.holder is None:
            return
        self._stop_heartbeat()
        with self._guard():
            if self._still_mine():
                self.path.unlink()
        self.holder = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _refused(workdir: Any, holder: dict[str, Any], path: Any) -> WorkdirLocked:
    return WorkdirLocked(f"{workdir} is in use by another training run ({describe(holder)}); wait for it to end or "
                         f"stop it, or use another --workdir (if that run is gone, delete {path})")


def _foreign(workdir: Any, path: Any) -> WorkdirLocked:
    return WorkdirLocked(f"{path} is not a jaxgpt lock file; if no run uses {workdir}, delete it and run again")


def _lost(workdir: Any, now: Any, stale_after_s: float) -> WorkdirLost:
    by = (f"by {describe(now)}" if isinstance(now, dict) else
          "(the lock file is gone)" if now is None else "(the lock file was replaced)")
    return WorkdirLost(f"{workdir}: this run lost its lock {by} while it was stalled past {stale_after_s:.0f} s; "
                       "it stops without writing, and the other run keeps the workdir")


class BucketLock(WorkdirLock):
    """The workdir lock in a bucket (gs://): one object, guarded by generation preconditions instead of flock
    (see the module docstring). Same interface, guarantees and messages as the local lock."""

    ATTEMPTS = 8  # create / take over rounds before giving up (each lost race re-reads the holder)

    def __init__(self, workdir: str | os.PathLike, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S) -> None:
        self.workdir = paths.as_path(workdir)
        self.path = Workdir(self.workdir).lock
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.holder: dict[str, Any] | None = None
        self.taken_over: str | None = None
        self.generation: int | None = None  # of the object this run wrote last
        self.beat_at = 0.0  # time.time() of that write
        self.lost = False  # a heartbeat found another generation
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._mutex = threading.Lock()  # the heartbeat thread and check/release share generation
        self._blob_ref = _gcs_blob(self.path)

    def _read(self) -> tuple[dict[str, Any], float, int] | None:
        """(holder, seconds since its last write, generation), or None when there is no lock object."""
        from google.api_core import exceptions as gexc

        for _ in range(self.ATTEMPTS):
            blob = self._blob_ref.bucket.get_blob(self._blob_ref.name)
            if blob is None:
                return None
            try:  # exactly the generation whose time was read
                text = blob.download_as_bytes(if_generation_match=blob.generation)
            except (gexc.PreconditionFailed, gexc.NotFound):
                continue  # rewritten or removed meanwhile: read again
            try:
                holder = json.loads(text)
                if not isinstance(holder, dict) or "pid" not in holder:
                    raise ValueError("no holder")
            except ValueError:
                raise _foreign(self.workdir, self.path) from None
            return holder, time.time() - blob.updated.timestamp(), int(blob.generation)
        raise WorkdirLocked(f"{self.path} changes too fast to read; another run is starting there: wait for it or use "
                            "another --workdir")

    def _write(self, holder: dict[str, Any], generation: int) -> int:
        """Write the lock object on the precondition that its generation is `generation` (0: absent); its new
        generation. Raises google.api_core.exceptions.PreconditionFailed when another write came first."""
        blob = self._blob_ref.bucket.blob(self._blob_ref.name)
        blob.upload_from_string(json.dumps(holder), content_type="application/json", if_generation_match=generation)
        return int(blob.generation)

    def acquire(self) -> BucketLock:
        from google.api_core import exceptions as gexc

        holder, taken = me(), None
        for _ in range(self.ATTEMPTS):
            found = self._read()
            if found is not None and found[0].get("token") == holder["token"]:
                self.generation = found[2]  # our write landed, its answer was lost and the retry met it: 412
                break
            if found is not None:
                reason = stale_reason(found[0], found[1], stale_after_s=self.stale_after_s)
                if reason is None:
                    raise _refused(self.workdir, found[0], self.path)
                taken = f"took over the lock of {describe(found[0])}: {reason}"
            try:
                self.generation = self._write(holder, 0 if found is None else found[2])
                break
            except gexc.PreconditionFailed:
                continue  # another run created or took it over first: look at the new holder
            except gexc.NotFound as e:
                bucket = paths.bucket_and_key(self.workdir)[0]
                raise FileNotFoundError(f"{self.workdir}: the bucket {bucket} does not exist or cannot be seen with "
                                        f"these credentials ({e.code}); create it (gcloud storage buckets create "
                                        f"gs://{bucket}) or fix --workdir") from None
        else:
            raise WorkdirLocked(f"{self.path} changes too fast to take; another run is starting there: wait for it or "
                                "use another --workdir")
        self.holder, self.taken_over, self.beat_at, self.lost = holder, taken, time.time(), False
        self._start_heartbeat()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._mutex:
                if self.lost or self.holder is None or not self._beat_once():
                    return

    def _beat_once(self) -> bool:
        """Rewrite the lock object on the precondition that it is the generation this run wrote last; False once
        the lock is lost (taken over or removed: `check` says by whom)."""
        from google.api_core import exceptions as gexc

        try:
            self.generation, self.beat_at = self._write(self.holder, self.generation), time.time()
        except (gexc.PreconditionFailed, gexc.NotFound):
            self.lost = not self._confirm_mine()
        except Exception:  # noqa: BLE001 - the network for a moment: the next beat tries again
            return True
        return not self.lost

    def _confirm_mine(self) -> bool:
        """After a heartbeat met another generation: is the object still this run's (a retried write of ours
        that had landed)? Unreadable for a moment counts as still this run's; the next beat looks again."""
        try:
            found = self._read()
        except WorkdirLocked:  # a foreign object in its place
            return False
        except Exception:  # noqa: BLE001
            return True
        if found is None or found[0].get("token") != self.holder["token"]:
            return False
        self.generation, self.beat_at = found[2], time.time() - found[1]
        return True

    def check(self) -> None:
        """Raise WorkdirLost when the lock is no longer this run's (see `WorkdirLock.check`)."""
        if self.holder is None:
            return
        with self._mutex:
            if not self.lost and time.time() - self.beat_at < self.stale_after_s / 2:
                return  # no run may take over a lock written this recently
            try:
                found = self._read()
            except WorkdirLocked:  # a foreign object in its place
                raise _lost(self.workdir, "replaced", self.stale_after_s) from None
            except Exception:  # noqa: BLE001 - unreadable for a moment: the next write looks again
                return
            if found is not None and found[0].get("token") == self.holder["token"]:
                self.generation, self.lost = found[2], False
                return
            self.lost = True
        raise _lost(self.workdir, None if found is None else found[0], self.stale_after_s)

    def release(self) -> None:
        """Remove the lock object if it is still the one this run wrote (never one taken over since)."""
        from google.api_core import exceptions as gexc

        if self.holder is None:
            return
        self._stop_heartbeat()
        with self._mutex:
            if not self.lost:
                with contextlib.suppress(gexc.PreconditionFailed, gexc.NotFound):
                    self._blob_ref.bucket.blob(self._blob_ref.name).delete(if_generation_match=self.generation)
            self.holder = None


def _gcs_blob(path: Any) -> Any:
    """The google-cloud-storage Blob of a gs:// path (credentials from the environment, as gcsfs finds them;
    STORAGE_EMULATOR_HOST points it at an emulator)."""
    if paths.scheme(path) != "gs":
        raise ValueError(f"{path}: a workdir lock in a bucket needs gs://; use a local workdir or a gs:// one")
    paths.require_backend(str(path))
    from google.cloud import storage

    bucket, key = paths.bucket_and_key(path)
    try:
        client = storage.Client(project=None)
    except Exception as e:  # noqa: BLE001 - google.auth raises its own types for missing or bad credentials
        raise RuntimeError(f"{path}: no Google Cloud credentials to reach the bucket ({type(e).__name__}); run "
                           "`gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS") from None
    return client.bucket(bucket).blob(key)


def holder_of(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The recorded holder of a workdir's lock (live or stale), or None; for tools that report on a run."""
    try:
        return json.loads(Workdir(workdir).lock.read_text())
    except (OSError, ValueError):
        return None
