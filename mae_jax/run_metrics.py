"""A run's metrics: ``metrics.jsonl`` (one JSON object a line) and TensorBoard scalars.

Shared by pretraining and fine-tuning; only the first host writes them. A resumed run restarts
from its checkpoint's step, so the rows logged after that step by the interrupted run are
dropped when the log opens (``resumed_at``): metrics.jsonl is rewritten without them and the
TensorBoard file starts with a purge at the next step (TensorBoard then hides the older
events from that step on), so every step appears once.
"""

from __future__ import annotations

import json
from typing import Any

from mae_jax._files import AppendLog, atomic_write, run_path


class MetricsLog:
    """metrics.jsonl rows and, for each of their values but step and epoch, a TensorBoard
    scalar ``train/<key>`` at the row's step."""

    def __init__(self, workdir: Any, enabled: bool, resumed_at: int | None = None):
        self.enabled = enabled
        if not enabled:
            return
        from mae_jax.tbwriter import SummaryWriter

        path = run_path(workdir) / "metrics.jsonl"
        if resumed_at is not None:
            drop_rows_after(path, resumed_at)
        self.file = AppendLog(path)
        self.tb = SummaryWriter(
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
