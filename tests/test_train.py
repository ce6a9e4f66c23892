"""Data-parallel pretraining on 8 fake CPU devices (see conftest.py)."""

import contextlib
import functools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import mae_jax
from mae_jax import masking, optim, pretrain_step, replication, run_checkpoints, run_config, train
from mae_jax.run_settings import SettingsError

TINY = "mae_vit_tiny_patch4"
N_DEV = 8


def _split(seed=0):
    return pretrain_step.split_model(mae_jax.create_model(TINY, rngs=nnx.Rngs(seed)))


def _global_noise(key, step, per_device, num_patches):
    """The masks the 8 devices draw, concatenated in device order."""
    return jnp.concatenate(
        [
            masking.random_noise(
                jax.random.fold_in(jax.random.fold_in(key, step), d), per_device, num_patches
            )
            for d in range(N_DEV)
        ]
    )


def test_pmap_grads_equal_single_device_on_the_global_batch():
    assert jax.local_device_count() == N_DEV
    graphdef, params, fixed = _split()
    imgs = jax.random.normal(jax.random.key(1), (N_DEV * 2, 32, 32, 3))
    key, step = jax.random.key(7), 3
    p_grads = jax.pmap(
        functools.partial(
            pretrain_step.device_grads, graphdef=graphdef, mask_ratio=0.75, num_patches=64
        ),
        axis_name=replication.AXIS,
        in_axes=(0, 0, 0, None, None),
    )
    loss_p, grads_p = p_grads(
        replication.replicate(params, N_DEV),
        replication.replicate(fixed, N_DEV),
        replication.shard_batch(imgs, N_DEV),
        key,
        step,
    )
    noise = _global_noise(key, step, 2, 64)
    loss_1, grads_1 = pretrain_step.loss_and_grads(graphdef, params, fixed, imgs, noise, 0.75)
    np.testing.assert_allclose(loss_p, np.full(N_DEV, loss_1), rtol=1e-6)
    for gp, g1 in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_1), strict=True):
        np.testing.assert_allclose(gp, np.broadcast_to(g1, gp.shape), rtol=0, atol=1e-6)
    # each device drew its own masks
    rows = {np.asarray(n).tobytes() for n in masking.masking_from_noise(noise, 0.75).mask[::2]}
    assert len(rows) == N_DEV


def test_replicas_stay_identical_and_steps_draw_new_masks():
    graphdef, params, fixed = _split()
    tx = optim.pretrain_direction()
    step_fn = pretrain_step.make_p_train_step(graphdef, tx, 0.75, 64)
    p = replication.replicate(params, N_DEV)
    o = replication.replicate(tx.init(params), N_DEV)
    f = replication.replicate(fixed, N_DEV)
    imgs = replication.shard_batch(
        np.asarray(jax.random.normal(jax.random.key(2), (16, 32, 32, 3))), N_DEV
    )[:, None]  # one micro-batch per optimizer step
    losses = []
    for step in range(3):
        p, o, m = step_fn(p, o, f, imgs, jax.random.key(0), step, np.float32(1e-3))
        losses.append(float(m["loss"][0]))
        for leaf in jax.tree.leaves(p):
            assert all(np.array_equal(leaf[0], leaf[i]) for i in range(1, N_DEV))
    # same images, new masks every step: the losses differ
    assert len(set(losses)) == 3
    n0 = _global_noise(jax.random.key(0), 0, 2, 64)
    n1 = _global_noise(jax.random.key(0), 1, 2, 64)
    assert not np.array_equal(n0, n1)


# ------------------------------------------------------------------ the loop


def _image_folder(root: Path, n=32, size=40, corrupt=0) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        # smooth images (gradients and blobs) so that a tiny MAE can learn something quickly
        a, b, c = rng.uniform(0, 1, 3)
        img = np.stack(
            [255 * (a * xx / size), 255 * (b * yy / size), 255 * c * np.sin(xx / 5.0 + i) ** 2], -1
        )
        Image.fromarray(img.astype(np.uint8)).save(root / f"img_{i:03d}.png")
    for j in range(corrupt):
        (root / f"bad_{j}.jpg").write_bytes(b"not a jpeg at all")
    return root


def _cfg(data, **kw):
    base = dict(
        preset=TINY,
        data=str(data),
        batch_size=1,
        epochs=40,
        warmup_epochs=1,
        lr=2e-3,
        log_every=1,
        ckpt_every=4,
        recon_every=0,
        read_threads=2,
        worker_count=0,
        seed=0,
    )
    base.update(kw)
    return run_config.PretrainConfig(**base)


def _losses(workdir: Path) -> list[float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _image_folder(tmp_path_factory.mktemp("imgs"))


def test_loss_falls_on_a_tiny_folder(folder, tmp_path):
    summary = train.pretrain(_cfg(folder, max_steps=60, recon_every=30), tmp_path, progress=False)
    assert summary["end_step"] == 60
    losses = _losses(tmp_path)
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])
    assert sorted(os.listdir(tmp_path / "reconstructions")) == [
        "step_00000030.png",
        "step_00000060.png",
    ]
    assert any(
        p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir()
    )
    model = mae_jax.load_pretrained(str(tmp_path))
    assert isinstance(model, mae_jax.MaskedAutoencoderViT) and model.config.norm_pix_loss


@contextlib.contextmanager
def _step_compiles():
    """The number of compilations of the pmapped train step (the only computation that takes
    the [devices, accum_iter, batch, H, W, C] uint8 images) while the context is open."""
    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler, logger = Catch(), logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            yield lambda: sum(
                m.startswith("Compiling")
                and re.search(r"uint8\[\d+,\d+,\d+,32,32,3\]", m) is not None
                for m in seen
            )
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def straight_losses(folder, tmp_path_factory):
    """The losses of 10 steps in one go (one buffer per parameter, as on CPU)."""
    workdir = tmp_path_factory.mktemp("straight")
    train.pretrain(_cfg(folder, max_steps=10), workdir, progress=False)
    return _losses(workdir)


def test_resume_gives_the_same_losses_bitwise_with_one_compile_per_start(
    folder, tmp_path, straight_losses
):
    with _step_compiles() as compiles:
        train.pretrain(_cfg(folder, max_steps=6), tmp_path / "resumed", progress=False)
        assert compiles() == 1  # not again at the second step
    assert len(_losses(tmp_path / "resumed")) == 6
    with _step_compiles() as compiles:
        summary = train.pretrain(_cfg(folder, max_steps=10), tmp_path / "resumed", progress=False)
        assert compiles() == 1
    assert summary["start_step"] == 6
    assert _losses(tmp_path / "resumed") == straight_losses


def test_packed_state_saves_per_parameter_trees_and_resumes_on_either_layout(
    folder, tmp_path, monkeypatch, straight_losses
):
    """On GPUs the loop hands the step a few flat buffers (the host's time per call
    grows with the buffers: bench/bench_host.py); forced here on CPU. What it saves is what
    the per-parameter layout saves: the optimizer state is a list of leaves by index, and leaf
    i must be the same parameter's moment as leaf i of the per-parameter tree, or runs would
    resume scrambled. A run saved packed (and with ZeRO-1) resumes per parameter (replicated)
    with the same losses, bit for bit, as a run that never stopped."""
    calls, packings = [], []
    make_step = train.make_p_train_step

    def spying_make_step(*args, **kwargs):
        step_fn = make_step(*args, **kwargs)
        packings.append(kwargs.get("packing", args[6] if len(args) > 6 else None))

        def step(*step_args):
            out = step_fn(*step_args)
            calls.append((step_args[:3], jax.tree.map(np.asarray, out[:1])))
            return out

        return step

    with monkeypatch.context() as patch:
        patch.setattr(train, "make_p_train_step", spying_make_step)
        patch.setattr(train, "packs_state", lambda: True)
        with _step_compiles() as compiles:
            # packed and ZeRO-1: the optimizer state split over the 8 devices
            config = _cfg(folder, max_steps=6, shard_optimizer=True)
            train.pretrain(config, tmp_path, progress=False)
            assert compiles() == 1
    assert len(calls) == 6
    (params, opt_state, fixed), _ = calls[0]
    assert sorted(params) == ["decay", "no_decay"]
    # AdamW: its step count and two moments of each buffer, each device its slice of 1/8;
    # and the two fixed tables
    assert len(jax.tree.leaves(opt_state)) == 5 and len(jax.tree.leaves(fixed)) == 2
    assert opt_state[0].mu["decay"].shape == (8, -(-params["decay"].shape[1] // 8))

    _, param_states, fixed_states = _split()
    plain = nnx.to_pure_dict(param_states)
    template = optim.pretrain_direction(mask=optim.pretrain_decay_mask(plain)).init(plain)
    ckpts = run_checkpoints.Checkpoints(tmp_path, keep=2)
    try:
        states, saved, _ = ckpts.restore(
            6, {"params": param_states, "fixed": fixed_states}, template
        )
    finally:
        ckpts.close()
    packing = packings[0]
    last_params = calls[-1][1][0]
    assert len(jax.tree.leaves(saved)) == len(jax.tree.leaves(template)) > 100
    saved_params = nnx.to_pure_dict(states["params"])
    for a, b in zip(
        jax.tree.leaves(saved_params),
        jax.tree.leaves(packing.unpack(jax.tree.map(lambda x: x[0], last_params))),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    # the moments restore into the per-parameter tree (shapes checked by the restore); that each
    # is its own parameter's shows below: resumed from them, the run repeats the straight run
    mu = saved[0].mu["patch_embed"]["proj"]["kernel"]
    assert np.any(mu != 0)

    summary = train.pretrain(_cfg(folder, max_steps=10), tmp_path, progress=False)
    assert summary["start_step"] == 6
    assert _losses(tmp_path) == straight_losses


def test_a_changed_setting_is_refused_on_resume(folder, tmp_path):
    train.pretrain(_cfg(folder, max_steps=2), tmp_path, progress=False)
    with pytest.raises(SettingsError, match=r"other settings \(mask_ratio: 0.75 -> 0.5\)"):
        train.pretrain(_cfg(folder, max_steps=4, mask_ratio=0.5), tmp_path, progress=False)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(folder, tmp_path):
    with pytest.raises(
        run_config.TrainingError,
        match=r"(loss|gradient norm) is (nan|inf|-inf) at step \d+.*last good checkpoint \(step \d+\) is intact",
    ):
        train.pretrain(
            # metrics are read only at saves here: the check before each save must catch it
            _cfg(folder, max_steps=40, lr=1e6, ckpt_every=1, log_every=1000, warmup_epochs=0),
            tmp_path,
            progress=False,
        )
    model = mae_jax.load_pretrained(str(tmp_path))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model)))


def _trap_host_reads(monkeypatch):
    """Make the loop's steady state refuse device-to-host reads; returns a count of its steps.

    jax's transfer guard sees no transfer on CPU (device memory is host memory), so reads of
    device values (float(), bool(), .tolist(), jax.device_get) are also trapped where
    they materialise the value, ArrayImpl._value. (np.asarray and .item() read CPU buffers
    without it; on GPU and TPU the guard itself refuses them.)"""
    from jax._src import array

    inside, entered = [False], [0]
    original = array.ArrayImpl._value

    def guarded(self):
        if inside[0]:
            raise AssertionError("a device value was read between two log steps")
        return original.fget(self)

    @contextlib.contextmanager
    def steady_state():
        entered[0] += 1
        inside[0] = True
        try:
            with jax.transfer_guard_device_to_host("disallow"):
                yield
        finally:
            inside[0] = False

    monkeypatch.setattr(array.ArrayImpl, "_value", property(guarded))
    monkeypatch.setattr(train, "_steady_state", steady_state)
    return entered, steady_state


def test_the_trap_catches_a_host_read(monkeypatch):
    _, steady_state = _trap_host_reads(monkeypatch)
    loss = jnp.ones(()) * 2
    for read in (float, bool, jax.device_get, lambda x: x.tolist()):
        with pytest.raises(AssertionError, match="between two log steps"), steady_state():
            read(loss)
    assert float(loss) == 2.0  # outside the steady state reads are fine


def test_steps_between_log_steps_never_read_the_devices(folder, tmp_path, monkeypatch):
    """12 micro-steps in 6 optimizer steps of 2 micro-batches; metrics read at step 12 only."""
    entered, _ = _trap_host_reads(monkeypatch)
    cfg = _cfg(folder, max_steps=12, accum_iter=2, log_every=100, ckpt_every=100, prefetch=2)
    summary = train.pretrain(cfg, tmp_path, progress=False)
    assert entered[0] == 6 and summary["end_step"] == 12
    (record,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 12 and np.isfinite(record["loss"]) and record["loss"] > 0


class _CountingLoader:
    """A stand-in for data.pretrain_batches: batch i holds the value i, 5 batches per epoch."""

    def __init__(self, host_batch):
        self.host_batch, self.calls, self.step, self.num_skipped = host_batch, 0, 0, 0

    def __next__(self):
        epoch, value = self.calls // 5, self.calls
        self.calls += 1
        self.step = self.calls % 5
        return epoch, {"image": np.full((self.host_batch, 2, 2, 3), value, np.uint8)}

    def get_state(self):
        return {"next": self.calls}


def test_device_batches_run_ahead_in_order_and_drop_epoch_tails():
    loader = _CountingLoader(host_batch=N_DEV * 2)
    # 4 of the 5 batches of an epoch are used; accum 2 takes batches (0,1), (2,3), (5,6), ...
    batches = train.device_batches(loader, used_per_epoch=4, accum_iter=2, ahead=2)
    first = next(batches)
    assert loader.calls == 7  # this step's batch and two more already sent: 0-3, (4 dropped), 5-6
    assert first.images.shape == (N_DEV, 2, 2, 2, 2, 3) and first.images.dtype == np.uint8
    assert first.images.sharding.spec == jax.sharding.PartitionSpec(replication.AXIS)
    assert len(first.images.sharding.device_set) == N_DEV
    assert first.data_state == {"next": 2} and first.epoch == 0
    seen = [first] + [next(batches) for _ in range(3)]
    values = [np.asarray(b.images)[0, :, 0, 0, 0, 0].tolist() for b in seen]
    assert values == [[0, 1], [2, 3], [5, 6], [7, 8]]
    assert [b.epoch for b in seen] == [0, 0, 1, 1]


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    data = _image_folder(tmp_path / "imgs", n=16, corrupt=8)
    train.pretrain(_cfg(data, max_steps=3), tmp_path / "run", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["skipped_images"] > 0


def test_sigterm_saves_before_exiting(folder, tmp_path):
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent.parent)!r})\n"
        "import tests.conftest\n"
        "from mae_jax import train\n"
        "from tests.test_train import _cfg\n"
        f"s = train.pretrain(_cfg({str(folder)!r}, max_steps=100000, ckpt_every=100000), {str(tmp_path)!r}, progress=False)\n"
        "print('INTERRUPTED', s['interrupted'], s['end_step'])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (tmp_path / "metrics.jsonl").exists() and len(_losses(tmp_path)) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    _, name, end_step = out.strip().splitlines()[-1].split()
    assert name == "SIGTERM"
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [int(end_step)]
