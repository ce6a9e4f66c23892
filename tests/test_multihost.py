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


@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU collectives are tested on Linux")
def test_two_processes_train_together(tmp_path):
    data = _image_folder(tmp_path / "imgs", n=16)
    workdir = tmp_path / "run"
    port = _free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mae_jax.cli",
                "pretrain",
                "--distributed",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--data",
                str(data),
                "--preset",
                "mae_vit_tiny_patch4",
                "--workdir",
                str(workdir),
                "--set",
                "batch_size=1",
                "--set",
                "max_steps=4",
                "--set",
                "log_every=1",
                "--set",
                "recon_every=0",
                "--set",
                "ckpt_every=2",
                "--quiet",
            ],
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
    # one metrics line per step, written by the first host only; 16 images / (2 hosts x 2) = 4 steps per epoch
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {r["epoch"] for r in records} == {0}
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]
    import mae_jax

    model = mae_jax.load_pretrained(workdir)
    assert model.config.img_size == 32
