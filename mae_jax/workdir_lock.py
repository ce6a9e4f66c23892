"""One run per workdir: ``<workdir>/lock`` names the process that holds it.

On a local or shared file system the lock is an advisory ``flock`` on that file, which the kernel
releases when its holder dies however it dies (SIGKILL, the OOM killer): a second run is refused
at once naming the holder's host and process, and the lock of a killed run is simply taken over.

A bucket has no locks. There the file is a lease: its holder rewrites it every ``HEARTBEAT_S``
seconds, a second run is refused while the lease is younger than ``STALE_S``, and an older one
(its holder is gone) is taken over, as is a younger one whose holder ran on this host and is gone
(a killed run resumed on the same machine). Two runs started within the same second on one bucket
workdir can both take it (object stores have no atomic create here); after that the lease
holder is whoever wrote last, and the other run stops at its next heartbeat.

With several hosts the first host takes the lock for the run and the others follow its verdict.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from typing import Any

import jax

from mae_jax import multihost
from mae_jax._files import atomic_write, is_url, naming

HEARTBEAT_S = 60.0
STALE_S = 300.0


class WorkdirBusyError(OSError):
    """Another live run holds the workdir."""


def _holder_text(path: Any) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"process {holder['pid']} on host {holder['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _may_live(holder: dict[str, Any]) -> bool:
    """Whether the lease's holder may still run: False for this process, and for a process of
    this host that is gone (a killed run resumed on the same machine takes its lease at once)."""
    if holder["host"] != socket.gethostname():
        return True
    if holder["pid"] == os.getpid():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}


class WorkdirLock:
    """Held from ``acquire`` to ``release`` (a context manager does both)."""

    def __init__(self, workdir: Any):
        self.path = workdir / "lock"
        self._file = None
        self._lease: threading.Thread | None = None
        self._stop = threading.Event()
        self.lost = False  # a bucket lease taken over by another run

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock (on the first host), or WorkdirBusyError naming its holder on every host."""
        refusal = ""
        if jax.process_index() == 0:
            refusal = self._take_bucket() if is_url(self.path) else self._take_local()
        if multihost.gather_ints([bool(refusal)]).any():
            raise WorkdirBusyError(
                refusal
                or f"{self.path}: the first host could not take the workdir's lock (see its log)"
            )

    def _take_local(self) -> str:
        import fcntl

        with naming(self.path):
            handle = open(self.path, "a+")  # noqa: SIM115 (held open while the run lives)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return (
                f"{self.path}: the workdir is in use by {_holder_text(self.path)}; "
                "wait for it to finish or use another --workdir"
            )
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(_me()) + "\n")
        handle.flush()
        self._file = handle
        return ""

    def _take_bucket(self) -> str:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            holder = json.loads(self.path.read_text())
            age = time.time() - float(holder["time"])
            if age < STALE_S and _may_live(holder):
                return (
                    f"{self.path}: the workdir is in use by {_holder_text(self.path)} (lease "
                    f"renewed {age:.0f} s ago; taken over after {STALE_S:.0f} s without renewal); "
                    "wait for it to finish or use another --workdir"
                )
        self._renew()
        self._lease = threading.Thread(target=self._keep_lease, daemon=True, name="workdir-lease")
        self._lease.start()
        return ""

    def _renew(self) -> None:
        me = _me()
        self._written = (me["host"], me["pid"])
        atomic_write(self.path, json.dumps(me) + "\n")

    def _keep_lease(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                holder = json.loads(self.path.read_text())
                if (holder["host"], holder["pid"]) != self._written:
                    self.lost = True
                    return
                self._renew()

    def check(self) -> None:
        """WorkdirBusyError if another run took the bucket lease over (called at saves)."""
        if self.lost:
            raise WorkdirBusyError(
                f"{self.path}: another run took this workdir over ({_holder_text(self.path)}); "
                "stopped without saving"
            )

    def release(self) -> None:
        """Let the workdir go (a bucket lease is deleted; a local lock file stays, unlocked)."""
        if self._lease is not None:
            self._stop.set()
            self._lease.join()
            self._lease = None
            if not self.lost:
                with contextlib.suppress(OSError):
                    self.path.unlink()
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None
