"""A run's TensorBoard scalars (tensorboardX event files), read back by TensorBoard's own reader:
the values and steps written, visible after a flush while the file is open, the rows after the
resume step purged, and a run in a bucket."""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np
import pytest
from etils import epath

from mae_jax.run_metrics import EVENT_FILE_PREFIX, MetricsLog, ScalarWriter

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

SCALARS = [  # tag, value, step
    ("train/loss", 0.123456789, 1),
    ("train/lr", 1.5e-4, 1),
    ("train/loss", -2.75, 20),
    ("train/loss", 3.0e38, 2**40),
    ("eval/big", 1e40, 7),  # beyond float32: stored as inf
]


def _as_float32(value: float) -> float:
    with np.errstate(over="ignore"):  # 1e40 -> inf is the point
        return float(np.float32(value))


def _scalars(logdir, tag: str) -> list[tuple[int, float]]:
    """(step, value) of ``tag`` as TensorBoard shows them, purges applied."""
    events = EventAccumulator(os.fspath(logdir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_scalars_read_back_by_tensorboard(tmp_path):
    with ScalarWriter(tmp_path / "logs") as writer:
        for tag, value, step in SCALARS:
            writer.scalar(tag, value, step)
    name = os.path.basename(os.fspath(writer.path))
    assert name.startswith(EVENT_FILE_PREFIX) and name.endswith("." + socket.gethostname())
    for tag in ("train/loss", "train/lr", "eval/big"):
        want = [(s, _as_float32(v)) for t, v, s in SCALARS if t == tag]
        assert _scalars(tmp_path / "logs", tag) == want
    assert _scalars(tmp_path / "logs", "eval/big") == [(7, float("inf"))]
    with pytest.raises(ValueError, match="is closed"):
        writer.scalar("train/loss", 1.0, 30)
    writer.close()  # twice is harmless


def test_a_flush_makes_the_rows_visible_while_the_file_is_open(tmp_path):
    writer = ScalarWriter(tmp_path, flush_secs=3600)
    writer.scalar("train/loss", 0.5, 1)
    writer.scalar("train/loss", 0.25, 2)
    writer.flush()
    assert _scalars(tmp_path, "train/loss") == [(1, 0.5), (2, 0.25)]
    writer.close()


def _run(workdir, losses: dict[int, float], resumed_at=None):
    log = MetricsLog(workdir, True, resumed_at=resumed_at)
    for step, loss in losses.items():
        log.write({"step": step, "epoch": 0, "loss": loss})
    log.close()


def _jsonl(workdir) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in epath.Path(workdir, "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def test_a_resumed_run_replaces_the_rows_after_its_step(tmp_path):
    first = {1: 1.0, 2: 0.75, 3: 0.5, 4: 0.25}
    _run(tmp_path, first)
    # resumed from the checkpoint of step 2, at once (the same second: a second file, not the first overwritten)
    second = {3: 0.625, 4: 0.375, 5: 0.125}
    _run(tmp_path, second, resumed_at=2)
    want = [(1, 1.0), (2, 0.75), (3, 0.625), (4, 0.375), (5, 0.125)]
    assert _jsonl(tmp_path) == want
    names = sorted(os.listdir(tmp_path / "tensorboard"))
    assert len(names) == 2 and all(n.startswith(EVENT_FILE_PREFIX) for n in names)
    assert _scalars(tmp_path / "tensorboard", "train/loss") == want
    # no scalar for the step and epoch columns
    events = EventAccumulator(os.fspath(tmp_path / "tensorboard"))
    events.Reload()
    assert events.Tags()["scalars"] == ["train/loss"]


def _download(folder, to) -> None:
    os.makedirs(to, exist_ok=True)
    for path in epath.Path(folder).iterdir():
        (epath.Path(to) / path.name).write_bytes(path.read_bytes())


def test_event_files_in_a_bucket(gcs_dir, tmp_path):
    import fsspec

    fresh = fsspec.filesystem("gcs").invalidate_cache  # other writers changed the listing
    writer = ScalarWriter(f"{gcs_dir}/tensorboard", upload_secs=3600)
    local_dir = writer._local_dir
    writer.scalar("train/loss", 0.5, 1)
    writer.flush()  # a save: the rows so far are in the bucket
    fresh()
    _download(f"{gcs_dir}/tensorboard", tmp_path / "a")
    assert _scalars(tmp_path / "a", "train/loss") == [(1, 0.5)]
    writer.scalar("train/loss", 0.25, 2)
    writer.close()
    assert not os.path.exists(local_dir)  # the local copy is gone
    _run(gcs_dir, {3: 0.125}, resumed_at=1)
    fresh()
    _download(f"{gcs_dir}/tensorboard", tmp_path / "b")
    assert len(os.listdir(tmp_path / "b")) == 2
    assert _scalars(tmp_path / "b", "train/loss") == [(1, 0.5), (3, 0.125)]
    assert not any(n.startswith("gs:") for n in os.listdir("."))


def test_uploads_as_scalars_come_are_rate_limited(gcs_dir):
    """Between flushes a bucket's copy is uploaded again only once ``upload_secs`` have passed."""
    sizes = {}
    for upload_secs in (3600, 0):
        writer = ScalarWriter(f"{gcs_dir}/{upload_secs}", flush_secs=0, upload_secs=upload_secs)
        before = epath.Path(writer.path).stat().length
        time.sleep(0.01)
        writer.scalar("train/loss", 0.5, 1)
        sizes[upload_secs] = (before, epath.Path(writer.path).stat().length)
        writer.close()
    assert sizes[3600][1] == sizes[3600][0]  # not uploaded again yet
    assert sizes[0][1] > sizes[0][0]
