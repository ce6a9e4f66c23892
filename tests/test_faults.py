"""A run against hostile users and failing machines: bad settings, two runs on one workdir,
signals during the final save, going back to an earlier checkpoint, logs after a resume.

Tiny preset, a few steps each. Checkpoint corruption and failed saves are in
test_checkpoint_faults.py, the converter's in test_convert_faults.py, loader workers in
test_loader_workers.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mae_jax import cli, train
from mae_jax.multihost import HostMismatchError
from mae_jax.run_checkpoints import CheckpointRestoreError
from mae_jax.run_settings import SettingsError
from mae_jax.workdir_lock import WorkdirLock
from tests.test_train import _cfg, _image_folder, _losses

ROOT = Path(__file__).resolve().parent.parent
TINY = "mae_vit_tiny_patch4"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _image_folder(tmp_path_factory.mktemp("imgs"), n=16)


# The CLI's settings of these runs (each test adds its own; later ones win).
_SMALL = ("batch_size=1", "worker_count=0", "read_threads=2", "recon_every=0", "log_every=1")


def _pretrain_cli(workdir, *sets, data=None):
    args = ["pretrain", "--preset", TINY, "--workdir", str(workdir), "--quiet"]
    if data is not None:
        args += ["--data", str(data)]
    for item in (*_SMALL, *sets):
        args += ["--set", item]
    return cli.main(args)


def _steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "setting, message",
    [
        ("batch_size=0", "batch_size=0: must be an integer >= 1"),
        ("batch_size=-1", "batch_size=-1: must be an integer >= 1"),
        ("accum_iter=0", "accum_iter=0: must be an integer >= 1"),
        ("epochs=0", "epochs=0: must be an integer >= 1"),
        ("warmup_epochs=800", "warmup_epochs=800: must be below epochs (800)"),
        ("mask_ratio=1.0", "mask_ratio=1.0: must be a number in (0, 1)"),
        ("mask_ratio=1.5", "mask_ratio=1.5: must be a number in (0, 1)"),
        ("mask_ratio=-0.1", "mask_ratio=-0.1: must be a number in (0, 1)"),
        ("mask_ratio=0", "mask_ratio=0.0: must be a number in (0, 1)"),
        ("mask_ratio=0.999", "mask_ratio=0.999: keeps 0 of the model's 64 patches"),
        ("img_size=0", "img_size=0: must be an integer >= 1"),
        ("seed=-1", "seed=-1: must be an integer >= 0"),
        ("remat=foo", "remat=foo: must be one of none, block, dots"),
        ("attention=foo", "attention=foo: must be one of auto, cudnn, xla"),
        ("attention=cudnn", "attention=cudnn: cuDNN's fused attention needs a CUDA GPU"),
        ("keep_checkpoints=0", "keep_checkpoints=0: must be an integer >= 1"),
        ("keep_checkpoints=-1", "keep_checkpoints=-1: must be an integer >= 1"),
        ("lr=-0.001", "lr=-0.001: must be a number > 0"),
        ("blr=-1", "blr=-1.0: must be a number > 0"),
        ("weight_decay=-0.05", "weight_decay=-0.05: must be a number >= 0"),
        ("max_steps=0", "max_steps=0: must be an integer >= 1"),
        ("restore_step=-2", "restore_step=-2: must be an integer >= 0"),
    ],
)
def test_a_bad_setting_is_one_line_before_anything_is_written(tmp_path, capsys, setting, message):
    workdir = tmp_path / "run"
    assert _pretrain_cli(workdir, setting) == 2
    err = capsys.readouterr().err
    assert err == f"mae-jax: error: --set {message}" + err.split(message, 1)[1]
    assert err.count("\n") == 1
    assert not workdir.exists()


@pytest.mark.parametrize(
    "mode, setting, message",
    [
        ("finetune", "keep_checkpoints=0", "keep_checkpoints=0: must be an integer >= 1"),
        ("finetune", "smoothing=1.5", "smoothing=1.5: must be a number in [0, 1)"),
        ("finetune", "blr=-0.001", "blr=-0.001: must be a number > 0"),
        ("linprobe", "accum_iter=0", "accum_iter=0: must be an integer >= 1"),
        ("linprobe", "warmup_epochs=90", "warmup_epochs=90: must be below epochs (90)"),
        ("finetune", "attention=cudnn", "attention=cudnn: cuDNN's fused attention needs a CUDA"),
    ],
)
def test_fine_tuning_checks_its_settings_the_same_way(tmp_path, capsys, mode, setting, message):
    workdir = tmp_path / "run"
    args = [mode, "--data", str(tmp_path), "--workdir", str(workdir), "--set", setting]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mae-jax: error: --set {message}") and err.count("\n") == 1
    assert not workdir.exists()


def test_settings_are_written_only_once_the_data_opened(folder, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert _pretrain_cli(workdir, "max_steps=1", data=tmp_path / "nope") == 2
    assert "nope" in capsys.readouterr().err
    assert not (workdir / "config.json").exists()
    # the rerun with the right folder is not refused as "a run with other settings"
    assert _pretrain_cli(workdir, "max_steps=1", data=folder) == 0
    assert json.loads((workdir / "config.json").read_text())["data"] == str(folder)


def test_resume_may_change_the_schedule_and_intervals_but_not_the_model_or_devices(
    folder, tmp_path, capsys, monkeypatch
):
    train.pretrain(_cfg(folder, max_steps=2, keep_checkpoints=3), tmp_path, progress=False)
    capsys.readouterr()
    # a preset's own value, another keep count, interval and lr: allowed, each one printed
    changed = _cfg(
        folder, max_steps=4, keep_checkpoints=2, log_every=2, lr=1e-3, model={"embed_dim": 64}
    )
    summary = train.pretrain(changed, tmp_path, progress=False)
    out = capsys.readouterr().out
    assert summary["start_step"] == 2 and summary["end_step"] == 4
    for line in ("keep_checkpoints: 3 -> 2", "log_every: 1 -> 2", "lr: 0.002 -> 0.001"):
        assert f"changed since the last start: {line}" in out
    assert "embed_dim" not in out
    with pytest.raises(SettingsError, match=r"other settings \(model.embed_dim: 64 -> 32\)"):
        train.pretrain(_cfg(folder, max_steps=6, model={"embed_dim": 32}), tmp_path, progress=False)
    # another number of devices is named as such (not as the loader's batch size)
    n = jax.local_device_count()
    monkeypatch.setattr(jax, "local_device_count", lambda *a: n // 2)
    with pytest.raises(
        HostMismatchError,
        match=rf"started on 1 host\(s\) x {n} local device\(s\), it is now on 1 x {n // 2}",
    ):
        train.pretrain(_cfg(folder, max_steps=6), tmp_path, progress=False)


def test_a_failed_save_stops_the_run_in_one_line_keeping_the_earlier_checkpoint(
    folder, tmp_path, capsys, monkeypatch
):
    import errno

    from orbax.checkpoint._src.path import atomicity

    committed = atomicity.AtomicRenameTemporaryPath.finalize

    async def disk_full_at_step_4(self):  # the step's final commit, in Orbax's thread
        if self.get().name.startswith("4"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.get()))
        return await committed(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full_at_step_4)
    assert _pretrain_cli(tmp_path, "max_steps=12", "ckpt_every=2", data=folder) == 2
    err = capsys.readouterr().err
    assert err == (
        f"mae-jax: error: {tmp_path / 'checkpoints' / '4'}: cannot save the checkpoint: "
        "No space left on device (the earlier checkpoints are kept)\n"
    )
    assert _steps(tmp_path) == [2]
    # stopped at the step that saw the failure: at the latest the next save's (6)
    assert max(json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").open()) <= 6


# --------------------------------------------------------------------------- one run per workdir


def test_a_live_workdir_is_refused_naming_its_holder(folder, tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from etils import epath\n"
            "from mae_jax.workdir_lock import WorkdirLock\n"
            f"lock = WorkdirLock(epath.Path({str(workdir)!r})); lock.acquire()\n"
            "print('held', flush=True); time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _pretrain_cli(workdir, "max_steps=1", data=folder) == 2
        err = capsys.readouterr().err
        assert f"workdir is in use by process {holder.pid} on host " in err
        assert err.count("\n") == 1 and not (workdir / "config.json").exists()
    finally:
        holder.kill()  # SIGKILL: the lock is left behind, stale
        holder.wait()
    with WorkdirLock(_epath(workdir)) as lock:  # taken over
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


def _epath(path):
    from etils import epath

    return epath.Path(path)


# --------------------------------------------------------------------------- signals


def test_a_signal_during_the_final_save_is_handled(folder, tmp_path):
    """SIGTERM while the last checkpoint is written: the save completes, the run ends normally
    (all its steps are done); before, the default handler was back and the save was lost."""
    code = (
        "import os, signal\n"
        "import tests.conftest\n"
        "from mae_jax import cli\n"
        "from mae_jax.run_checkpoints import Checkpoints\n"
        "close = Checkpoints.close\n"
        "def close_after_a_signal(self):  # the run's end: waits for its last save\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    close(self)\n"
        "Checkpoints.close = close_after_a_signal\n"
        f"raise SystemExit(cli.main(['pretrain', '--preset', {TINY!r}, '--data', {str(folder)!r},"
        f" '--workdir', {str(tmp_path)!r}, '--quiet', '--set', 'max_steps=3',"
        " '--set', 'batch_size=1', '--set', 'ckpt_every=100']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done: 3 steps" in proc.stdout
    assert _steps(tmp_path) == [3]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name]


def test_a_second_signal_stops_at_once_with_its_own_exit_status(monkeypatch, capsys):
    from mae_jax import multihost

    def run(args):  # a run's signal handling, without the run
        with multihost.StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signal == signal.SIGINT  # the first is noted: save, then stop
            os.kill(os.getpid(), signal.SIGINT)  # the second stops at once
            raise AssertionError("the second signal did not stop the run")

    monkeypatch.setattr(cli, "_run_pretrain", run)
    assert cli.main(["pretrain"]) == cli.EXIT_STOPPED == 130
    assert capsys.readouterr().err == "mae-jax: interrupted; stopped without saving\n"


# --------------------------------------------------------------------------- going back


def test_restore_step_goes_back_and_logs_each_step_once(folder, tmp_path, capsys):
    """After a run to step 6 (checkpoints 2, 4, 6), ``restore_step=2`` with a lower lr resumes
    from step 2, discards 4 and 6, and metrics.jsonl and TensorBoard hold each step once; a
    step that is not there is refused."""
    train.pretrain(
        _cfg(folder, max_steps=6, ckpt_every=2, keep_checkpoints=5), tmp_path, progress=False
    )
    first = _losses(tmp_path)
    first_lr = [json.loads(x)["lr"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    capsys.readouterr()
    again = _cfg(folder, max_steps=5, ckpt_every=2, keep_checkpoints=5, restore_step=2, lr=1e-3)
    summary = train.pretrain(again, tmp_path, progress=False)
    assert summary["start_step"] == 2
    assert "lr: 0.002 -> 0.001" in capsys.readouterr().out
    assert _steps(tmp_path) == [2, 4, 5]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows[:2]] == first[:2]
    # the schedule scales with the peak lr (min_lr 0): half the first run's at the same steps
    np.testing.assert_allclose([r["lr"] for r in rows[2:4]], [lr / 2 for lr in first_lr[2:4]])
    # a step that is not there: one line listing the steps there
    with pytest.raises(
        CheckpointRestoreError, match=r"no checkpoint of step 3 \(steps there: 2, 4, 5\)"
    ):
        train.pretrain(_cfg(folder, max_steps=6, restore_step=3), tmp_path, progress=False)
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([e.value for e in scalars], [r["loss"] for r in rows], rtol=1e-6)
