"""Loader worker processes that die with the trainer, and shared memory that dies with its run.

With ``worker_count > 0`` the loaders start grain worker processes (``mp_prefetch``, by spawn),
which hand batches to the trainer in POSIX shared-memory segments (files in ``/dev/shm``). Left
alone, a worker outlives a trainer killed by SIGKILL (the OOM killer's way): it blocks on a full
queue forever, holding its memory, and multiprocessing's resource tracker, which would unlink the
run's segments and semaphores once every process using it is gone, waits on the worker too.

- ``worker_start_hook()`` is the ``worker_init_fn`` that grain runs in each worker before it
  reads anything. The worker exits at once if the trainer is already gone, and otherwise starts a
  thread that waits on a pidfd of the trainer and exits the worker the moment the trainer exits,
  however it died. Once the workers are gone, the resource tracker unlinks what the run left and
  exits too (checked by killing a trainer: it reported the run's segments and semaphores leaked,
  unlinked them and exited). The hook also names the worker's segments after the trainer:
  ``mae_jax-<pid namespace>-<trainer pid>-<random hex>``.
- ``remove_dead_runs_segments()``, called before a loader starts its workers, unlinks the
  segments of runs whose trainer is dead: those the tracker could not clean because it was killed
  too (a whole process group or cgroup killed at once).

Why a pidfd and not ``prctl(PR_SET_PDEATHSIG)``: the parent-death signal fires when the *thread*
that started the child exits, not the process, and grain starts each worker from a prefetch
thread that it stops and restarts while the trainer lives (on ``set_state``, after an error).
Checked with grain 0.2.18: with that signal set in the worker, an iterator's ``set_state`` killed
its worker and the next batch never came. The pidfd follows the trainer process itself. Where
``pidfd_open`` is refused (Linux before 5.3, a seccomp filter), the thread polls ``os.getppid()``
every half second instead.

Why names: Python names the segments it creates ``psm_<8 random hex digits>``, which says neither
who made them nor for whom, and a segment in flight between a worker and its trainer is mapped by
no process, so the mapping tables cannot tell a live run's segment from a leftover either. A name
that carries the trainer's pid is a proof of ownership that needs no registry file: a segment is
removed only if its name is ours, its pid namespace is this process's (``/dev/shm`` can be shared
between containers whose pids mean different processes) and no process with that pid exists. A pid
reused by another process keeps a leftover a while longer; it never removes a live run's segment.
The name is set by replacing ``multiprocessing.shared_memory._make_filename`` inside the worker
processes only; should a later Python drop that function, segments keep Python's names (and the
test of this module fails) while the workers still exit with their trainer.

Left alone: the trainer's semaphores (``/dev/shm/sem.mp-*``, 32 bytes each) are named by
multiprocessing with no owner either; the resource tracker unlinks them.

Linux only: on other platforms ``worker_start_hook()`` returns None and
``remove_dead_runs_segments()`` does nothing.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import secrets
import select
import sys
import threading
import time
from collections.abc import Callable

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "mae_jax"
# mae_jax-<pid namespace inode>-<trainer pid>-<random hex>
_SEGMENT_NAME = re.compile(
    rf"{SEGMENT_PREFIX}-(?P<namespace>\d+)-(?P<pid>[1-9]\d{{0,6}})-[0-9a-f]+"
)
_PARENT_POLL_S = 0.5
_LOG = logging.getLogger(__name__)


@functools.cache
def _pid_namespace() -> int | None:
    """This process's pid namespace (the inode of /proc/self/ns/pid); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def segment_name(trainer_pid: int) -> str:
    """A fresh name for a segment of the run of ``trainer_pid``, a process of this pid namespace."""
    return f"{SEGMENT_PREFIX}-{_pid_namespace()}-{trainer_pid}-{secrets.token_hex(8)}"


def worker_start_hook() -> Callable[[int, int], None] | None:
    """grain's ``worker_init_fn`` for workers started by this process; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    return functools.partial(_on_worker_start, os.getpid())


def _on_worker_start(trainer_pid: int, worker_index: int, worker_count: int) -> None:
    """Runs first in each worker process: tie the worker's life and its segments to the trainer."""
    _exit_with(trainer_pid)
    if _pid_namespace() is None:  # a spawned worker shares its trainer's pid namespace
        return
    from multiprocessing import shared_memory

    if not hasattr(shared_memory, "_make_filename"):
        _LOG.warning("cannot name shared memory after its run in this Python; left to the tracker")
        return
    # SharedMemory(create=True) without a name asks this function for one ("/" + name).
    shared_memory._make_filename = lambda: "/" + segment_name(trainer_pid)


def _exit_with(trainer_pid: int) -> None:
    """Exit this process now if ``trainer_pid`` is no longer its parent, else when it exits."""
    try:
        pidfd: int | None = os.pidfd_open(trainer_pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd here: poll the parent pid instead
        pidfd = None
    # Checked after pidfd_open: the trainer may have died before, and its pid been reused since.
    if os.getppid() != trainer_pid:
        os._exit(1)
    threading.Thread(
        target=_wait_for_exit, args=(trainer_pid, pidfd), name="mae-jax-trainer-watch", daemon=True
    ).start()


def _wait_for_exit(trainer_pid: int, pidfd: int | None) -> None:
    if pidfd is not None:
        select.select([pidfd], [], [])  # readable once the trainer process has exited
    else:
        while os.getppid() == trainer_pid:
            time.sleep(_PARENT_POLL_S)
    os._exit(1)  # no clean-up: whatever would block on the dead trainer's queues is skipped


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def remove_dead_runs_segments() -> list[str]:
    """Unlinks the shared-memory segments whose run's trainer is dead; returns their names.

    Only names made by ``segment_name`` in this pid namespace, and only when no process has the
    trainer's pid; everything else in ``/dev/shm`` is left alone. Off Linux: nothing, [].
    """
    namespace = _pid_namespace()
    if namespace is None:
        return []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        match = _SEGMENT_NAME.fullmatch(name)
        if match is None or int(match["namespace"]) != namespace or _is_alive(int(match["pid"])):
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:  # another starting run removed it first
            continue
        except OSError as err:
            _LOG.warning("cannot remove a dead run's shared memory %s: %s", name, err)
            continue
        removed.append(name)
    if removed:
        _LOG.info("removed %d shared-memory segments left by dead runs", len(removed))
    return removed
