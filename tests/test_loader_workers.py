"""Tests of mae_jax.loader_workers: loader workers die with a SIGKILLed trainer, and a loader's
start unlinks the shared memory of dead runs and nothing else.

One trainer subprocess serves every test (a spawned worker takes seconds to start): before it
starts, fake leftover segments are put in /dev/shm; it builds a loader with one worker process,
reads a batch and prints its children (the worker and multiprocessing's resource tracker); the
test lists the run's segments, then SIGKILLs it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import signal
import subprocess
import sys
import time

import pytest

from mae_jax import loader_workers
from tests.test_data import _solid_folder

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="workers watch their trainer through a Linux pidfd; segments are files of /dev/shm",
)

SHM = loader_workers.SHM_DIR
EXIT_WAIT_S = 10.0
_TRAINER = """
import glob, os, sys, time
from mae_jax import data

loader = data.pretrain_batches(
    data.ImageFolder(sys.argv[1]), batch_size=2, img_size=8, seed=0, worker_count=1
)
next(loader)
lists = glob.glob(f"/proc/{os.getpid()}/task/*/children")
print(" ".join(pid for path in lists for pid in open(path).read().split()), flush=True)
time.sleep(300)
"""


def _reaped_pid() -> int:
    """The pid of a process that has exited and been reaped: no process has it now."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _is_gone(pid: int) -> bool:
    """No such process, or a zombie whose parent (init, after the trainer died) has not reaped it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def _stop(children: list[int]) -> None:
    """Never leave the run's processes behind, whatever failed: SIGKILL the worker, give the
    resource tracker a few seconds to unlink the run's segments and exit, then SIGKILL it too."""
    for pid in children:
        if not _is_resource_tracker(pid):
            _kill(pid)
    _wait_until(lambda: all(_is_gone(pid) for pid in children), 5.0)
    for pid in children:
        _kill(pid)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _is_resource_tracker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"resource_tracker" in f.read()
    except FileNotFoundError:
        return False


def _wait_until(done, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _put_segment(name: str) -> None:
    """A segment as glibc's shm_open makes one: a file of /dev/shm."""
    with open(os.path.join(SHM, name), "xb") as f:
        f.write(b"\0" * 64)


def _exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM, name))


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """Starts the trainer over planted leftovers, SIGKILLs it; yields what was seen."""
    images = tmp_path_factory.mktemp("images")
    _solid_folder(images, 4)
    planted = dict(
        dead_run=loader_workers.segment_name(_reaped_pid()),
        live_run=loader_workers.segment_name(os.getpid()),
        other_namespace=f"{loader_workers.SEGMENT_PREFIX}-1-{_reaped_pid()}-{secrets.token_hex(8)}",
        not_ours=f"psm_{secrets.token_hex(4)}",
    )
    for name in planted.values():
        _put_segment(name)
    stderr = tmp_path_factory.mktemp("trainer") / "stderr.txt"
    children: list[int] = []
    try:
        with open(stderr, "wb") as err:
            trainer = subprocess.Popen(
                [sys.executable, "-c", _TRAINER, str(images)], stdout=subprocess.PIPE, stderr=err
            )
        try:
            ready, _, _ = select.select([trainer.stdout], [], [], 120)
            line = trainer.stdout.readline().decode() if ready else ""
            if not line:
                pytest.fail(f"the trainer printed no children; stderr:\n{stderr.read_text()}")
            children = [int(pid) for pid in line.split()]
            owner = loader_workers.segment_name(trainer.pid).rpartition("-")[0]
            run_segments = [n for n in os.listdir(SHM) if n.rpartition("-")[0] == owner]
            kept = {kind: _exists(name) for kind, name in planted.items()}
        finally:
            trainer.send_signal(signal.SIGKILL)
            trainer.wait()
            trainer.stdout.close()
        yield dict(children=children, run_segments=run_segments, kept=kept)
    finally:
        _stop(children)
        for name in planted.values():
            if _exists(name):
                os.unlink(os.path.join(SHM, name))


def test_worker_and_resource_tracker_exit_when_the_trainer_is_sigkilled(killed_run):
    children = killed_run["children"]
    assert len(children) == 2, "expected one worker and the resource tracker"
    _wait_until(lambda: all(_is_gone(pid) for pid in children), EXIT_WAIT_S)
    alive = [pid for pid in children if not _is_gone(pid)]
    assert not alive, f"still alive {EXIT_WAIT_S} s after the trainer's SIGKILL: {alive}"


def test_the_runs_segments_carry_its_pid_and_are_unlinked_after_the_kill(killed_run):
    segments = killed_run["run_segments"]
    assert segments, "no segment of /dev/shm names the trainer's pid"
    _wait_until(lambda: not any(_exists(n) for n in segments), EXIT_WAIT_S)
    assert not [n for n in segments if _exists(n)]


def test_loader_start_unlinks_dead_runs_segments_and_nothing_else(killed_run):
    assert killed_run["kept"] == dict(
        dead_run=False, live_run=True, other_namespace=True, not_ours=True
    )
