"""Fine-tuning and linear probing loops on a tiny synthetic task, on 8 fake CPU devices."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

import mae_jax
from convert.pth_to_orbax import convert_pth
from mae_jax import cli, finetune, optim
from mae_jax.classifier import EncoderMismatchError, VisionTransformer
from mae_jax.data import augment

GOLDEN = Path(__file__).parent / "golden"


def _two_class_folder(root: Path, per_class: int, seed: int) -> Path:
    """Horizontal vs vertical stripes, random phase and colours: easy for a tiny ViT."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:40, 0:40]
    for label, name in enumerate(["horizontal", "vertical"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            coord = yy if label == 0 else xx
            wave = (np.sin(coord / 2.0 + rng.uniform(0, 6)) > 0).astype(np.float32)
            c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            img = wave[..., None] * c1 + (1 - wave[..., None]) * c2
            Image.fromarray(img.astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    return _two_class_folder(root / "train", 32, 0), _two_class_folder(root / "val", 16, 1)


@pytest.fixture(scope="module")
def mae_init(tmp_path_factory):
    out, _ = convert_pth(GOLDEN / "tiny_shared.pth", tmp_path_factory.mktemp("mae") / "tiny")
    return out


def _config(mode, task, init, **kw):
    train, val = task
    base = dict(
        mode=mode,
        preset="vit_tiny_patch4",
        data=str(train),
        val=str(val),
        init=str(init),
        batch_size=2,
        epochs=12,
        warmup_epochs=1,
        log_every=4,
        read_threads=2,
        worker_count=0,
        auto_augment="",
        reprob=0.0,
        mixup=0.0,
        cutmix=0.0,
    )
    base.update(kw)
    return finetune.FinetuneConfig(**base)


def test_recipe_defaults():
    ft = finetune.FinetuneConfig(preset="vit_large_patch16").resolved()
    assert (ft.blr, ft.layer_decay, ft.drop_path, ft.epochs, ft.warmup_epochs) == (
        1e-3,
        0.75,
        0.2,
        50,
        5,
    )
    assert (ft.smoothing, ft.mixup, ft.cutmix, ft.reprob, ft.global_pool) == (
        0.1,
        0.8,
        1.0,
        0.25,
        True,
    )
    assert finetune.FinetuneConfig().resolved().layer_decay == 0.65
    lp = finetune.FinetuneConfig(mode="linprobe").resolved()
    assert (lp.blr, lp.weight_decay, lp.epochs, lp.warmup_epochs, lp.global_pool) == (
        0.1,
        0.0,
        90,
        10,
        False,
    )


def test_finetuning_lifts_validation_accuracy_above_chance(task, mae_init, tmp_path):
    summary = finetune.finetune(
        _config("finetune", task, mae_init, lr=5e-3, epochs=20), tmp_path, progress=False
    )
    accs = [r["val_top1"] for r in summary["val"]]
    assert len(accs) == 20
    assert max(accs[-3:]) >= 80.0, accs  # chance is 50%
    model = mae_jax.load_pretrained(tmp_path / "model")
    assert isinstance(model, VisionTransformer) and model.config.num_classes == 2


# The official fine-tuning augmentation and regularisation (the tiny tests turn them off otherwise).
FULL_RECIPE_AUGMENTATION = dict(
    auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, drop_path=0.1
)


def test_finetuning_with_the_full_augmentation_and_accumulation_runs(
    task, mae_init, tmp_path, monkeypatch
):
    """Two micro-steps with accum_iter=2: one optimizer step, and AdamW runs once on each
    device (optax's MultiSteps ran it at every micro-step and masked the result: twice)."""
    adamw_runs = []
    plain_adamw = optax.adamw

    def counted_adamw(*args, **kwargs):
        tx = plain_adamw(*args, **kwargs)

        def update(updates, state, params=None):
            jax.debug.callback(lambda: adamw_runs.append(1))
            return tx.update(updates, state, params)

        return optax.GradientTransformation(tx.init, update)

    monkeypatch.setattr(optax, "adamw", counted_adamw)
    cfg = _config(
        "finetune",
        task,
        mae_init,
        lr=1e-3,
        max_steps=2,
        accum_iter=2,
        log_every=1,
        **FULL_RECIPE_AUGMENTATION,
    )
    summary = finetune.finetune(cfg, tmp_path, progress=False)
    assert len(adamw_runs) == jax.local_device_count()
    assert summary["end_step"] == 2
    assert len(_losses(tmp_path)) == 1 and np.isfinite(_losses(tmp_path)[0])


def _colour_folder(root: Path, per_class: int, seed: int) -> Path:
    """Reddish vs bluish noise: linearly separable even in a random encoder's features."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(["red", "blue"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.uniform(0, 120, (40, 40, 3))
            img[..., 0 if label == 0 else 2] += 120
            Image.fromarray(img.astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def test_linear_probe_trains_only_the_head_and_folds_batchnorm(mae_init, tmp_path):
    task = (_colour_folder(tmp_path / "train", 32, 0), _colour_folder(tmp_path / "val", 16, 1))
    cfg = _config(
        "linprobe", task, mae_init, lr=20.0, epochs=6, log_every=100
    )  # LARS: steps of lr * 1e-3 * |w|
    summary = finetune.finetune(cfg, tmp_path / "run", progress=False)
    probe_model = mae_jax.load_pretrained(tmp_path / "run" / "model")
    encoder = mae_jax.load_pretrained(mae_init)
    # the encoder is untouched
    np.testing.assert_array_equal(
        probe_model.blocks[1].mlp.fc2.kernel[...], encoder.blocks[1].mlp.fc2.kernel[...]
    )
    np.testing.assert_array_equal(probe_model.norm.scale[...], encoder.norm.scale[...])
    assert summary["val"][-1]["val_top1"] >= 90.0, summary["val"]
    # the exported classifier (BatchNorm folded into the head) scores what the probe scored
    from mae_jax.data import ImageFolder
    from mae_jax.evaluate import evaluate

    exported = evaluate(probe_model, ImageFolder(task[1]), batch_size=8)
    assert exported["top1"] == pytest.approx(summary["val"][-1]["val_top1"])


def test_batchnorm_folding_is_exact():
    cfg = mae_jax.config.get_vit_config("vit_tiny_patch4", global_pool=False, num_classes=3)
    probe = finetune.LinearProbe(
        VisionTransformer(cfg, rngs=nnx.Rngs(0), head_init_std=0.5), rngs=nnx.Rngs(1)
    )
    probe.bn.mean[...] = jnp.linspace(-1, 1, 64)
    probe.bn.var[...] = jnp.linspace(0.5, 2, 64)
    imgs = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
    want = probe(imgs)
    got = finetune.fold_batchnorm(probe)(imgs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_probe_batchnorm_keeps_torchs_running_statistics():
    """16 training batches of 8 features through the probe's BatchNorm and through torch's
    BatchNorm1d(affine=False, eps=1e-6, momentum=0.1): the same running statistics (rtol 1e-5;
    2.5e-7 seen) and normalised batches (atol 1e-5; 1e-6 seen). torch keeps the unbiased
    variance (squares over n - 1) and normalises the batch with the biased one; nnx.BatchNorm
    kept the biased one, 12% off here."""
    torch = pytest.importorskip("torch")
    cfg = mae_jax.config.get_vit_config("vit_tiny_patch4", global_pool=False, num_classes=3)
    encoder = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))  # not run here
    probe = finetune.LinearProbe(encoder, rngs=nnx.Rngs(1))
    ref = torch.nn.BatchNorm1d(64, affine=False, eps=1e-6, momentum=0.1)
    rng = np.random.default_rng(0)
    scale, shift = rng.uniform(0.5, 2.0, 64), rng.normal(0, 1, 64)
    outputs = []
    for _ in range(16):
        feats = (rng.normal(0, 1, (8, 64)) * scale + shift).astype(np.float32)
        got = probe.bn(jnp.asarray(feats), use_running_average=False)
        outputs.append((got, ref(torch.from_numpy(feats)).numpy()))
    np.testing.assert_allclose(probe.bn.mean[...], ref.running_mean.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(probe.bn.var[...], ref.running_var.numpy(), rtol=1e-5)
    outputs.append(
        (
            probe.bn(jnp.asarray(feats), use_running_average=True),
            ref.eval()(torch.from_numpy(feats)).numpy(),
        )
    )
    for got, want in outputs:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_one_update_per_step_resumes_multisteps_states():
    """The state of ``one_update_per_step`` is MultiSteps' (checkpoints of either load in the
    other), and its update equals MultiSteps' after a whole group, from the start or from a
    state MultiSteps left inside a group (within 1e-7 on unit-sized parameters)."""
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3)}
    grads = [jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 2.0)), params) for i in range(3)]
    inner = optax.adamw(1e-2, weight_decay=0.1)
    multi, ours = optim.accumulate(inner, 3), optim.one_update_per_step(inner, 3)
    multi_update, ours_update = jax.jit(multi.update), jax.jit(ours.update)
    state = multi.init(params)
    assert jax.tree.structure(ours.init(params)) == jax.tree.structure(state)
    for g in grads:
        want, state = multi_update(g, state, params)  # the third call emits the update
    mean = jax.tree.map(lambda *g: sum(g) / 3, *grads)
    fresh = ours_update(mean, ours.init(params), params)
    # from inside a group: MultiSteps saw the first micro-batch, ours gets the other two
    inside = multi_update(grads[0], multi.init(params), params)[1]
    rest = jax.tree.map(lambda a, b: (a + b) / 2, grads[1], grads[2])
    resumed = ours_update(rest, inside, params)
    for got, got_state in (fresh, resumed):
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-7)
        assert int(got_state.gradient_step) == 1 and int(got_state.mini_step) == 0
        assert int(got_state.inner_opt_state[0].count) == 1
        assert not any(np.any(a) for a in jax.tree.leaves(got_state.acc_grads))


def test_accumulated_step_is_one_adamw_update_on_the_mean_gradient(classifier_init):
    """One optimizer step of accum_iter=2 on 2 devices (drop path on, layer decay 0.75) is the
    fine-tuning AdamW applied once to the mean of the 4 micro-batch gradients, taken with
    jax.grad under the same drop-path keys; the optimizer counts one update.

    Adam's first moment (0.1 x that mean) within 1e-6 of each tensor's largest entry (2.2e-7
    seen); the parameters within 1e-6 (3.4e-7 seen) wherever the mean gradient exceeds 1e-7.
    Only the key biases fall below: attention's softmax ignores them, so their gradient is
    rounding, which Adam's normalisation turns into steps of up to the lr (3e-4 apart seen).
    """
    n_dev, accum, per_dev = 2, 2, 2
    src, _ = classifier_init
    cfg = src.config.replace(drop_path_rate=0.1)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0))))
    params, stats, frozen = nnx.split(src, nnx.Param, nnx.BatchStat, ...)[1:]
    config = finetune.FinetuneConfig(accum_iter=accum, layer_decay=0.75, weight_decay=0.05)
    tx = finetune._make_optimizer(config, params, optax.constant_schedule(1e-3), cfg.depth)
    rng = np.random.default_rng(0)
    imgs = rng.normal(0, 1, (n_dev, accum, per_dev, 32, 32, 3)).astype(np.float32)
    targets = rng.dirichlet(np.ones(2), (n_dev, accum, per_dev)).astype(np.float32)
    key, step = jax.random.key(7), 4

    state = [finetune.replicate(x, n_dev) for x in (params, tx.init(params), stats, frozen)]
    got, opt = map(
        finetune.unreplicate,
        finetune.make_p_classify_step(graphdef, tx)(*state, imgs, targets, key, step)[:2],
    )

    def loss(p, x, y, k):
        logits = nnx.merge(graphdef, p, stats, frozen)(x, train=True, key=k)
        return augment.soft_target_cross_entropy(logits, y)

    keys = [
        jax.random.fold_in(jax.random.fold_in(key, step + i), d)
        for d in range(n_dev)
        for i in range(accum)
    ]
    ref_tx = optim.make_finetune_optimizer(
        1e-3, layer_decay=0.75, depth=cfg.depth, weight_decay=0.05
    )

    @jax.jit
    def reference(p):
        micro = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, 0))(
            p,
            imgs.reshape(-1, per_dev, 32, 32, 3),
            targets.reshape(-1, per_dev, 2),
            jnp.stack(keys),
        )
        g = jax.tree.map(lambda x: x.mean(axis=0), micro)
        updates, ref_state = ref_tx.update(g, ref_tx.init(p), p)
        return g, optax.apply_updates(p, updates), ref_state

    g, want, ref_state = reference(params)
    for a, b in zip(
        jax.tree.leaves(opt.inner_opt_state[0][0].mu),
        jax.tree.leaves(ref_state[0][0].mu),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(np.abs(b).max()))
    moved = 0.0
    for a, b, p, mean_grad in zip(*map(jax.tree.leaves, (got, want, params, g)), strict=True):
        b, clear = np.asarray(b), np.abs(np.asarray(mean_grad)) > 1e-7
        np.testing.assert_allclose(a[clear], b[clear], rtol=0, atol=1e-6)
        np.testing.assert_array_less(np.abs(a - b), 2.1e-3)
        moved = max(moved, float(np.abs(a - np.asarray(p)).max()))
    assert moved > 1e-4  # the update is not negligible against the tolerance
    assert int(opt.gradient_step) == 1 and int(opt.inner_opt_state[0][0].count) == 1


def test_bad_settings(task, tmp_path):
    with pytest.raises(finetune.TrainingError, match="mode must be finetune or linprobe"):
        finetune.FinetuneConfig(mode="distill").resolved()
    with pytest.raises(finetune.TrainingError, match="key one of"):
        finetune.FinetuneConfig().with_overrides(["nope=1"])
    assert finetune.FinetuneConfig().with_overrides(["blr=0.002", "val=none"]).blr == 0.002


def _losses(workdir: Path) -> list[float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if '"loss"' in x]


def test_resumed_finetuning_gives_the_same_losses(task, mae_init, tmp_path):
    """Stopped after 3 steps and run again, it continues to the same losses and weights as one
    uninterrupted run (bitwise on CPU): data position, augmentation and drop-path keys restored."""
    cfg = _config(
        "finetune",
        task,
        mae_init,
        lr=1e-3,
        log_every=1,
        **FULL_RECIPE_AUGMENTATION,
        val=None,
    )
    whole = finetune.finetune(dataclasses.replace(cfg, max_steps=6), tmp_path / "a", progress=False)
    first = finetune.finetune(dataclasses.replace(cfg, max_steps=3), tmp_path / "b", progress=False)
    assert first["end_step"] == 3
    second = finetune.finetune(
        dataclasses.replace(cfg, max_steps=6), tmp_path / "b", progress=False
    )
    assert second["end_step"] == whole["end_step"] == 6
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    a = jax.tree.leaves(nnx.state(mae_jax.load_pretrained(tmp_path / "a" / "model")))
    b = jax.tree.leaves(nnx.state(mae_jax.load_pretrained(tmp_path / "b" / "model")))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def classifier_init(tmp_path_factory):
    """A 2-class tiny classifier checkpoint, as fine-tuning leaves it (global pool)."""
    from mae_jax.checkpoint import save_model

    model = mae_jax.create_classifier("vit_tiny_patch4", rngs=nnx.Rngs(5), num_classes=2)
    model.head.kernel[...] = jax.random.normal(jax.random.key(6), model.head.kernel.shape)
    return model, save_model(model, tmp_path_factory.mktemp("clf") / "clf")


def test_continue_from_a_classifier_copies_everything(task, classifier_init):
    src, ckpt = classifier_init
    model = finetune.build_model(_config("finetune", task, ckpt).resolved(), 2, jnp.float32)
    a = nnx.to_pure_dict(nnx.state(src))
    b = nnx.to_pure_dict(nnx.state(model))
    pairs = zip(jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b), strict=True)
    assert all(np.array_equal(x, y) for (_, x), (_, y) in pairs)


def test_head_of_another_size_needs_reset_head(task, classifier_init, tmp_path, capsys):
    _, ckpt = classifier_init
    three = tmp_path / "three"
    for name in ("red", "green", "blue"):
        (three / name).mkdir(parents=True)
        Image.new("RGB", (40, 40), name).save(three / name / "0.png")
    argv = ["finetune", "--data", str(three), "--init", str(ckpt), "--preset", "vit_tiny_patch4"]
    argv += ["--workdir", str(tmp_path / "run"), "--quiet", "--set", "max_steps=1"]
    argv += ["--set", "batch_size=1", "--set", "read_threads=1", "--set", "worker_count=0"]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "head has 2 classes, the data 3" in err
    assert "--reset-head" in err
    assert not (tmp_path / "run" / "model").exists()

    cfg = _config("finetune", (three, None), ckpt, val=None, reset_head=True).resolved()
    model = finetune.build_model(cfg, 3, jnp.float32)
    src, _ = classifier_init
    assert model.head.kernel.shape == (64, 3)
    assert float(jnp.abs(model.head.kernel[...]).max()) < 1e-3  # new: std 2e-5
    np.testing.assert_array_equal(model.fc_norm.scale[...], src.fc_norm.scale[...])
    np.testing.assert_array_equal(
        model.blocks[1].mlp.fc2.kernel[...], src.blocks[1].mlp.fc2.kernel[...]
    )


def test_pooling_of_a_classifier_init_must_match(task, classifier_init):
    _, ckpt = classifier_init
    cfg = _config("finetune", task, ckpt, global_pool=False).resolved()
    with pytest.raises(EncoderMismatchError, match="global_pool=true"):
        finetune.build_model(cfg, 2, jnp.float32)
