"""A run's metrics: ``metrics.jsonl`` (one JSON object a line) and TensorBoard scalars.

Shared by pretraining and fine-tuning; only the first host writes them. A resumed run restarts
from its checkpoint's step, so the rows logged after that step by the interrupted run are
dropped when the log opens (``resumed_at``): metrics.jsonl is rewritten without them and the
TensorBoard file starts with a purge at the next step (TensorBoard then hides the older
events from that step on), so every step appears once.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from mae_jax._files import AppendLog, atomic_write, copy_file, is_url, run_path


class MetricsLog:
    """metrics.jsonl rows and, for each of their values but step and epoch, a TensorBoard
    scalar ``train/<key>`` at the row's step."""

    def __init__(self, workdir: Any, enabled: bool, resumed_at: int | None = None):
        self.enabled = enabled
        if not enabled:
            return
        path = run_path(workdir) / "metrics.jsonl"
        if resumed_at is not None:
            drop_rows_after(path, resumed_at)
        self.file = AppendLog(path)
        self.tb = ScalarWriter(
            run_path(workdir) / "tensorboard",
            purge_step=None if resumed_at is None else resumed_at + 1,
        )

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()  # in a bucket: uploaded at most every 30 s, and at saves
        for key, value in record.items():
            if key not in ("step", "epoch"):
                self.tb.scalar(f"train/{key}", value, record["step"])

    def flush(self) -> None:
        """Everything written so far made visible (uploaded, in a bucket): called at saves."""
        if self.enabled:
            self.file.flush(force=True)
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def drop_rows_after(path: Any, step: int) -> int:
    """Rewrite the JSON-lines log ``path`` without its rows of steps after ``step`` (and without
    a torn last line); returns how many rows were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            dropped += 1  # a line cut by a kill
            continue
        if row_step > step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        atomic_write(path, "".join(kept))
    return dropped


EVENT_FILE_PREFIX = "events.out.tfevents."


def _tensorboardx() -> tuple[Any, Any, Any]:
    """tensorboardX's ``EventsWriter``, ``Event`` and ``SessionLog``.

    tensorboardX's package imports torch where it is installed (seconds, memory and torch's
    thread pools in a JAX run, for a fallback that scalars never use): unless torch is loaded
    already, it is hidden for that one import (an entry of None in ``sys.modules`` makes
    ``import torch`` raise ImportError, which tensorboardX takes as "no torch")."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
    finally:
        if hide:
            del sys.modules["torch"]
    return EventsWriter, Event, SessionLog


class ScalarWriter:
    """TensorBoard scalars appended to a new event file in ``logdir`` (local or in a bucket).

    tensorboardX encodes the events and frames the records (its ``EventsWriter``). Its
    ``SummaryWriter`` is not used: it hands events to a thread, and its ``flush`` does not wait
    for the ones still queued, so a save could pass with the last rows not yet in the file (and
    not in a bucket's copy). Here a write is in the file when ``scalar`` returns, and on disk
    (fsync) after ``flush``. With ``purge_step`` the file starts as ``SummaryWriter(purge_step=)``
    starts it, with a SessionLog START at that step: TensorBoard then drops what it read of the
    earlier files from that step on, which a resumed run logs again.

    An event file is an append-only log that TensorBoard reads while it grows, so a local one
    is written in place. An object in a bucket cannot be appended to: the file is written in a
    local temporary folder and copied whole to the bucket (``copy_file``) as scalars come, at
    most every ``upload_secs``, and at every ``flush`` and at ``close``.
    """

    def __init__(
        self,
        logdir: Any,
        *,
        purge_step: int | None = None,
        flush_secs: float = 10.0,
        upload_secs: float = 30.0,
    ):
        EventsWriter, Event, SessionLog = _tensorboardx()
        self._event = Event
        logdir = run_path(logdir)
        self._remote = is_url(logdir)
        taken = _event_files(logdir)
        if self._remote:
            local = tempfile.mkdtemp(prefix="mae-jax-tensorboard-")
        else:
            logdir.mkdir(parents=True, exist_ok=True)
            local = os.fspath(logdir)
        self._local_dir = local
        # tensorboardX names the file by the second and the host, and would overwrite a file of
        # the same second (a run resumed at once): the n-th file of the folder ends in .n, and
        # sorts after the earlier ones, as TensorBoard reads them.
        self._events = EventsWriter(
            os.path.join(local, "events"), f".{len(taken)}" if taken else ""
        )
        [name] = sorted(set(os.listdir(local)) - set(taken))
        self._local_file = os.path.join(local, name)
        self.path = logdir / name
        if purge_step is not None:
            start = SessionLog(status=SessionLog.START)
            self._events.write_event(
                Event(wall_time=time.time(), step=purge_step, session_log=start)
            )
        self._flush_secs, self._upload_secs = flush_secs, upload_secs
        self._last_flush = self._last_upload = float("-inf")
        self.flush()  # the header is in the file before any scalar

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Record ``value`` (stored as float32) under ``tag`` at training ``step``."""
        from tensorboardX.summary import scalar

        if self._events is None:
            raise ValueError(f"{self.path}: the TensorBoard writer is closed")
        summary = scalar(tag, float(value))
        self._events.write_event(
            self._event(wall_time=time.time(), step=int(step), summary=summary)
        )
        if time.monotonic() - self._last_flush >= self._flush_secs:
            self._flush(force=False)

    def flush(self) -> None:
        """Everything written so far on disk, and uploaded for a bucket."""
        self._flush(force=True)

    def _flush(self, force: bool) -> None:
        if self._events is None:
            return
        self._events.flush()
        now = self._last_flush = time.monotonic()
        if self._remote and (force or now - self._last_upload >= self._upload_secs):
            copy_file(self._local_file, self.path)
            self._last_upload = now

    def close(self) -> None:
        """Flush (upload) and close the file; closing twice is harmless."""
        if self._events is None:
            return
        events, self._events = self._events, None
        events.close()
        if self._remote:
            try:
                copy_file(self._local_file, self.path)
            finally:
                shutil.rmtree(self._local_dir, ignore_errors=True)

    def __enter__(self) -> ScalarWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _event_files(folder: Any) -> list[str]:
    """The names of the TensorBoard event files in ``folder`` (none if it does not exist)."""
    folder = run_path(folder)
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(EVENT_FILE_PREFIX))
