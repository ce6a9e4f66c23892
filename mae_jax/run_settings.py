"""A run's settings checked before anything is written, and compared with the run it resumes.

Shared by pretraining and fine-tuning (both configs are frozen dataclasses with many of the same
fields). ``check_settings`` refuses a bad value in one line naming the setting;
``compare_with_saved`` decides which changes a resumed run may make: those that do not change
what a step computes from the state (intervals, the number of checkpoints kept, the loader's
threads and workers, prefetching, ``max_steps``, ``restore_step``, activation checkpointing, the
attention kernel) and the learning-rate schedule
(``lr``, ``blr``, ``min_lr``, ``warmup_epochs``: the way forward after a diverged run), each one
printed; the rest are refused naming the field. Model sizes are compared as resolved (preset
plus changes), so restating a preset's own value is no change.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from mae_jax._files import atomic_write


class SettingsError(ValueError):
    """A setting has a value no run can use, or a resumed run changes what it may not."""


# Settings a resumed run may change without changing what a step computes from the state.
FREE_ON_RESUME = frozenset(
    {
        "max_steps",
        "restore_step",
        "log_every",
        "ckpt_every",
        "recon_every",
        "recon_images",
        "keep_checkpoints",
        "read_threads",
        "worker_count",
        "prefetch",
        "remat",
        "attention",
        "shard_optimizer",
    }
)
# The learning-rate schedule may change on resume (printed): lowering the lr after a
# non-finite loss, from an earlier checkpoint (restore_step), is how a diverged run goes on.
SCHEDULE = frozenset({"lr", "blr", "min_lr", "warmup_epochs"})


def _int(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low), (
        f"an integer >= {low}"
    )


def _real(low: float, high: float = math.inf, *, open_low=False, open_high=False):
    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return False
        return (v > low if open_low else v >= low) and (v < high if open_high else v <= high)

    if high == math.inf:
        return ok, f"a number {'>' if open_low else '>='} {low}"
    return ok, f"a number in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"


def _one_of(*choices: str):
    return (lambda v: v in choices), f"one of {', '.join(choices)}"


# Every numeric or named setting either config may have, and what it must be. A field a config
# does not have, or that is None (meaning "the recipe's value"), is not checked.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "batch_size": _int(1),
    "accum_iter": _int(1),
    "epochs": _int(1),
    "warmup_epochs": _real(0),
    "blr": _real(0, open_low=True),
    "lr": _real(0, open_low=True),
    "min_lr": _real(0),
    "weight_decay": _real(0),
    "mask_ratio": _real(0, 1, open_low=True, open_high=True),
    "img_size": _int(1),
    "seed": _int(0),
    "max_steps": _int(1),
    "restore_step": _int(0),
    "log_every": _int(1),
    "ckpt_every": _int(0),
    "keep_checkpoints": _int(1),
    "recon_every": _int(0),
    "recon_images": _int(1),
    "read_threads": _int(1),
    "worker_count": _int(-1),
    "prefetch": _int(0),
    "remat": _one_of("none", "block", "dots"),
    "dtype": _one_of("auto", "float32", "bfloat16"),
    "attention": _one_of("auto", "cudnn", "xla"),
    "mode": _one_of("finetune", "linprobe"),
    "layer_decay": _real(0, 1, open_low=True),
    "drop_path": _real(0, 1, open_high=True),
    "smoothing": _real(0, 1, open_high=True),
    "mixup": _real(0),
    "cutmix": _real(0),
    "mixup_prob": _real(0, 1),
    "mixup_switch_prob": _real(0, 1),
    "reprob": _real(0, 1),
}


def check_settings(config: Any, num_patches: int | None = None) -> None:
    """SettingsError naming the first setting of ``config`` that no run can use.

    ``num_patches`` (the model's patches per image) also checks that ``mask_ratio`` leaves at
    least one patch visible and masks at least one (the loss is a mean over masked patches).
    """
    values = config.to_dict()
    for name, (ok, what) in _RULES.items():
        value = values.get(name)
        if value is not None and not ok(value):
            raise SettingsError(f"--set {name}={value}: must be {what}")
    epochs, warmup = values.get("epochs"), values.get("warmup_epochs")
    if epochs is not None and warmup is not None and warmup >= epochs:
        raise SettingsError(
            f"--set warmup_epochs={warmup}: must be below epochs ({epochs}), or the schedule "
            "never leaves its warmup"
        )
    if values.get("attention") == "cudnn":
        _check_cudnn_here(values.get("dtype", "auto"))
    ratio = values.get("mask_ratio")
    if ratio is not None and num_patches is not None:
        kept = int(num_patches * (1 - ratio))
        if not 0 < kept < num_patches:
            raise SettingsError(
                f"--set mask_ratio={ratio}: keeps {kept} of the model's {num_patches} patches; "
                "at least one must be kept and one masked"
            )


def _check_cudnn_here(dtype: str) -> None:
    """SettingsError unless cuDNN's fused attention can run in this process with the ``dtype``
    setting (its "auto" is bfloat16 on a GPU)."""
    import jax
    import jax.numpy as jnp

    from mae_jax.model import AttentionError, check_attention

    compute = jnp.float32 if dtype == "float32" else jnp.bfloat16
    try:
        check_attention("cudnn", compute, jax.default_backend())
    except AttentionError as err:
        raise SettingsError(f"--set {err}") from None


def compare_with_saved(
    workdir: Any, config: Any, resolve_model: Callable[[Any], dict[str, Any]]
) -> list[str]:
    """The changes of ``config`` from the run saved in ``workdir/config.json`` (none for a new
    run), as printable lines; SettingsError naming every field that a resumed run may not change.

    ``resolve_model(config)`` gives the model's resolved sizes (a dict), compared field by field
    as ``model.FIELD`` instead of the raw ``model`` overrides and ``img_size``.
    """
    path = workdir / "config.json"
    if not path.exists():
        return []
    try:
        saved_dict = json.loads(path.read_text())
        saved = type(config).from_dict(saved_dict)
    except (ValueError, TypeError) as err:
        raise SettingsError(f"{path}: not a run's settings ({err})") from None
    before, after = _comparable(saved, resolve_model), _comparable(config, resolve_model)
    refused, changed = [], []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        line = f"{key}: {old!r} -> {new!r}"
        (changed if key in FREE_ON_RESUME or key in SCHEDULE else refused).append(line)
    if refused:
        raise SettingsError(
            f"{path}: this workdir holds a run with other settings ({'; '.join(refused)}); "
            "use another --workdir"
        )
    return changed


def _comparable(config: Any, resolve_model: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    values = json.loads(json.dumps(config.to_dict()))  # tuples as JSON lists, like the saved
    for name in ("model", "img_size", "norm_pix_loss"):
        values.pop(name, None)
    model = json.loads(json.dumps(resolve_model(config)))
    values.update({f"model.{k}": v for k, v in model.items()})
    return values


def write_settings(workdir: Any, config: Any) -> None:
    """``workdir/config.json``: the settings of the run (written once its data opened)."""
    atomic_write(
        workdir / "config.json", json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    )
