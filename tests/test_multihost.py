"""Two hosts on this machine: `mae-jax pretrain --distributed`, two processes of two CPU devices.

The runs stopped and resumed against the uninterrupted run are in tests/test_multihost_resume.py."""

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from etils import epath

from tests.test_train import _image_folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_two_hosts(argv: list[str], host_extra=([], []), **env_extra) -> list[subprocess.Popen]:
    """``mae-jax *argv --distributed`` as two processes of two CPU devices, started; host i
    gets ``host_extra[i]`` too."""
    port = _free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        **env_extra,
    }
    distributed = ["--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    return [
        subprocess.Popen(
            [sys.executable, "-m", "mae_jax.cli", *argv, *host_extra[i], *distributed]
            + ["--process-id", str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        for i in range(2)
    ]


def _finish(procs: list[subprocess.Popen], codes=(0, 0)) -> list[str]:
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == list(codes), outputs
    return outputs


def _two_hosts(argv: list[str]) -> list[str]:
    """``mae-jax *argv --distributed`` as two processes of two CPU devices; their outputs."""
    outputs = _finish(_start_two_hosts(argv))
    assert all("over 2 local device(s) x 2 host(s)" in out for out in outputs)
    return outputs


def _settings(**kw) -> list[str]:
    return [arg for k, v in kw.items() for arg in ("--set", f"{k}={v}")]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU collectives are tested on Linux")
def test_two_processes_validate_their_shares_and_agree(tmp_path):
    """Fine-tuning's validation splits the folder between the hosts and adds up their sums: the
    logged figures equal one process evaluating the whole folder with the final weights."""
    from convert.pth_to_orbax import convert_pth
    from mae_jax import data as data_lib
    from mae_jax.evaluate import evaluate
    from tests.test_finetune import GOLDEN, _two_class_folder

    train = _two_class_folder(tmp_path / "train", 4, 0)  # 8 images: 2 steps per epoch
    val = _two_class_folder(tmp_path / "val", 4, 1)
    (val / "vertical" / "003.png").unlink()  # 7: the shares differ and get padded
    init, _ = convert_pth(GOLDEN / "tiny_shared.pth", tmp_path / "mae")
    workdir = tmp_path / "ft"
    argv = ["finetune", "--data", str(train), "--val", str(val), "--init", str(init)]
    argv += ["--preset", "vit_tiny_patch4", "--workdir", str(workdir), "--quiet"]
    argv += _settings(
        batch_size=1, epochs=1, warmup_epochs=0, lr=0.01, read_threads=2, worker_count=0
    )
    argv += _settings(auto_augment="", reprob=0, mixup=0, cutmix=0)
    _two_hosts(argv)

    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    (logged,) = [json.loads(x) for x in lines if "val_top1" in x]
    import mae_jax

    model = mae_jax.load_pretrained(workdir / "model")
    alone = evaluate(model, data_lib.ImageFolder(val), batch_size=3)
    assert alone["count"] == 7
    assert logged["val_top1"] == pytest.approx(alone["top1"], abs=1e-9)
    assert logged["val_loss"] == pytest.approx(alone["loss"], rel=1e-5)


# --------------------------------------------------------------------------- resume and preemption

LINUX_ONLY = pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU collectives on Linux")
STEPS = 32  # 16 images / (2 hosts x 2 devices x 1) = 4 steps per epoch: 8 epochs


def _pretrain_argv(data, workdir, **extra) -> list[str]:
    argv = ["pretrain", "--data", str(data), "--preset", "mae_vit_tiny_patch4"]
    argv += ["--workdir", str(workdir), "--quiet"]
    settings = dict(batch_size=1, max_steps=STEPS, log_every=1, recon_every=0, ckpt_every=4)
    # A schedule that moves the weights within the 32 steps (the default warms up for 40 epochs)
    settings.update(worker_count=0, lr=2e-3, epochs=8, warmup_epochs=1)
    return argv + _settings(**{**settings, **extra})


def _logged(workdir) -> dict[int, float]:
    """step -> loss of metrics.jsonl (local or in a bucket); a step logged again after a resume
    must log the same."""
    losses: dict[int, float] = {}
    for line in epath.Path(workdir, "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert losses.setdefault(record["step"], record["loss"]) == record["loss"], record
    return losses


def _steps_logged(workdir: Path) -> int:
    try:
        return len((workdir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _wait_for_step(procs, workdir: Path, step: int) -> None:
    deadline = time.time() + 180
    while _steps_logged(workdir) < step:
        assert time.time() < deadline and all(p.poll() is None for p in procs), "run ended early"
        time.sleep(0.02)


def uninterrupted_run(tmp_path_factory) -> tuple[Path, dict[int, float], Path]:
    """An uninterrupted two-host run: its image folder, losses and workdir. Made once per test
    session, in the session's temporary folder that every pytest-xdist worker shares, by the
    first worker that asks (the other waits for it): tests/test_multihost_resume.py compares
    with it too, so that its tests can run on the other worker. The workdir is only read, and
    by this file's tests."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # above the worker's own folder
    root = shared / "two_hosts"
    with open(shared / "two_hosts.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            shutil.rmtree(root, ignore_errors=True)  # a failed attempt's
            _image_folder(root / "imgs", n=16)
            _two_hosts(_pretrain_argv(root / "imgs", root / "run"))
            (root / "done").touch()
    losses = _logged(root / "run")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return root / "imgs", losses, root / "run"


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    return uninterrupted_run(tmp_path_factory)


@LINUX_ONLY
def test_two_processes_train_together(uninterrupted):
    """One metrics line per step, written by the first host; checkpoints every 4 steps; the run
    loads as a model."""
    _, _, workdir = uninterrupted
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [i // 4 for i in range(STEPS)]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == list(range(4, STEPS + 1, 4))[-3:]  # keep_checkpoints=3
    import mae_jax

    model = mae_jax.load_pretrained(workdir)
    assert model.config.img_size == 32


@LINUX_ONLY
def test_sharded_optimizer_on_two_hosts_resumes_with_the_other_setting(uninterrupted, tmp_path):
    """ZeRO-1 over the 4 devices of 2 hosts: stopped by a signal to host 0, then resumed with
    shard_optimizer=false from the gathered full state. The losses follow the replicated run
    (reduce-scatter and all-reduce round differently: rtol 1e-4); a host that restored slices
    of other parameters would not."""
    data, expected, _ = uninterrupted
    workdir = tmp_path / "run"
    procs = _start_two_hosts(_pretrain_argv(data, workdir, shard_optimizer="true"))
    _wait_for_step(procs, workdir, 6)
    procs[0].send_signal(signal.SIGTERM)
    outputs = _finish(procs, codes=(75, 75))
    stopped = int(re.search(r"interrupted by SIGTERM at step (\d+)", outputs[1]).group(1))
    _two_hosts(_pretrain_argv(data, workdir, shard_optimizer="false"))
    losses = _logged(workdir)
    assert sorted(losses) == sorted(expected) and stopped < STEPS
    got, want = (np.array([d[k] for k in sorted(d)]) for d in (losses, expected))
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert np.abs(got[-8:] - want[-8:]).max() > 0  # the sharded steps really ran


@LINUX_ONLY
def test_a_host_with_other_settings_is_refused(tmp_path):
    """Host 1 started with another seed: both hosts stop at once with one line naming it."""
    data = _image_folder(tmp_path / "imgs", n=16)
    argv = _pretrain_argv(data, tmp_path / "run", max_steps=2)
    procs = _start_two_hosts(argv, host_extra=[[], ["--set", "seed=1"]])
    outputs = _finish(procs, codes=(2, 2))
    for out in outputs:
        assert "mae-jax: error: the settings of host 1 differ from host 0's" in out
        assert "Traceback" not in out
    assert not (tmp_path / "run" / "config.json").exists()


def test_resume_on_other_devices_is_refused_in_one_line(tmp_path):
    """A run's data shards and global batch depend on its hosts and devices: resuming on other
    ones is refused, naming what the run was started with."""
    data = _image_folder(tmp_path / "imgs", n=8)
    argv = _pretrain_argv(data, tmp_path / "run", max_steps=2, ckpt_every=2)

    def run(devices: int) -> subprocess.CompletedProcess:
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        cmd = [sys.executable, "-m", "mae_jax.cli", *argv]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    assert run(2).returncode == 0
    refused = run(1)
    assert refused.returncode == 2
    assert refused.stderr == (
        f"mae-jax: error: {tmp_path / 'run' / 'checkpoints'}: this run was started on 1 host(s) "
        "x 2 local device(s), it is now on 1 x 1; resume it on the same hosts and devices, or "
        "start a new run with another --workdir\n"
    )


@LINUX_ONLY
def test_hosts_with_their_own_workdirs_cannot_resume(uninterrupted, tmp_path):
    """Each host restores on its own, so hosts that see different workdirs (a local folder each,
    no shared file system, no bucket) are refused in one line on every host, before any step:
    here host 0 has the finished run's workdir and host 1 an empty one."""
    data, _, workdir = uninterrupted
    argv = _pretrain_argv(data, workdir)
    outputs = _finish(
        _start_two_hosts(argv, host_extra=[[], ["--workdir", str(tmp_path / "host1")]]),
        codes=(2, 2),
    )
    for out in outputs:
        assert (
            f"the hosts see different latest checkpoints (host 0: step {STEPS}, host 1: none)"
            in out
        )
        assert "Traceback" not in out
