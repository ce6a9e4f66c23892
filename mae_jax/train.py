"""MAE pretraining: the official recipe, data-parallel over every local device with ``jax.pmap``.

The loop of a run: its data, model and optimizer, the restore, then step after step of the pure
step (``mae_jax.pretrain_step``) with metrics, reconstruction figures, checkpoints and interruption
handling (``mae_jax.run_loop``). The run's settings are ``mae_jax.run_config.PretrainConfig``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import math
import os
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from mae_jax import multihost
from mae_jax.config import MAEConfig
from mae_jax.model import MaskedAutoencoderViT
from mae_jax.normalization import Normalization
from mae_jax.pretrain_step import (
    OptimizerShards,
    TrainState,
    make_p_train_step,
    packs_state,
    pretrain_optimizer,
    split_model,
)
from mae_jax.replication import (
    AXIS,
    distribute,
    local_axis_indices,
    replicate,
    shard_batch,
    unreplicate,
)
from mae_jax.run_checkpoints import Checkpoints
from mae_jax.run_config import PretrainConfig, compute_dtype, normalization_for
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


def _default_data_folder() -> str:
    from mae_jax import assets

    return str(assets.sample_images_dir())


def _recon_batch(folder, config: MAEConfig, count: int, norm: Normalization) -> np.ndarray | None:
    """The first ``count`` readable images of the folder, center-cropped: the fixed figure set."""
    from mae_jax.data.images import DataError, decode_bytes
    from mae_jax.data.transforms import square_image

    imgs = []
    for index in range(len(folder)):
        if len(imgs) == count:
            break
        try:
            encoded, name = folder.read(index)
            img = decode_bytes(encoded, name, norm.channels)
            imgs.append(square_image(img, config.img_size, center_crop=True, norm=norm))
        except (DataError, OSError):
            continue
    return np.stack(imgs) if imgs else None


def _write_reconstructions(
    model, imgs, workdir: Any, step: int, seed: int, mask_ratio: float, norm: Normalization
):
    from mae_jax import visualize

    figure = visualize.reconstruction_figure(
        model, imgs, seed=seed, mask_ratio=mask_ratio, note=f"step {step}", norm=norm
    )
    visualize.save_png(figure, workdir / "reconstructions" / f"step_{step:08d}.png")


@dataclasses.dataclass
class DeviceBatch:
    """One optimizer step's images on the devices, and where the loader stood after them."""

    epoch: int
    images: jax.Array  # [devices, accum_iter, per-device batch, H, W, C], uint8
    data_state: dict[str, Any]
    skipped_images: int


def device_batches(loader, *, used_per_epoch: int, accum_iter: int, ahead: int):
    """DeviceBatch after DeviceBatch, ``ahead`` of them already sent to the local devices.

    ``device_put`` returns at once and copies in the background, so while a step runs the next
    ``ahead`` batches travel to the devices. Left-over micro-batches at the end of an epoch
    (fewer than ``accum_iter``) are read and dropped, as the lr schedule expects.
    """
    n_dev = jax.local_device_count()
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))

    def produce():
        while True:
            group = []
            while len(group) < accum_iter:
                if loader.step >= used_per_epoch:
                    next(loader)
                    continue
                epoch, batch = next(loader)
                group.append(shard_batch(batch["image"], n_dev))
            images = jax.device_put(np.stack(group, axis=1), sharding)
            yield DeviceBatch(epoch, images, loader.get_state(), loader.num_skipped)

    source = produce()
    queue = collections.deque(itertools.islice(source, ahead))
    while True:
        queue.append(next(source))
        yield queue.popleft()


def _steady_state():
    """The context of one step between two sync points (log, save, figure, interrupt).

    Nothing in it reads a device value, so the host runs ahead of the devices. The tests replace
    it with ``jax.transfer_guard_device_to_host("disallow")`` plus a trap on host reads that also
    works on CPU (where the guard sees no transfer), and run the steps under it.
    """
    return contextlib.nullcontext()


def pretrain(config: PretrainConfig, workdir: str | os.PathLike, *, progress: bool = True) -> dict:
    """Run (or resume) pretraining in ``workdir``; returns a summary of the run."""
    check_settings(config)  # every bad value is one line before anything is made or written
    model_config = config.model_config()
    check_settings(config, model_config.num_patches)
    norm = normalization_for(model_config.in_chans, config.mean, config.std)
    multihost.check_same_settings(config.to_dict())
    workdir = make_workdir(workdir)
    with WorkdirLock(workdir) as lock, multihost.StopRequest() as stop:
        return _pretrain(config, model_config, norm, workdir, lock, stop, progress)


def _pretrain(config, model_config, norm, workdir, lock, stop, progress) -> dict:
    """``pretrain`` in its workdir, holding its lock, with signals turned into a stop."""
    from mae_jax.data import loaders as data_lib

    changes = compare_with_saved(workdir, config, _model_dict)
    dtype = compute_dtype(config.dtype)

    # ---- data: this host's shard, batches of batch_size * local devices
    n_dev = jax.local_device_count()
    folder = data_lib.open_dataset(config.data or _default_data_folder())
    host_batch = config.batch_size * n_dev
    if config.data is None and len(folder) < host_batch:
        # The bundled folder holds 7 photographs: list it often enough to fill one batch on any
        # number of devices (each copy gets its own random crops).
        copies = math.ceil(host_batch / len(folder))
        folder.paths, folder.labels = folder.paths * copies, np.tile(folder.labels, copies)
    loader = data_lib.pretrain_batches(
        folder,
        batch_size=host_batch,
        img_size=model_config.img_size,
        seed=config.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        read_threads=config.read_threads,
        worker_count=config.worker_count,
        pixels="uint8",
        norm=norm,
    )
    try:
        return _pretrain_with_data(
            config,
            model_config,
            norm,
            workdir,
            lock,
            stop,
            progress,
            folder,
            loader,
            changes,
            dtype,
        )
    finally:
        loader.close()


def _pretrain_with_data(
    config, model_config, norm, workdir, lock, stop, progress, folder, loader, changes, dtype
) -> dict:
    n_dev = jax.local_device_count()
    host_batch = config.batch_size * n_dev
    if jax.process_index() == 0:
        write_settings(workdir, config)  # only now that the data opened
    # ---- model and optimizer
    global_batch = host_batch * jax.process_count()
    plan = plan_steps(config, loader.steps_per_epoch, global_batch)
    accum = config.accum_iter
    # Whole optimizer steps only (max_steps is rounded up to one).
    total_steps = -(-plan.total_steps // accum) * accum
    # The lr of every optimizer step, computed once: the loop then never waits for the device.
    lr_table = np.asarray(jax.jit(plan.schedule)(np.arange(total_steps // accum)))
    model = MaskedAutoencoderViT(
        model_config,
        rngs=nnx.Rngs(config.seed),
        dtype=dtype,
        remat=config.remat,
        attention=config.attention,
    )
    graphdef, param_states, fixed_states = split_model(model)
    # On GPUs the step takes the parameters and the optimizer state packed into one flat buffer
    # per weight-decay group (mae_jax.packing): a call then hands the runtime a few buffers
    # instead of one per parameter and moment, and the host keeps ahead of the device
    # (packs_state). Checkpoints hold the per-parameter trees either way.
    params = nnx.to_pure_dict(param_states)
    packing, tx = pretrain_optimizer(params, packed=packs_state(), weight_decay=config.weight_decay)
    # The initial optimizer state as checkpoints hold it (per parameter), to restore into.
    opt_state = packing.unpack_state(jax.tree.map(np.asarray, tx.init(packing.pack(params))))
    shards = (
        OptimizerShards(
            jax.eval_shape(packing.pack, params), jax.device_count(), local_axis_indices(n_dev)
        )
        if config.shard_optimizer
        else None
    )

    # ---- restore (into the States, in place)
    ckpts = Checkpoints(workdir, keep=config.keep_checkpoints)
    stop.agree_through(ckpts.manager.reached_preemption)
    _, opt_state, step = resume_run(
        ckpts, {"params": param_states, "fixed": fixed_states}, opt_state, loader, config, changes
    )
    params, fixed = nnx.to_pure_dict(param_states), nnx.to_pure_dict(fixed_states)
    opt_state = packing.pack_state(jax.tree.map(np.asarray, opt_state))
    full_opt_like = opt_state  # host arrays: the shapes unshard gathers into at saves
    if shards is None:
        device_opt = replicate(opt_state, n_dev)
    else:
        device_opt = distribute(shards.shard(opt_state, tx.init(shards.template())))
    state = TrainState(
        graphdef, replicate(packing.pack(params), n_dev), replicate(fixed, n_dev), device_opt, step
    )
    # The replicas are the state from here on: free the host copies (1.3 GB for ViT-B).
    del model, param_states, fixed_states, params, fixed, opt_state, device_opt
    p_train_step = make_p_train_step(
        graphdef, tx, config.mask_ratio, model_config.num_patches, shards, norm, packing
    )
    base_key = jax.random.key(config.seed)
    batches = device_batches(
        loader, used_per_epoch=plan.used_per_epoch, accum_iter=accum, ahead=config.prefetch
    )

    # ---- observability (the first host writes logs and figures; every host writes checkpoints)
    is_main = jax.process_index() == 0
    metrics_log = MetricsLog(workdir, enabled=is_main, resumed_at=step or None)
    recon_imgs = (
        _recon_batch(folder, model_config, config.recon_images, norm)
        if config.recon_every and is_main
        else None
    )
    bar = progress_bar(progress and is_main, total_steps, step)
    # Metrics stay on the devices until they are read at a log step or before a save.
    pending: list[tuple[int, int, float, dict[str, jax.Array]]] = []
    t_window = time.perf_counter()
    summary = {"start_step": step, "interrupted": None}
    last = DeviceBatch(loader.epoch, None, loader.get_state(), loader.num_skipped)

    def read_metrics() -> list[dict[str, float]]:
        """Fetch the pending metrics; stop the run (before anything is saved) if one is not
        finite: the last checkpoint then stays the last good one."""
        rows = []
        for (step_, epoch, lr, _), values in zip(
            pending, jax.device_get([m for *_, m in pending]), strict=True
        ):
            loss, grad_norm = float(values["loss"][0]), float(values["grad_norm"][0])
            check_finite(loss, grad_norm, step_, epoch, ckpts)
            rows.append({"loss": loss, "grad_norm": grad_norm, "lr": lr, "epoch": epoch})
        pending.clear()
        return rows

    def write_figure():
        params = packing.unpack(unreplicate(state.params))
        model = nnx.merge(graphdef, params, unreplicate(state.fixed))
        _write_reconstructions(
            model, recon_imgs, workdir, state.step, config.seed, config.mask_ratio, norm
        )

    def save():
        window.extend(read_metrics())
        meta = {
            "step": state.step,
            "epoch": last.epoch,
            **Checkpoints.position(last.data_state),
            "seed": config.seed,
            "config": config.to_dict(),
        }
        if shards is None:
            opt_host = unreplicate(state.opt_state)
        else:
            opt_host = shards.unshard(state.opt_state, full_opt_like)
        lock.check()
        ckpts.save(
            state.step,
            {
                "params": packing.unpack(unreplicate(state.params)),
                "fixed": unreplicate(state.fixed),
            },
            packing.unpack_state(opt_host),
            meta,
        )
        metrics_log.flush()

    window: list[dict[str, float]] = []
    try:
        while state.step < total_steps:
            before = state.step
            with _steady_state():
                batch = next(batches)
                lr = lr_table[before // accum]
                state.params, state.opt_state, metrics = p_train_step(
                    state.params,
                    state.opt_state,
                    state.fixed,
                    batch.images,
                    base_key,
                    before,
                    lr,
                )
                state.step += accum
                last = batch
                pending.append((before, batch.epoch, float(lr), metrics))
                bar.update(accum)
            final = state.step >= total_steps
            if crossed(before, state.step, config.log_every) or final:
                window.extend(read_metrics())
                now = time.perf_counter()
                record = {
                    "step": state.step,
                    "epoch": batch.epoch,
                    "loss": float(np.mean([r["loss"] for r in window])),
                    "grad_norm": float(np.mean([r["grad_norm"] for r in window])),
                    "lr": window[-1]["lr"],
                    "images_per_s": len(window) * accum * global_batch / (now - t_window),
                    "skipped_images": batch.skipped_images,
                }
                metrics_log.write(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    lr=f"{record['lr']:.2e}",
                    img_s=f"{record['images_per_s']:.1f}",
                )
                window, t_window = [], now
            if recon_imgs is not None and crossed(before, state.step, config.recon_every):
                write_figure()
            if save_or_stop(before, state.step, total_steps, config, ckpts, save, stop, summary):
                break
    finally:
        close_run(ckpts, bar, metrics_log)
    summary.update(end_step=state.step, total_steps=total_steps, skipped_images=last.skipped_images)
    if recon_imgs is not None and summary["interrupted"] is None:
        write_figure()
    return summary


def _model_dict(config: PretrainConfig) -> dict[str, Any]:
    return config.model_config().to_dict()
