"""Two hosts on this machine: `mae-jax pretrain --distributed`, two processes of two CPU devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train import _image_folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_hosts(argv: list[str]) -> list[str]:
    """``mae-jax *argv --distributed`` as two processes of two CPU devices; their outputs."""
    port = _free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    distributed = ["--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "mae_jax.cli", *argv, *distributed, "--process-id", str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all("over 2 local device(s) x 2 host(s)" in out for out in outputs)
    return outputs


def _settings(**kw) -> list[str]:
    return [arg for k, v in kw.items() for arg in ("--set", f"{k}={v}")]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU collectives are tested on Linux")
def test_two_processes_train_together(tmp_path):
    data = _image_folder(tmp_path / "imgs", n=16)
    workdir = tmp_path / "run"
    argv = ["pretrain", "--data", str(data), "--preset", "mae_vit_tiny_patch4"]
    argv += ["--workdir", str(workdir), "--quiet"]
    argv += _settings(
        batch_size=1, max_steps=4, log_every=1, recon_every=0, ckpt_every=2, worker_count=0
    )
    _two_hosts(argv)
    # one metrics line per step, written by the first host only; 16 images / (2 hosts x 2) = 4 steps per epoch
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {r["epoch"] for r in records} == {0}
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]
    import mae_jax

    model = mae_jax.load_pretrained(workdir)
    assert model.config.img_size == 32


@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU collectives are tested on Linux")
def test_two_processes_validate_their_shares_and_agree(tmp_path):
    """Fine-tuning's validation splits the folder between the hosts and adds up their sums: the
    logged figures equal one process evaluating the whole folder with the final weights."""
    from convert.pth_to_orbax import convert_pth
    from mae_jax import data as data_lib
    from mae_jax.classifier import evaluate
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
