"""One-channel models: grayscale images through the loaders, the train step, the figures and the
CLI, with the normalisation mean and std as settings.

References: the RGB pipeline (tested against torchvision's values elsewhere) on the same
grayscale files, whose three channels are then the gray channel; Pillow's luma formula for colour
files; plain float32 arithmetic for the normalisation; the model's own loss, computed outside the
train step, for the first logged loss of a run.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import mae_jax
from mae_jax import cli, data, masking, pretrain_step, train
from mae_jax.checkpoint import read_metadata
from mae_jax.normalization import Normalization
from mae_jax.run_settings import SettingsError
from tests.test_train import _cfg

TINY = "mae_vit_tiny_patch4"  # image 32, patch 4
GRAY = Normalization((0.5,), (0.25,))


def _gray_folder(root: Path, n: int = 16, size: int = 40) -> Path:
    """Smooth grayscale PNGs (mode L), one class folder."""
    rng = np.random.default_rng(3)
    (root / "a").mkdir(parents=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        a, b = rng.uniform(0.2, 1.0, 2)
        img = 255 * (a * xx / size + b * np.sin(yy / 4.0 + i) ** 2) / 2
        Image.fromarray(img.astype(np.uint8), "L").save(root / "a" / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def gray_folder(tmp_path_factory):
    return _gray_folder(tmp_path_factory.mktemp("gray"))


def _batches(folder, norm, pixels, batch_size=4, seed=5):
    loader = data.pretrain_batches(
        data.open_dataset(folder),
        batch_size=batch_size,
        img_size=32,
        seed=seed,
        end_epoch=1,
        pixels=pixels,
        worker_count=0,
        read_threads=2,
        norm=norm,
    )
    with loader:
        return [batch["image"] for _, batch in loader]


def test_gray_loader_gives_the_rgb_pipeline_s_pixels_in_one_channel(gray_folder):
    gray = _batches(gray_folder, GRAY, "uint8")
    rgb = _batches(gray_folder, data.IMAGENET, "uint8")
    assert len(gray) == len(rgb) == 4
    for g, c in zip(gray, rgb, strict=True):
        assert g.shape == (4, 32, 32, 1) and g.dtype == np.uint8
        # a gray file read as RGB has three equal channels: the same crops, the same pixels
        np.testing.assert_array_equal(c[..., 1:], np.repeat(c[..., :1], 2, axis=-1))
        np.testing.assert_array_equal(g, c[..., :1])
    # float32 batches: (v / 255 - 0.5) / 0.25 in float32, on the host and on the device alike
    host = _batches(gray_folder, GRAY, "float32")
    for g, f in zip(gray, host, strict=True):
        expected = (g.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.25)
        np.testing.assert_array_equal(f, expected)
        np.testing.assert_array_equal(np.asarray(GRAY.on_device(jnp.asarray(g))), f)


def test_colour_files_become_luma_and_eval_crops_match(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    (tmp_path / "a").mkdir()
    Image.fromarray(rgb).save(tmp_path / "a" / "colour.png")
    luma = np.asarray(data.decode_rgb(tmp_path / "a" / "colour.png", channels=1))
    # ITU-R 601-2: L = (299 R + 587 G + 114 B) / 1000; Pillow rounds in fixed point
    expected = (rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).round()
    assert luma.shape == (48, 40) and np.abs(luma - expected).max() <= 1
    batch = next(
        data.eval_batches(data.open_dataset(tmp_path), batch_size=1, img_size=32, norm=GRAY)
    )
    # the eval transform on the gray image: shorter side to 36 bicubic, centre 32 x 32 crop
    small = Image.fromarray(luma).resize((36, 43), Image.Resampling.BICUBIC)
    crop = np.asarray(small)[6:38, 2:34].astype(np.float32)
    np.testing.assert_array_equal(batch["image"][0, ..., 0], (crop / np.float32(255) - 0.5) / 0.25)


def test_mean_and_std_must_fit_the_channels():
    with pytest.raises(ValueError, match=r"mean and std have 3 values each but the images have 1"):
        Normalization.for_channels(1, (0.1, 0.2, 0.3), (0.2, 0.2, 0.2))
    with pytest.raises(ValueError, match="1 \\(grayscale\\) or 3 \\(RGB\\) channels, not 2"):
        Normalization.for_channels(2)
    assert Normalization.for_channels(1) == Normalization((0.449,), (0.226,))
    assert Normalization.for_channels(3) == data.IMAGENET


def _settings(folder, **kw):
    """test_train's tiny pretraining run, as a 1-channel model with mean 0.5 and std 0.25."""
    return _cfg(folder, **kw).with_overrides(["model.in_chans=1", "mean=0.5", "std=0.25"])


def _losses(workdir: Path) -> list[float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_a_one_channel_model_pretrains_on_grayscale_images(gray_folder, tmp_path):
    # one checkpoint, at the end: the saves every 4 steps of _cfg cost more than the 48 steps
    cfg = _settings(gray_folder, max_steps=48, recon_every=48, ckpt_every=48)
    assert (cfg.mean, cfg.std, cfg.model) == ((0.5,), (0.25,), {"in_chans": 1})
    run = tmp_path / "run"
    summary = train.pretrain(cfg, run, progress=False)
    assert summary["end_step"] == 48
    losses = _losses(run)
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:4])

    # The first logged loss is the initial model's loss on the first batch, normalised with
    # mean 0.5 and std 0.25, under the masks each device draws for step 0.
    n_dev = jax.local_device_count()
    imgs = _batches(gray_folder, GRAY, "float32", batch_size=n_dev, seed=cfg.seed)[0]
    model = mae_jax.MaskedAutoencoderViT(cfg.model_config(), rngs=nnx.Rngs(cfg.seed))
    graphdef, params, fixed = pretrain_step.split_model(model)
    key = jax.random.fold_in(jax.random.key(cfg.seed), 0)
    # compiled once for the 8 devices' batches (op by op it took longer than the whole run)
    loss_and_grads = jax.jit(pretrain_step.loss_and_grads, static_argnums=(0, 5))
    per_device = [
        loss_and_grads(
            graphdef,
            params,
            fixed,
            jnp.asarray(imgs[d : d + 1]),
            masking.random_noise(jax.random.fold_in(key, d), 1, cfg.model_config().num_patches),
            cfg.mask_ratio,
        )[0]
        for d in range(n_dev)
    ]
    np.testing.assert_allclose(losses[0], np.mean(per_device), rtol=2e-5)

    loaded = mae_jax.load_pretrained(run)
    assert loaded.config.in_chans == 1 and loaded.patch_embed.proj.kernel.shape[2] == 1
    figure = np.asarray(Image.open(run / "reconstructions" / "step_00000048.png"))
    assert figure.shape[-1] == 3 and (figure[..., 0] == figure[..., 2]).all()  # drawn in gray

    # resuming with other statistics is refused, naming the setting
    with pytest.raises(SettingsError, match=r"mean: \[0\.5\] -> \[0\.4\]"):
        train.pretrain(cfg.with_overrides(["mean=0.4"]), run, progress=False)


def test_three_means_for_a_one_channel_model_is_one_line_before_anything_is_built(
    gray_folder, tmp_path, capsys
):
    argv = ["pretrain", "--data", str(gray_folder), "--preset", TINY, "--quiet"]
    argv += ["--workdir", str(tmp_path / "run"), "--set", "model.in_chans=1"]
    argv += ["--set", "mean=0.4,0.5,0.6"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "mean has 3 values but std has 1" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def short_run(gray_folder, tmp_path_factory):
    """A 2-step pretraining run of a 1-channel model with mean 0.5 and std 0.25."""
    run = tmp_path_factory.mktemp("short") / "run"
    train.pretrain(_settings(gray_folder, max_steps=2), run, progress=False)
    return run


def test_reconstruct_and_export_use_the_run_s_statistics(gray_folder, short_run, tmp_path, capsys):
    run = short_run
    assert cli.main(["export", str(run), str(tmp_path / "model")]) == 0
    meta = read_metadata(tmp_path / "model")
    assert meta["normalization"] == {"mean": [0.5], "std": [0.25]}
    image = str(gray_folder / "a" / "00.png")
    for checkpoint in (run, tmp_path / "model"):
        out = tmp_path / f"{checkpoint.name}.png"
        argv = ["reconstruct", image, "--checkpoint", str(checkpoint), "--out", str(out)]
        assert cli.main(argv) == 0
        assert Image.open(out).mode == "RGB"
    # the figures are the same: both read the run's mean and std
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "run.png")), np.asarray(Image.open(tmp_path / "model.png"))
    )
    argv = ["reconstruct", image, "--checkpoint", str(run), "--out", str(tmp_path / "x.png")]
    # ... and not the grayscale defaults, which give another figure
    assert cli.main(argv + ["--mean", "0.449", "--std", "0.226"]) == 0
    assert not np.array_equal(
        np.asarray(Image.open(tmp_path / "x.png")), np.asarray(Image.open(tmp_path / "run.png"))
    )
    assert cli.main(argv + ["--mean", "0.1,0.2,0.3", "--std", "0.2,0.2,0.2"]) == 2
    err = capsys.readouterr().err
    assert "in_chans=1" in err and "3 values each" in err and err.count("\n") == 1


def test_finetune_augmentations_on_gray_are_the_rgb_ones_on_the_gray_file():
    """RandAugment, crops, flips and normalisation on a grayscale image give the RGB pipeline's
    values on the same image as RGB (equal channels; the same fill with equal channel means)."""
    from mae_jax.data import augment

    gray3 = Normalization((0.5,) * 3, (0.25,) * 3)
    yy, xx = np.mgrid[0:40, 0:48]
    img = Image.fromarray((127 + 120 * np.sin(xx / 5 + yy / 7)).astype(np.uint8), "L")
    for seed in range(60):
        one = augment.finetune_transform(img, np.random.default_rng(seed), 32, re_prob=0, norm=GRAY)
        rgb = img.convert("RGB")
        three = augment.finetune_transform(
            rgb, np.random.default_rng(seed), 32, re_prob=0, norm=gray3
        )
        assert one.shape == (32, 32, 1)
        np.testing.assert_array_equal(one, three[..., :1])
        one = augment.linprobe_transform(img, np.random.default_rng(seed), 32, norm=GRAY)
        three = augment.linprobe_transform(rgb, np.random.default_rng(seed), 32, norm=gray3)
        np.testing.assert_array_equal(one, three[..., :1])


def _two_gray_classes(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for label, name in enumerate(("dark", "light")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = rng.uniform(0, 120, (40, 40)) + 120 * label
            Image.fromarray(img.astype(np.uint8), "L").save(root / name / f"{i:02d}.png")
    return root


def test_a_one_channel_encoder_fine_tunes_and_evaluates_with_its_statistics(
    short_run, tmp_path, capsys
):
    from mae_jax import finetune

    run = short_run
    cfg = finetune.FinetuneConfig(
        preset="vit_tiny_patch4",
        data=str(_two_gray_classes(tmp_path / "train", 8, 0)),
        val=str(_two_gray_classes(tmp_path / "val", 4, 1)),
        init=str(run),
        batch_size=2,
        epochs=2,
        warmup_epochs=1,
        log_every=2,
        read_threads=2,
        worker_count=0,
    )  # RandAugment, random erasing, mixup and cutmix at the recipe's settings
    summary = finetune.finetune(cfg, tmp_path / "ft", progress=False)
    model_dir = tmp_path / "ft" / "model"
    # the statistics come from the pretraining run and travel with the classifier
    assert read_metadata(model_dir)["normalization"] == {"mean": [0.5], "std": [0.25]}
    assert mae_jax.load_pretrained(model_dir).config.in_chans == 1
    capsys.readouterr()
    assert cli.main(["eval", "--data", cfg.val, "--checkpoint", str(model_dir), "--quiet"]) == 0
    last = summary["val"][-1]
    out = capsys.readouterr().out
    assert f"Acc@1 {last['val_top1']:.3f}" in out and f"loss {last['val_loss']:.3f}" in out
