"""Two hosts stopped and resumed (a preemption notice, SIGKILL, a run in a bucket): every logged
loss equals the uninterrupted two-host run's (tests/test_multihost.py) bit for bit. A file of its
own so that these long tests run beside test_multihost.py's on the other pytest-xdist worker."""

import json
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from etils import epath

from tests.test_multihost import (
    LINUX_ONLY,
    STEPS,
    _finish,
    _logged,
    _pretrain_argv,
    _start_two_hosts,
    _two_hosts,
    _wait_for_step,
    uninterrupted_run,
)


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    return uninterrupted_run(tmp_path_factory)


def _checkpoints(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@LINUX_ONLY
def test_preempted_then_killed_two_hosts_resume_bit_for_bit(uninterrupted, tmp_path):
    """A preemption notice reaching host 1 only: both hosts save the same step and exit with the
    interrupted status (75). Resumed, then both SIGKILLed at a random step after a checkpoint,
    then resumed again with the same command: each host continues from its own data position,
    and every logged loss equals the uninterrupted run's, bit for bit."""
    data, expected, _ = uninterrupted
    workdir = tmp_path / "run"
    procs = _start_two_hosts(_pretrain_argv(data, workdir))
    _wait_for_step(procs, workdir, 3)
    procs[1].send_signal(signal.SIGTERM)
    outputs = _finish(procs, codes=(75, 75))
    stops = [re.search(r"interrupted by SIGTERM at step (\d+)", out) for out in outputs]
    assert all(stops), outputs
    (stopped,) = {int(m.group(1)) for m in stops}
    assert 3 <= stopped <= 16
    assert _checkpoints(workdir)[-1] == stopped

    kill_at = stopped + int(np.random.default_rng().integers(5, 8))  # after the next checkpoint
    procs = _start_two_hosts(_pretrain_argv(data, workdir))
    _wait_for_step(procs, workdir, kill_at)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    _finish(procs, codes=(-9, -9))
    assert _checkpoints(workdir)[-1] >= stopped

    outputs = _two_hosts(_pretrain_argv(data, workdir))
    assert "resuming from" in outputs[0]
    assert _logged(workdir) == expected


@LINUX_ONLY
def test_two_hosts_with_the_run_in_a_bucket_killed_and_resumed(uninterrupted, gcs_dir, tmp_path):
    """A pod's run kept in a bucket: the records and the workdir in the emulated GCS bucket, both
    hosts SIGKILLed after the first complete checkpoint, the same command resumes, and the
    logged losses equal the uninterrupted run's on local files bit for bit. Config, figures,
    TensorBoard events and checkpoints are in the bucket; nothing went to a local 'gs:' folder."""
    from mae_jax.data import records
    from tests.test_bucket_run import complete_checkpoints

    data, expected, _ = uninterrupted
    bucket_data, workdir = f"{gcs_dir}/records", f"{gcs_dir}/run"
    records.write_records(data, bucket_data, progress=False)
    argv = _pretrain_argv(bucket_data, workdir, recon_every=16)
    cache = str(tmp_path / "cache")  # both hosts stage the shards into one machine's cache
    procs = _start_two_hosts(argv, MAE_JAX_CACHE=cache)
    deadline = time.time() + 180
    while not complete_checkpoints(workdir):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "run ended early"
        time.sleep(0.1)
    time.sleep(0.3)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    _finish(procs, codes=(-9, -9))
    assert complete_checkpoints(workdir)[-1] < STEPS

    outputs = _finish(_start_two_hosts(argv, MAE_JAX_CACHE=cache))
    assert f"resuming from {workdir}/checkpoints at step" in outputs[0]
    assert _logged(workdir) == expected
    run = epath.Path(workdir)
    assert json.loads((run / "config.json").read_text())["data"] == bucket_data
    assert (run / "reconstructions" / f"step_{STEPS:08d}.png").exists()
    assert any((run / "tensorboard").iterdir())
    assert complete_checkpoints(workdir)[-1] == STEPS
    assert not Path("gs:").exists() and not (Path(__file__).parent.parent / "gs:").exists()
