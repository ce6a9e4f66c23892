"""Fine-tuning and linear probing of an MAE encoder, with the official recipes.

The structure follows pretraining (``mae_jax/train.py``): the run's settings are
``mae_jax.run_config.FinetuneConfig``; a pure per-device step is wrapped in ``jax.pmap`` in one
place (``make_p_classify_step``); the loop uses the machinery pretraining uses (``run_loop``,
``run_checkpoints``, ``run_metrics``) and evaluates on the validation folder after every epoch.

Fine-tuning (FINETUNE.md): AdamW (0.9, 0.999), layer-wise lr decay, drop path, RandAugment
rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 / cutmix 1.0 with label smoothing 0.1,
warmup then cosine, global-pool head initialised with std 2e-5.

Linear probing: the encoder frozen, its cls token after the final norm, a BatchNorm without affine
parameters before the head (std 0.01), LARS (momentum 0.9, trust 0.001, no weight decay), the weak
augmentation (random resized crop and flip).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mae_jax import masking, multihost, optim
from mae_jax.classifier import (
    BatchNorm1d,
    VisionTransformer,
    init_classifier_from_classifier,
    init_classifier_from_mae,
)
from mae_jax.config import get_vit_config
from mae_jax.data import augment
from mae_jax.evaluate import evaluate
from mae_jax.normalization import Normalization, as_metadata
from mae_jax.replication import AXIS, replicate, shard_batch, unreplicate
from mae_jax.run_checkpoints import Checkpoints
from mae_jax.run_config import (
    FinetuneConfig,
    TrainingError,
    compute_dtype,
    model_from_preset,
    normalization_for,
)
from mae_jax.run_loop import (
    check_finite,
    close_run,
    crossed,
    make_workdir,
    plan_steps,
    progress_bar,
    resume_run,
    save_or_stop,
)
from mae_jax.run_metrics import MetricsLog
from mae_jax.run_settings import check_settings, compare_with_saved, write_settings
from mae_jax.workdir_lock import WorkdirLock

# --------------------------------------------------------------------------- models


class LinearProbe(nnx.Module):
    """A frozen ViT encoder, then BatchNorm without affine parameters, then the linear head."""

    def __init__(self, vit: VisionTransformer, *, rngs: nnx.Rngs):
        self.vit = vit
        # torch's BatchNorm1d with the official probe's eps; momentum 0.1 is torch's default.
        self.bn = BatchNorm1d(vit.config.embed_dim, epsilon=1e-6, momentum=0.1)
        self.config = vit.config

    def __call__(self, imgs, *, train: bool = False, key=None):
        feats = jax.lax.stop_gradient(self.vit.features(imgs))
        return self.vit.head(self.bn(feats, use_running_average=not train)).astype(jnp.float32)


def fold_batchnorm(probe: LinearProbe) -> VisionTransformer:
    """The probe as a plain classifier: the affine-free BatchNorm's running statistics folded into
    the head, head(x) = W (x - mean) / sqrt(var + eps) + b, so that it evaluates identically."""
    bn, head = probe.bn, probe.vit.head
    inv_std = 1.0 / jnp.sqrt(jnp.asarray(bn.var[...]) + bn.epsilon)
    kernel = jnp.asarray(head.kernel[...])
    head.bias.set_value(
        jnp.asarray(head.bias[...]) - (jnp.asarray(bn.mean[...]) * inv_std) @ kernel
    )
    head.kernel.set_value(kernel * inv_std[:, None])
    return probe.vit


def trainable_filter(mode: str):
    """What the optimizer updates: every parameter, or only the probe's head."""
    if mode == "linprobe":
        return nnx.All(nnx.Param, nnx.PathContains("head"))
    return nnx.Param


# --------------------------------------------------------------------------- the step


def classify_step(
    params: nnx.State,
    opt_state: optax.OptState,
    stats: nnx.State,
    frozen: nnx.State,
    imgs_AxNxHxWxC: jax.Array,
    targets_AxNxC: jax.Array,
    key: jax.Array,
    step: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
) -> tuple[nnx.State, optax.OptState, nnx.State, dict[str, jax.Array]]:
    """One optimizer step on one device, over ``A`` micro-batches [A, N, H, W, C] (``accum_iter``
    of them, or the rest of a group that a checkpoint of an older version was saved inside).

    Soft-target cross-entropy; the gradients summed over the micro-batches on the device, then
    averaged over them and the devices, and one update of ``tx`` (``optim.one_update_per_step``
    when A > 1). Micro-batch i draws its drop-path keys for micro-step ``step + i``. BatchNorm
    statistics (the probe's) advance at every micro-batch and are averaged over the devices.
    """

    def micro(stats, imgs, targets, i):
        device_key = masking.step_device_key(key, step + i, AXIS)

        def loss_fn(p):
            model = nnx.merge(graphdef, p, stats, frozen, copy=True)  # fresh at this trace level
            logits = model(imgs, train=True, key=device_key)
            loss = augment.soft_target_cross_entropy(logits, targets)
            return loss, nnx.state(model, nnx.BatchStat)

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, grads, jax.lax.pmean(new_stats, AXIS)

    accum = imgs_AxNxHxWxC.shape[0]
    if accum == 1:
        loss, grads, stats = micro(stats, imgs_AxNxHxWxC[0], targets_AxNxC[0], 0)
    else:

        def body(carry, xs):
            loss_sum, grads_sum, stats = carry
            loss, grads, stats = micro(stats, *xs)
            return (loss_sum + loss, jax.tree.map(jnp.add, grads_sum, grads), stats), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params), stats)
        xs = (imgs_AxNxHxWxC, targets_AxNxC, jnp.arange(accum))
        (loss, grads, stats), _ = jax.lax.scan(body, zeros, xs)
        loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
    grads = jax.lax.pmean(grads, AXIS)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": jax.lax.pmean(loss, AXIS), "grad_norm": optax.tree.norm(grads)}
    return params, opt_state, stats, metrics


def make_p_classify_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation):
    """``classify_step`` over every local device: the only ``jax.pmap`` of fine-tuning.

    Arguments: params, optimizer state, batch statistics and frozen weights replicated (leading
    device axis); images [devices, A, N, H, W, C] and targets [devices, A, N, classes]; then the
    base key and the first micro-step, shared by all devices.
    """
    return jax.pmap(
        functools.partial(classify_step, graphdef=graphdef, tx=tx),
        axis_name=AXIS,
        in_axes=(0, 0, 0, 0, 0, 0, None, None),
        donate_argnums=(0, 1),
    )


# --------------------------------------------------------------------------- the run

# The encoder's sizes, which a classifier started from a checkpoint takes from it.
ENCODER_FIELDS = (
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "layer_norm_eps",
)


def build_model(config: FinetuneConfig, num_classes: int, dtype) -> nnx.Module:
    """The classifier (or probe) to train, started from ``config.init`` when given."""
    from mae_jax.loading import load_pretrained

    overrides: dict[str, Any] = dict(
        num_classes=num_classes, global_pool=config.global_pool, drop_path_rate=config.drop_path
    )
    if config.img_size:
        overrides["img_size"] = config.img_size
    source = load_pretrained(config.init) if config.init else None
    if source is not None:
        # The encoder is the checkpoint's: its sizes, unless the run sets them (then checked).
        overrides |= {k: getattr(source.config, k) for k in ENCODER_FIELDS}
    vit_config = model_from_preset(get_vit_config, config.preset, overrides | config.model)
    head_std = 2e-5 if config.mode == "finetune" else 0.01
    rngs = nnx.Rngs(config.seed)
    if source is not None:
        if isinstance(source, VisionTransformer):  # continue from a classifier
            vit = init_classifier_from_classifier(
                source,
                vit_config,
                reset_head=config.reset_head,
                rngs=rngs,
                dtype=dtype,
                head_init_std=head_std,
                attention=config.attention,
            )
        else:
            vit = init_classifier_from_mae(
                source,
                vit_config,
                rngs=rngs,
                dtype=dtype,
                head_init_std=head_std,
                attention=config.attention,
            )
    else:
        vit = VisionTransformer(
            vit_config, rngs=rngs, dtype=dtype, head_init_std=head_std, attention=config.attention
        )
    return LinearProbe(vit, rngs=rngs) if config.mode == "linprobe" else vit


def _make_optimizer(config: FinetuneConfig, params, schedule, depth: int):
    """The run's optimizer, for a step that averages its ``accum_iter`` micro-batches'
    gradients and updates once; ``schedule`` is evaluated per update."""
    if config.mode == "linprobe":
        tx = optim.lars(schedule, weight_decay=config.weight_decay)
    else:
        tx = optim.make_finetune_optimizer(
            schedule,
            layer_decay=config.layer_decay,
            depth=depth,
            weight_decay=config.weight_decay,
            params=params,
        )
    return optim.one_update_per_step(tx, config.accum_iter)


def _transform(config: FinetuneConfig, norm: Normalization):
    if config.mode == "linprobe":
        return functools.partial(augment.linprobe_transform, norm=norm)
    return functools.partial(
        augment.finetune_transform,
        auto_augment=config.auto_augment,
        re_prob=config.reprob,
        norm=norm,
    )


def _targets(config: FinetuneConfig, images, labels, rng, num_classes):
    """Soft targets of a host batch: mixup/cutmix with smoothing, or smoothed one-hot."""
    if config.mode == "finetune" and (config.mixup > 0 or config.cutmix > 0):
        return augment.mixup_cutmix(
            images,
            labels,
            rng,
            num_classes=num_classes,
            mixup_alpha=config.mixup,
            cutmix_alpha=config.cutmix,
            prob=config.mixup_prob,
            switch_prob=config.mixup_switch_prob,
            label_smoothing=config.smoothing,
        )
    smoothing = config.smoothing if config.mode == "finetune" else 0.0
    return images, augment.smooth_one_hot(labels, num_classes, smoothing)


def _micro_batches(config: FinetuneConfig, loader, used_per_epoch, first_step, count, num_classes):
    """(epoch, images, targets) of micro-steps ``first_step .. first_step + count - 1``, images
    [devices, count, per-device batch, H, W, C] and targets [devices, count, per-device batch,
    classes]; each micro-batch is mixed with its own micro-step's generator. The left-over
    micro-batches of an epoch (fewer than ``accum_iter``) are read and dropped."""
    n_dev = jax.local_device_count()
    images, targets = [], []
    while len(images) < count:
        if loader.step >= used_per_epoch:
            next(loader)
            continue
        epoch, batch = next(loader)
        rng = np.random.default_rng([2, config.seed, first_step + len(images)])
        x, y = _targets(config, batch["image"], batch["label"], rng, num_classes)
        images.append(shard_batch(x, n_dev))
        targets.append(shard_batch(y.astype(np.float32), n_dev))
    return epoch, np.stack(images, axis=1), np.stack(targets, axis=1)


def finetune(config: FinetuneConfig, workdir: str | os.PathLike, *, progress: bool = True) -> dict:
    """Run (or resume) fine-tuning or linear probing in ``workdir``; returns a summary."""
    config = config.resolved()
    check_settings(config)  # every bad value is one line before anything is made or written
    if not config.data:
        raise TrainingError(
            "--data is required: the training image folder (one sub-folder per class)"
        )
    multihost.check_same_settings(config.to_dict())
    workdir = make_workdir(workdir)
    with WorkdirLock(workdir) as lock, multihost.StopRequest() as stop:
        return _finetune(config, workdir, lock, stop, progress)


def _model_dict(config: FinetuneConfig) -> dict[str, Any]:
    """The classifier's sizes as the preset and the run's changes make them."""
    sizes = {} if config.img_size is None else {"img_size": config.img_size}
    return get_vit_config(config.preset, **sizes, **config.model).to_dict()


def _finetune(config, workdir, lock, stop, progress) -> dict:
    """``finetune`` in its workdir, holding its lock, with signals turned into a stop."""
    from mae_jax.data import loaders as data_lib

    changes = compare_with_saved(workdir, config, _model_dict)
    dtype = compute_dtype(config.dtype)

    # ---- data
    n_dev = jax.local_device_count()
    folder = data_lib.open_dataset(config.data)
    num_classes = len(folder.classes)
    val_folder = data_lib.open_dataset(config.val) if config.val else None
    if val_folder is not None and len(val_folder.classes) != num_classes:
        raise data_lib.DataError(
            f"{config.val}: has {len(val_folder.classes)} class folders, {config.data} has {num_classes}"
        )
    host_batch = config.batch_size * n_dev
    if config.mode == "finetune" and config.mixup + config.cutmix > 0 and host_batch % 2:
        raise TrainingError(f"mixup needs an even batch per host, got {host_batch}")
    model = build_model(config, num_classes, dtype)
    norm = normalization_for(model.config.in_chans, config.mean, config.std, config.init)
    img_size = model.config.img_size
    loader = data_lib.pretrain_batches(
        folder,
        batch_size=host_batch,
        img_size=img_size,
        seed=config.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        read_threads=config.read_threads,
        worker_count=config.worker_count,
        transform=_transform(config, norm),
        norm=norm,
    )
    try:
        return _finetune_with_data(
            config,
            workdir,
            lock,
            stop,
            progress,
            loader,
            val_folder,
            num_classes,
            model,
            norm,
            changes,
        )
    finally:
        loader.close()


def _finetune_with_data(
    config, workdir, lock, stop, progress, loader, val_folder, num_classes, model, norm, changes
) -> dict:
    from mae_jax.checkpoint import save_model

    if jax.process_index() == 0:
        write_settings(workdir, config)  # only now that the data opened
    n_dev = jax.local_device_count()
    host_batch = config.batch_size * n_dev
    plan = plan_steps(config, loader.steps_per_epoch, host_batch * jax.process_count())
    schedule, used_per_epoch, total_steps = plan.schedule, plan.used_per_epoch, plan.total_steps
    accum = config.accum_iter
    total_steps = -(-total_steps // accum) * accum  # whole optimizer steps, as pretraining

    # ---- model and optimizer
    graphdef, params, stats, frozen = nnx.split(
        model, trainable_filter(config.mode), nnx.BatchStat, ...
    )
    tx = _make_optimizer(config, params, schedule, model.config.depth)
    opt_state = tx.init(params)

    ckpts = Checkpoints(workdir, keep=config.keep_checkpoints)
    stop.agree_through(ckpts.manager.reached_preemption)
    states = {"params": params, "stats": stats, "frozen": frozen}
    states, opt_state, step = resume_run(ckpts, states, opt_state, loader, config, changes)
    rep = {k: replicate(v, n_dev) for k, v in states.items()}
    rep_opt = replicate(opt_state, n_dev)
    p_step = make_p_classify_step(graphdef, tx)
    base_key = jax.random.key(config.seed)

    is_main = jax.process_index() == 0
    log = MetricsLog(workdir, enabled=is_main, resumed_at=step or None)
    bar = progress_bar(progress and is_main, total_steps, step)
    window: list[float] = []  # losses of the optimizer steps since the last log line
    window_steps = 0  # their micro-steps
    t_window = time.perf_counter()
    summary: dict[str, Any] = {"start_step": step, "interrupted": None, "val": []}

    def current_model():
        return nnx.merge(graphdef, *(unreplicate(rep[k]) for k in ("params", "stats", "frozen")))

    def save():
        meta = {
            "step": step,
            "epoch": loader.epoch,
            **Checkpoints.position(loader.get_state()),
            "config": config.to_dict(),
        }
        lock.check()
        ckpts.save(step, {k: unreplicate(v) for k, v in rep.items()}, unreplicate(rep_opt), meta)
        log.flush()

    def validate(epoch: int):
        if val_folder is None:
            return
        # Every host evaluates its share; all of them get the whole folder's figures.
        r = evaluate(current_model(), val_folder, batch_size=config.batch_size, norm=norm)
        if not is_main:
            return
        record = {
            "step": step,
            "epoch": epoch,
            "val_top1": r["top1"],
            "val_top5": r["top5"],
            "val_loss": r["loss"],
        }
        log.write(record)
        summary["val"].append(record)

    try:
        while step < total_steps:
            before = step
            # One optimizer step: a group of accum_iter micro-batches, or the rest of the
            # group that a checkpoint of an older version was saved inside.
            count = accum - step % accum
            epoch, images, targets = _micro_batches(
                config, loader, used_per_epoch, step, count, num_classes
            )
            lr = float(schedule(step // accum))
            new_params, new_opt, new_stats, metrics = p_step(
                rep["params"],
                rep_opt,
                rep["stats"],
                rep["frozen"],
                images,
                targets,
                base_key,
                step,
            )
            loss = float(metrics["loss"][0])
            check_finite(loss, float(metrics["grad_norm"][0]), step, epoch, ckpts)
            rep["params"], rep_opt, rep["stats"] = new_params, new_opt, new_stats
            step += count
            window.append(loss)
            window_steps += count
            bar.update(count)
            if crossed(before, step, config.log_every) or step == total_steps:
                now = time.perf_counter()
                record = {
                    "step": step,
                    "epoch": epoch,
                    "loss": float(np.mean(window)),
                    "lr": lr,
                    "images_per_s": window_steps
                    * host_batch
                    * jax.process_count()
                    / (now - t_window),
                    "skipped_images": loader.num_skipped,
                }
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                window, window_steps, t_window = [], 0, now
            if step % used_per_epoch == 0:
                validate(epoch)
            if save_or_stop(before, step, total_steps, config, ckpts, save, stop, summary):
                break
    finally:
        close_run(ckpts, bar, log)
    summary.update(end_step=step, total_steps=total_steps, skipped_images=loader.num_skipped)
    if summary["interrupted"] is None and is_main:
        m = current_model()
        classifier = fold_batchnorm(m) if isinstance(m, LinearProbe) else m
        out = save_model(
            classifier,
            workdir / "model",
            metadata={
                "family": config.mode,
                "preset": config.preset,
                "source": {"run": str(workdir)},
                "normalization": as_metadata(norm),
            },
            force=True,
        )
        summary["model"] = str(out)
    return summary
