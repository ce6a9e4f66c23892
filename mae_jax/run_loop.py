"""The loop machinery that pretraining and fine-tuning share: the step plan and lr schedule, the
workdir, resuming, saving at the right steps or on a stop request, a non-finite loss stopped
before it is saved, the progress bar, and closing a run.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import types
from typing import Any

import jax
import optax

from mae_jax import optim
from mae_jax._files import check_bucket, naming, run_path
from mae_jax.run_checkpoints import Checkpoints
from mae_jax.run_config import TrainingError


@dataclasses.dataclass(frozen=True)
class StepPlan:
    schedule: optax.Schedule  # lr of each optimizer step
    used_per_epoch: int  # micro-batches trained per epoch: whole groups of accum_iter
    total_steps: int  # micro-steps of the run


def plan_steps(config: Any, iters_per_epoch: int, global_batch: int) -> StepPlan:
    """The lr schedule and step counts of a run (pretraining or fine-tuning config).

    lr = blr * global batch * accum_iter / 256 unless ``config.lr`` is set. The left-over
    micro-batches of an epoch (fewer than accum_iter) are skipped, so that the schedule's
    optimizer steps line up with the epochs.
    """
    if config.accum_iter > iters_per_epoch:
        raise TrainingError(
            f"accum_iter {config.accum_iter} exceeds the {iters_per_epoch} batches of an epoch"
        )
    used_per_epoch = (iters_per_epoch // config.accum_iter) * config.accum_iter
    total_steps = config.epochs * used_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    eff_batch = global_batch * config.accum_iter
    peak_lr = config.lr if config.lr is not None else optim.scaled_lr(config.blr, eff_batch)
    schedule = optim.epoch_schedule(
        peak_lr,
        min_lr=config.min_lr,
        epochs=config.epochs,
        warmup_epochs=config.warmup_epochs,
        iters_per_epoch=iters_per_epoch,
        accum_iter=config.accum_iter,
    )
    return StepPlan(schedule, used_per_epoch, total_steps)


def make_workdir(workdir: Any) -> Any:
    """``workdir`` as a run path (local or bucket), created; one line if it cannot be."""
    path = run_path(workdir)
    check_bucket(path)
    with naming(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def resume_run(
    ckpts: Checkpoints, states: dict, opt_state: Any, loader: Any, config: Any, changes: list[str]
) -> tuple[dict, Any, int]:
    """(states, opt_state, step) to start from: the checkpoint of ``config.restore_step``, else
    the newest that verifies, restored (with the loader's position), and step 0 for a new run.
    Says where it resumes and the settings changed since (``run_settings.compare_with_saved``);
    after a ``restore_step``, the newer checkpoints are discarded (the run goes another way)."""
    chosen = {} if config.restore_step is None else {"restore_step": config.restore_step}
    resumed = ckpts.resume(states, opt_state, loader, **chosen)
    if resumed is None:
        return states, opt_state, 0
    states, opt_state, meta = resumed
    step = int(meta["step"])
    if jax.process_index() == 0:
        print(f"resuming from {ckpts.directory} at step {step} (epoch {loader.epoch})")
        for line in changes:
            print(f"changed since the last start: {line}")
    if config.restore_step is not None:
        ckpts.discard_after(step)
    return states, opt_state, step


def save_or_stop(previous, step, total_steps, config, ckpts, save, stop, summary) -> bool:
    """The end of a training step that moved from micro-step ``previous`` to ``step``: save when
    it crossed a multiple of ``ckpt_every`` and at the last step; when ``stop`` (a
    ``multihost.StopRequest``, asked once per step on every host) says so, save (unless this
    step was just saved), record the signal in ``summary`` and return True. A save that failed
    in the background stops the run here (one line naming the checkpoint and the reason)."""
    ckpts.raise_if_failed()
    if crossed(previous, step, config.ckpt_every) or step == total_steps:
        save()
    if not stop.should_stop():
        return False
    if ckpts.last_saved != step:
        save()
    summary["interrupted"] = signal.Signals(stop.signal).name
    return True


def check_finite(loss: float, grad_norm: float, step: int, epoch: int, ckpts: Checkpoints) -> None:
    """TrainingError naming the step and the last good checkpoint when a metric is not finite."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
    last = ckpts.latest_step()
    kept = (
        f"The last good checkpoint (step {last}) is intact; to go on, resume from it or an "
        "earlier one (--set restore_step=N) with a lower lr (--set blr=... or lr=...)."
        if last is not None
        else "No checkpoint was written yet."
    )
    raise TrainingError(f"{what} at step {step} (epoch {epoch}); stopped. {kept}")


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of ``every`` lies in (before, after]: steps advance by accum_iter."""
    return every > 0 and after // every > before // every


def progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return types.SimpleNamespace(
            update=lambda n: None, set_postfix=lambda **k: None, close=lambda: None
        )
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def close_run(ckpts, *closables) -> None:
    """Wait for the last asynchronous save and close the checkpoints (CheckpointSaveError if a
    save failed), then close everything else in any case."""
    try:
        ckpts.close()
    finally:
        for thing in closables:
            thing.close()
