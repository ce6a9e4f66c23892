"""The run recipes: what a pretraining or fine-tuning run is given, parsed and resolved.

``PretrainConfig`` and ``FinetuneConfig`` (frozen dataclasses, written to each run's config.json)
share ``RunConfig``: JSON in and out with unknown keys refused, and ``--set KEY=VALUE`` overrides
parsed to each field's type (``model.KEY=VALUE`` for the model's sizes). Every mistake is one
``TrainingError``; the values themselves are checked in ``run_settings``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mae_jax.checkpoint import recorded_normalization
from mae_jax.config import MAEConfig, ViTConfig, get_config, get_vit_config, parse_setting
from mae_jax.normalization import Normalization


class TrainingError(RuntimeError):
    """Training cannot go on (a bad configuration, a non-finite loss); the message says why."""


class RunConfig:
    """What the run configs share: a dict (JSON) in and out, and ``--set`` overrides.

    Subclasses are frozen dataclasses with a ``kind`` (for messages) and ``model_defaults()``,
    the model config whose fields ``model.KEY=VALUE`` may set."""

    kind = "run"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TrainingError(f"unknown {cls.kind} settings: {', '.join(unknown)}")
        return cls(**tuples_from_json(d))

    def with_overrides(self, assignments: list[str]) -> Any:
        return apply_overrides(self, assignments, self.model_defaults())

    @staticmethod
    def model_defaults() -> Any:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class PretrainConfig(RunConfig):
    """A pretraining run. Defaults follow the official recommended command (PRETRAIN.md), which
    differs from the official argparse defaults: norm_pix_loss on, 800 epochs, blr 1.5e-4."""

    kind = "pretraining"

    preset: str = "mae_vit_large_patch16"
    data: str | None = None  # image folder; None means the bundled sample photographs
    img_size: int | None = None  # None: the preset's (224)
    batch_size: int = 64  # per device; global = batch_size * local devices * hosts
    accum_iter: int = 1
    epochs: int = 800
    warmup_epochs: int = 40
    blr: float = 1.5e-4  # lr = blr * effective batch / 256
    lr: float | None = None  # absolute peak lr; overrides blr
    min_lr: float = 0.0
    weight_decay: float = 0.05
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    # Compute dtype: auto = bfloat16 on GPU and TPU, float32 on CPU. Parameters, optimizer state,
    # LayerNorm statistics, softmax and loss stay float32 in any case.
    dtype: str = "auto"
    remat: str = "none"  # activation checkpointing per block: none, block or dots (model.py)
    # Attention kernel (model.py): auto = cuDNN's fused attention on a CUDA GPU in bfloat16, XLA's
    # elsewhere; cudnn = that or an error; xla = never cuDNN (the way around a cuDNN refusal).
    attention: str = "auto"
    shard_optimizer: bool = False  # ZeRO-1: each device keeps 1/n of the AdamW state
    prefetch: int = 2  # optimizer steps of images sent to the devices ahead of the step
    seed: int = 0
    max_steps: int | None = None  # stop after this many micro-steps (a short run), else all epochs
    log_every: int = 20  # micro-steps between metric lines
    ckpt_every: int = 1000  # micro-steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3
    # Resume from this step's checkpoint instead of the newest (e.g. before a loss went
    # non-finite; newer checkpoints are then discarded). None: the newest that verifies.
    restore_step: int | None = None
    recon_every: int = 1000  # micro-steps between reconstruction figures; 0 = never
    recon_images: int = 4
    read_threads: int = 16
    worker_count: int = -1  # loader processes; -1: one per core but one; 0: threads only
    # The preset's sizes changed, e.g. {"embed_dim": 384, "num_heads": 6}: `--set model.KEY=VALUE`
    # or a "model" object in the --config JSON; keys are MAEConfig fields.
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Pixel normalisation, one value per input channel (`--set mean=0.5` for a 1-channel model,
    # `--set mean=0.4,0.5,0.6` for RGB). None: ImageNet's for RGB, (0.449,), (0.226,) for gray.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def model_config(self) -> MAEConfig:
        overrides: dict[str, Any] = {"norm_pix_loss": self.norm_pix_loss}
        if self.img_size is not None:
            overrides["img_size"] = self.img_size
        return model_from_preset(get_config, self.preset, {**overrides, **self.model})

    @staticmethod
    def model_defaults() -> MAEConfig:
        return get_config("mae_vit_base_patch16")


# The published recipes (FINETUNE.md); base-size lines differ from large/huge.
_FINETUNE_RECIPES = {
    "vit_base_patch16": dict(blr=5e-4, layer_decay=0.65, drop_path=0.1, epochs=100),
    "vit_large_patch16": dict(blr=1e-3, layer_decay=0.75, drop_path=0.2, epochs=50),
    "vit_huge_patch14": dict(blr=1e-3, layer_decay=0.75, drop_path=0.3, epochs=50),
}


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(RunConfig):
    """A fine-tuning or linear-probing run. ``None`` fields take the published recipe's value for
    the preset and mode (see ``resolved``)."""

    kind = "fine-tuning"

    mode: str = "finetune"  # or "linprobe"
    preset: str = "vit_base_patch16"
    data: str = ""  # training ImageFolder (class sub-folders)
    val: str | None = None  # validation ImageFolder
    init: str | None = None  # MAE or classifier checkpoint, or pretraining workdir; None: scratch
    reset_head: bool = False  # with a classifier init: a new head instead of the checkpoint's
    img_size: int | None = None
    batch_size: int = 32  # per device
    accum_iter: int = 1
    epochs: int | None = None
    warmup_epochs: int | None = None
    blr: float | None = None
    lr: float | None = None
    min_lr: float | None = None
    weight_decay: float | None = None
    layer_decay: float | None = None
    drop_path: float | None = None
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    global_pool: bool | None = None
    seed: int = 0
    dtype: str = "auto"  # auto: bfloat16 on GPU and TPU, float32 on CPU (as pretraining)
    attention: str = "auto"  # auto, cudnn or xla: the attention kernel, as pretraining's
    max_steps: int | None = None
    log_every: int = 20
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    restore_step: int | None = None  # resume from this checkpoint instead of the newest
    read_threads: int = 16
    worker_count: int = -1  # loader processes; -1: one per core but one; 0: threads only
    # The preset's sizes changed (`--set model.KEY=VALUE`, ViTConfig fields). With --init, the
    # encoder's sizes and head count come from the checkpoint unless set here.
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Pixel normalisation per input channel (comma-separated in --set). None: what --init's
    # checkpoint records, else ImageNet's for RGB and (0.449,), (0.226,) for grayscale.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def resolved(self) -> FinetuneConfig:
        """The config with every ``None`` recipe field filled in."""
        if self.mode not in ("finetune", "linprobe"):
            raise TrainingError(f"mode must be finetune or linprobe, got {self.mode!r}")
        if self.mode == "finetune":
            recipe = dict(
                _FINETUNE_RECIPES.get(self.preset, _FINETUNE_RECIPES["vit_base_patch16"]),
                warmup_epochs=5,
                min_lr=1e-6,
                weight_decay=0.05,
                global_pool=True,
            )
        else:  # main_linprobe.py defaults
            recipe = dict(
                blr=0.1,
                epochs=90,
                warmup_epochs=10,
                min_lr=0.0,
                weight_decay=0.0,
                layer_decay=1.0,
                drop_path=0.0,
                global_pool=False,
            )
        fills = {k: v for k, v in recipe.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **fills)

    @staticmethod
    def model_defaults() -> ViTConfig:
        return get_vit_config("vit_base_patch16")


def normalization_for(
    in_chans: int,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
    init: str | None = None,
) -> Normalization:
    """A run's pixel normalisation: ``in_chans`` channels, its ``mean`` and ``std`` where set,
    else what the ``init`` checkpoint records (``recorded_normalization``), else the defaults.
    Every mistake is one TrainingError."""
    try:
        if init:
            return recorded_normalization(init, in_chans, mean, std)
        return Normalization.for_channels(in_chans, mean, std)
    except ValueError as err:
        raise TrainingError(f"model.in_chans={in_chans}, mean={mean}, std={std}: {err}") from None


def tuples_from_json(d: dict[str, Any]) -> dict[str, Any]:
    """JSON's lists as the tuples the configs hold (mean and std)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def model_from_preset(get: Callable, preset: str, overrides: dict[str, Any]) -> Any:
    """``get(preset, **overrides)`` (a config getter), with every mistake as one TrainingError."""
    try:
        fields = set(get(preset).to_dict())
    except ValueError as err:
        raise TrainingError(str(err)) from None
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TrainingError(
            f"model.{unknown[0]}: not a model setting; model settings: {', '.join(sorted(fields))}"
        )
    try:
        return get(preset, **overrides)
    except (ValueError, TypeError) as err:
        raise TrainingError(f"model ({preset} with {_shown(overrides)}): {err}") from None


def _shown(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "no changes"


def apply_overrides(config: Any, assignments: list[str], model_defaults: Any = None) -> Any:
    """A copy of the dataclass ``config`` with ``key=value`` strings applied, each value parsed
    to its field's type (``none`` for optional fields). ``model.KEY=VALUE`` sets an entry of the
    ``model`` dict, parsed as the type of ``model_defaults``' field KEY."""
    types_ = {f.name: f.type for f in dataclasses.fields(config)}
    model_types = {} if model_defaults is None else model_defaults.to_dict()
    changes: dict[str, Any] = {}
    model = dict(getattr(config, "model", {}))
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if sep and key.startswith("model.") and "model" in types_:
            name = key.removeprefix("model.")
            if name not in model_types:
                known = ", ".join(sorted(model_types))
                raise TrainingError(f"--set {item!r}: model settings are: {known}")
            model[name] = _parse_value(key, raw.strip(), type(model_types[name]).__name__)
            changes["model"] = model
            continue
        if not sep or key not in types_:
            known = ", ".join(sorted(types_))
            raise TrainingError(f"--set {item!r}: expected key=value with key one of: {known}")
        changes[key] = _parse_value(key, raw.strip(), str(types_[key]))
    return dataclasses.replace(config, **changes)


def _parse_value(key: str, raw: str, type_name: str) -> Any:
    try:
        return parse_setting(key, raw, type_name)
    except ValueError as err:
        raise TrainingError(str(err)) from None


def compute_dtype(name: str, platform: str | None = None) -> Any:
    """The compute dtype of a ``dtype`` setting: "auto" is bfloat16 on GPU and TPU, float32 on
    CPU (where the golden tests and parity checks run, and bfloat16 matmuls are slow)."""
    if name == "auto":
        name = "float32" if (platform or jax.default_backend()) == "cpu" else "bfloat16"
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(name)
    if dtype is None:
        raise TrainingError(f"dtype must be auto, float32 or bfloat16, got {name!r}")
    return dtype
