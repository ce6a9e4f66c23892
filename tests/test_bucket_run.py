"""A pretraining run that lives in a bucket: workdir and records in the emulated GCS bucket
(tests/gcs_emulator.py), killed with SIGKILL and resumed by the same command, logs the same
losses as an uninterrupted run on local files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from etils import epath

from mae_jax import records
from tests.test_train import _image_folder

ROOT = Path(__file__).parent.parent
STEPS = 24  # 16 images / (2 devices x 1) = 8 steps per epoch: 3 epochs


def _start(data: str, workdir: str) -> subprocess.Popen:
    settings = dict(batch_size=1, max_steps=STEPS, log_every=1, ckpt_every=4, recon_every=12)
    settings.update(worker_count=0, lr=2e-3, epochs=3, warmup_epochs=1)
    argv = ["pretrain", "--data", data, "--workdir", workdir, "--quiet"]
    argv += ["--preset", "mae_vit_tiny_patch4"]
    argv += [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    return subprocess.Popen(
        [sys.executable, "-m", "mae_jax.cli", *argv],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen, code: int = 0) -> str:
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == code, out
    return out


def _logged(workdir) -> dict[int, float]:
    losses: dict[int, float] = {}
    for line in epath.Path(workdir, "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert losses.setdefault(record["step"], record["loss"]) == record["loss"], record
    return losses


def _checkpoint_steps(workdir: str) -> list[int]:
    """The complete checkpoints: in a bucket, Orbax writes a step's folder in place and marks it
    complete with commit_success.txt last."""
    import fsspec

    # epath's gcsfs instance caches listings, and other processes write
    fsspec.filesystem("gcs", finalize_on_close=True).invalidate_cache()
    folder = epath.Path(workdir) / "checkpoints"
    if not folder.exists():
        return []
    return sorted(
        int(p.name)
        for p in folder.iterdir()
        if p.name.isdigit() and (p / "commit_success.txt").exists()
    )


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL of a subprocess")
def test_run_in_a_bucket_killed_and_resumed_equals_a_local_run(gcs_dir, tmp_path):
    images = _image_folder(tmp_path / "imgs", n=16)
    local_run = tmp_path / "run"
    _finish(_start(str(images), str(local_run)))
    expected = _logged(local_run)
    assert sorted(expected) == list(range(1, STEPS + 1))

    data, workdir = f"{gcs_dir}/records", f"{gcs_dir}/run"
    records.write_records(images, data, progress=False)
    proc = _start(data, workdir)
    deadline = time.time() + 180
    while not _checkpoint_steps(workdir):  # killed some steps after its first checkpoint
        assert proc.poll() is None and time.time() < deadline, "the run ended early"
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    _finish(proc, code=-9)
    assert not Path("gs:").exists()  # nothing went to a local folder named after the scheme
    steps = _checkpoint_steps(workdir)
    assert steps and steps[-1] < STEPS

    out = _finish(_start(data, workdir))
    assert f"resuming from {workdir}/checkpoints at step" in out
    assert _logged(workdir) == expected
    run = epath.Path(workdir)
    assert json.loads((run / "config.json").read_text())["data"] == data
    assert (run / "reconstructions" / f"step_{STEPS:08d}.png").exists()
    assert any((run / "tensorboard").iterdir())
    assert _checkpoint_steps(workdir)[-1] == STEPS


def test_a_run_in_a_missing_bucket_is_one_line(gcs_env, capsys):
    from mae_jax import cli

    code = cli.main(["pretrain", "--workdir", "gs://no-such-bucket/run", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err == (
        "mae-jax: error: gs://no-such-bucket/run: the bucket gs://no-such-bucket does not exist "
        "or cannot be reached\n"
    )
