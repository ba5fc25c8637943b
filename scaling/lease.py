"""The one run-directory lock: a lease file that says who trains a directory, and until when.

``<run dir>/lock`` holds JSON ``{host, pid, pid_start, token, acquired, heartbeat,
stale_after_s}``. The holder rewrites ``heartbeat`` every ``stale_after_s / 4`` seconds from a
background thread. A lease is **live** while its heartbeat is younger than ``stale_after_s``
and, when it was written on this host, its process still exists (same PID and start time, so a
reused PID does not count). A lease that is not live is **stale** and the next process to ask
takes it over with a one-line notice. This works on a local disk and on NFS, where a kernel
``flock`` alone is not enough: a lock held by a process on another host, or a dead host, is
judged by its heartbeat.

Who uses it: ``scaling train`` (``scaling.train.loop.run``) on its ``--out`` and the sweep
workers on each trial directory (the same process may take the same directory again: leases
are re-entrant within a process). Readers (``scaling.runs.load``, ``scaling status``) call
``holder``/``is_live`` and never take the lease.

Races: a lease is written to a temp file and hard-linked into place, so it appears whole and
of two processes one wins. Taking over a stale lease and the holder's heartbeat rewrites happen
under an ``flock`` on ``lock.guard``, and each re-reads the lease (and its inode and mtime)
first, so a heartbeat never overwrites a lease that another process took over, and a take-over
never removes a lease that changed meanwhile. The old holder learns it ``lost`` the lease (at
its next heartbeat or ``check()``) and stops writing. "Its process is gone" is judged only
within one host, boot and PID namespace; otherwise by the heartbeat's age, which assumes the
hosts' clocks agree to well within the timeout.

``SCALING_LEASE_STALE_S`` sets the staleness timeout (seconds, default 120).

Standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from scaling.errors import LeaseLost, RunDirBusy
from scaling.files import read_json, write_json_atomic

LEASE = "lock"
GUARD = "lock.guard"
DEFAULT_STALE_S = 120.0


def stale_after_s() -> float:
    """Seconds after its last heartbeat that a lease counts as stale (``SCALING_LEASE_STALE_S``)."""
    try:
        return max(1e-3, float(os.environ.get("SCALING_LEASE_STALE_S", DEFAULT_STALE_S)))
    except ValueError:
        return DEFAULT_STALE_S


def _pid_start(pid: int) -> str | None:
    """The process start time in clock ticks since boot (Linux ``/proc``), to tell a reused PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22; the name in (...) may hold spaces


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _same_pid_space(lease: dict) -> bool:
    """Whether this process can see the lease holder's PID: same host, same boot and same PID
    namespace (containers that share a hostname have PID namespaces of their own)."""
    if lease.get("host") != socket.gethostname():
        return False
    for key, here in (("boot_id", _read("/proc/sys/kernel/random/boot_id")), ("pid_ns", _pid_namespace())):
        if lease.get(key) is not None and here is not None and lease[key] != here:
            return False
    return True


def _pid_alive(pid: int, start: str | None) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    except OSError:
        return False
    now = _pid_start(pid)
    return start is None or now is None or now == start


def holder(run_dir: str | Path) -> dict | None:
    """The lease in ``run_dir`` as written (or ``None``: no lease, or an unreadable one such as
    the empty ``lock`` file of an older version). Reads only."""
    d = read_json(Path(run_dir) / LEASE)
    if not isinstance(d, dict):
        return None
    try:
        d["pid"], d["heartbeat"] = int(d["pid"]), float(d.get("heartbeat", 0))
    except (KeyError, TypeError, ValueError):
        return None
    return d


def why_stale(lease: dict | None, *, now: float | None = None) -> str | None:
    """``None`` when ``lease`` is live, else why it is not (for the take-over notice)."""
    if lease is None:
        return "no readable lease"
    now = time.time() if now is None else now
    age = now - float(lease.get("heartbeat", 0))
    limit = float(lease.get("stale_after_s") or stale_after_s())
    if _same_pid_space(lease) and not _pid_alive(lease["pid"], lease.get("pid_start")):
        return "its process is gone"
    if age > limit:
        return f"last heartbeat {age:.0f} s ago (stale after {limit:g} s)"
    return None


def is_live(lease: dict | None) -> bool:
    return why_stale(lease) is None


def is_running(run_dir: str | Path) -> bool:
    """Whether a live process holds ``run_dir``'s lease (reads the lease file only)."""
    return is_live(holder(run_dir))


# leases held by this process: resolved dir -> RunLease (re-entrant)
_HELD: dict[str, "RunLease"] = {}
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def _guard(run_dir: Path):
    fd = os.open(run_dir / GUARD, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class RunLease:
    """``with RunLease(run_dir):`` hold ``run_dir``'s lease; raises ``RunDirBusy`` (exit 2 from
    the CLI: "run directory is in use by PID n on HOST") when a live process holds it, this one
    included. With ``join=True`` a lease this process already holds is joined instead (the
    trainer inside a sweep worker that leased the trial); it is released with the outermost.

    ``lost`` becomes true if another process took the lease over (this one was judged stale,
    e.g. it was stopped for longer than the timeout) or if no heartbeat could be written for
    half the timeout; ``check()`` (which also re-reads the lease file) raises ``LeaseLost``
    then, and writers call it before they write.
    """

    def __init__(self, run_dir: str | Path, *, join: bool = False, quiet: bool = False):
        self.dir = Path(run_dir)
        self.join = join
        self.quiet = quiet
        self._key = str(self.dir.absolute().resolve())
        self._depth = 0
        self._outer: RunLease | None = None
        self._token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_beat = 0.0
        self.lost = False

    # ---- acquire / release -------------------------------------------------------------
    def __enter__(self) -> "RunLease":
        with _HELD_LOCK:
            held = _HELD.get(self._key)
            if held is not None:
                if not self.join:
                    raise RunDirBusy(self.dir, holder(self.dir) or {"pid": os.getpid(), "host": socket.gethostname()})
                held._depth += 1
                self._outer = held
                return held
            self._acquire()
            _HELD[self._key] = self
            self._depth = 1
        return self

    def __exit__(self, *exc) -> None:
        target = self._outer or self
        with _HELD_LOCK:
            target._depth -= 1
            last = target._depth == 0
            if last:
                _HELD.pop(target._key, None)
        if last:
            target._release()

    def _lease(self, heartbeat: float) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
                "boot_id": _read("/proc/sys/kernel/random/boot_id"), "pid_ns": _pid_namespace(),
                "token": self._token, "acquired": self._acquired, "heartbeat": heartbeat,
                "stale_after_s": stale_after_s(), "argv": " ".join(sys.argv)[:300]}

    def _acquire(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / LEASE
        self._token = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(6).hex()}"
        self._acquired = time.time()
        for _ in range(100):
            # the lease appears whole or not at all: written to a temp file, then linked into
            # place (link fails if the name exists, on a local disk and on NFS alike)
            tmp = self.dir / f".{LEASE}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
            tmp.write_text(json.dumps(self._lease(time.time())))
            try:
                os.link(tmp, path)
                created = True
            except FileExistsError:
                created = False
            finally:
                tmp.unlink(missing_ok=True)
            if created:
                self._last_beat = time.monotonic()
                self._thread = threading.Thread(target=self._beat, name=f"lease:{self.dir.name}", daemon=True)
                self._thread.start()
                return
            seen = holder(self.dir)
            if seen is not None and is_live(seen):
                raise RunDirBusy(self.dir, seen) from None
            self._take_over(seen)
        raise RunDirBusy(self.dir, holder(self.dir))  # the lease kept changing hands

    def _take_over(self, seen: dict | None) -> None:
        """Remove the stale lease ``seen`` unless it changed meanwhile (then the caller looks again)."""
        raw = self.dir / LEASE
        try:
            before = raw.stat()
        except FileNotFoundError:
            return
        with _guard(self.dir):
            try:
                now_stat = raw.stat()
            except FileNotFoundError:
                return
            if (now_stat.st_ino, now_stat.st_mtime_ns) != (before.st_ino, before.st_mtime_ns) or holder(self.dir) != seen:
                return  # someone else took it over, or its holder beat: look again
            if seen is None and not _flock_free(raw):
                raise RunDirBusy(self.dir, {"pid": "?", "host": "(an older scaling version holding it)"})
            raw.unlink()
        if not self.quiet and seen is not None:
            print(f"{self.dir}: took over a stale lease of PID {seen.get('pid')} on {seen.get('host')} "
                  f"({why_stale(seen)})", file=sys.stderr)

    def _beat(self) -> None:
        interval = stale_after_s() / 4
        while not self._stop.wait(interval):
            try:
                if not self.heartbeat():
                    return
            except Exception:  # a full disk, NFS trouble: try again, give up after half the timeout
                if time.monotonic() - self._last_beat > stale_after_s() / 2:
                    self.lost = True
                    return

    def heartbeat(self) -> bool:
        """Refresh the lease's heartbeat; False (and ``lost``) when another process holds it now."""
        with _guard(self.dir):
            now = holder(self.dir)
            if now is None or now.get("token") != self._token:
                self.lost = True
                return False
            write_json_atomic(self.dir / LEASE, self._lease(time.time()), indent=None)
        self._last_beat = time.monotonic()
        return True

    def check(self) -> None:
        """Raise ``LeaseLost`` when this process no longer holds the lease (reads the lease file)."""
        target = self._outer or self
        if not target.lost:
            now = holder(target.dir)
            target.lost = now is None or now.get("token") != target._token
        if target.lost:
            raise LeaseLost(f"{self.dir}: another process took over this run directory's lease "
                            f"(this one was judged stale); stopping without writing")

    def _release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with _guard(self.dir):
                now = holder(self.dir)
                if now is not None and now.get("token") == self._token:
                    (self.dir / LEASE).unlink()
        except OSError:
            pass  # the directory went away; nothing to release


def _flock_free(path: Path) -> bool:
    """Whether no process of an older version holds its kernel lock on ``path`` (those wrote an
    empty ``lock`` file and held ``flock`` on it while training)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
