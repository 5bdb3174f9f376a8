"""The writer's lock on a trace store.

``<store>/.workbench.lock`` is created with O_CREAT|O_EXCL and holds JSON {pid, host, boot_id,
start_ticks, created, token, argv}. A second writer gets ``TraceLockedError`` naming the holder's
pid and host. A lock whose holder is provably dead (same host and: pid gone, pid a zombie, pid
reused - process start time differs - or the machine rebooted since) is taken over with a
``UserWarning``; the take-over is serialised by a second O_EXCL file so that two writers cannot
both take it. Locks held from another host are never broken automatically. The lock is released
by the writer's ``close()`` (also on garbage collection / interpreter exit of an unclosed writer).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import uuid
import warnings
from pathlib import Path

from workbench.trace._util import now
from workbench.trace.errors import TraceLockedError

__all__ = ["LOCK_NAME", "BREAK_NAME", "Lock"]

LOCK_NAME = ".workbench.lock"
BREAK_NAME = ".workbench.lock.break"

def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process, from /proc (Linux); None if unknown."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        fields = raw[raw.rindex(")") + 2 :].split()
        return fields[0], int(fields[19])
    except (ValueError, IndexError):
        return None


def _lock_is_stale(info: dict) -> tuple[bool, str]:
    host = info.get("host")
    if host != socket.gethostname():
        return False, f"held from another host ({host}); cannot check whether it is alive"
    boot = info.get("boot_id")
    if boot and _boot_id() and boot != _boot_id():
        return True, "the machine has rebooted since the lock was taken"
    try:
        pid = int(info.get("pid"))
    except (TypeError, ValueError):
        return True, "the lock file names no valid pid"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True, f"process {pid} is not running"
    except PermissionError:
        pass
    except (OverflowError, ValueError):
        return True, f"invalid pid {pid}"
    st = _proc_stat(pid)
    if st is not None:
        state, ticks = st
        if state in ("Z", "X"):
            return True, f"process {pid} has exited (zombie)"
        if info.get("start_ticks") is not None and ticks != info["start_ticks"]:
            return True, f"pid {pid} now belongs to another process"
    return False, f"process {pid} is alive"


def _read_lock_bytes(lock: Path) -> bytes | None:
    try:
        return lock.read_bytes()
    except FileNotFoundError:
        return None


class Lock:
    """O_CREAT|O_EXCL lock file inside the store directory."""

    def __init__(self, path: Path, token: str):
        self.path = path
        self.token = token
        self.released = False

    @classmethod
    def acquire(cls, store_dir: Path) -> "Lock":
        lock = store_dir / LOCK_NAME
        token = uuid.uuid4().hex
        st = _proc_stat(os.getpid())
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "boot_id": _boot_id(),
            "start_ticks": None if st is None else st[1],
            "created": now(),
            "token": token,
            "argv": sys.argv[:4],
        }
        deadline = time.monotonic() + 10.0
        while True:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raw = _read_lock_bytes(lock)
                if raw is None:  # released meanwhile
                    continue
                try:
                    holder = json.loads(raw)
                    if not isinstance(holder, dict):
                        raise ValueError
                except ValueError:
                    # being written right now, or left empty by a writer killed at creation
                    try:
                        age = time.time() - lock.stat().st_mtime
                    except FileNotFoundError:
                        continue
                    if age < 5.0 and time.monotonic() < deadline:
                        time.sleep(0.05)
                        continue
                    holder = {}
                    stale, why = True, "the lock file is empty or unreadable"
                else:
                    stale, why = _lock_is_stale(holder)
                if not stale:
                    raise TraceLockedError(
                        f"{store_dir} is locked by another writer: pid {holder.get('pid')} on host "
                        f"{holder.get('host')} since {holder.get('created')} ({why}). Close that "
                        f"writer first; if it is gone, delete {lock}"
                    )
                if cls._break(store_dir, lock, raw):
                    warnings.warn(
                        f"taking over the stale lock of {store_dir}: pid {holder.get('pid')} on "
                        f"host {holder.get('host')} ({why})",
                        UserWarning,
                        stacklevel=4,
                    )
                elif time.monotonic() > deadline:
                    raise TraceLockedError(f"could not take over the stale lock {lock}")
                else:
                    time.sleep(0.02)
                continue
            try:
                os.write(fd, json.dumps(info).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            return cls(lock, token)

    @staticmethod
    def _break(store_dir: Path, lock: Path, judged: bytes) -> bool:
        """Remove the stale lock whose content was `judged`, serialised by another O_EXCL file."""
        breaker = store_dir / BREAK_NAME
        try:
            bfd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - breaker.stat().st_mtime > 30.0:  # breaker of a dead process
                    breaker.unlink()
            return False
        try:
            if _read_lock_bytes(lock) == judged:  # still the stale lock, not a fresh one
                lock.unlink()
                return True
            return False
        finally:
            os.close(bfd)
            with contextlib.suppress(FileNotFoundError):
                breaker.unlink()

    @staticmethod
    def _release(path: Path, token: str) -> None:
        raw = _read_lock_bytes(path)
        if raw is None:
            return
        try:
            mine = json.loads(raw).get("token") == token
        except (ValueError, AttributeError):
            mine = False
        if mine:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._release(self.path, self.token)


