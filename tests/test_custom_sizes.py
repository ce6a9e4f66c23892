"""MAEs and classifiers of sizes no preset has: conversion with --set head counts, parity with
both references, a round trip to .pth, and pretraining with model overrides.

The custom MAE is the issue's: image 64, patch 8, width 96, depth 2, 3 heads; decoder width 64,
depth 2, 4 heads. Its weights are random, written with torch.save in the official layout.
Parity tolerance: the parity tool's defaults (every float stage within 1e-5 + 2e-6 * max |reference|
absolute, mask and ids_restore identical, loss within 1e-6 relative).
"""

import dataclasses
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mae_jax
from convert import orbax_to_pth, parity, pth_to_orbax
from mae_jax.config import MAEConfig, ViTConfig
from mae_jax.run_settings import SettingsError
from tests.test_classifier import official_pth_of
from tests.test_train import _cfg

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

FAKE_OFFICIAL = Path(__file__).parent / "fixtures" / "fake_official_mae"
CUSTOM = MAEConfig(
    img_size=64,
    patch_size=8,
    embed_dim=96,
    depth=2,
    num_heads=3,
    decoder_embed_dim=64,
    decoder_depth=2,
    decoder_num_heads=4,
)
HEAD_FLAGS = ["--set", "num_heads=3", "--set", "decoder_num_heads=4"]


def _mae_pth(path: Path, config: MAEConfig = CUSTOM, seed: int = 0) -> Path:
    return official_pth_of(mae_jax.create_model(config, rngs=nnx.Rngs(seed)), path, seed)


def _assert_parity(checkpoint, pth, **kw) -> list:
    ours, ref, _ = parity.run_parity(checkpoint, pth=pth, batch=2, seed=1, **kw)
    rows = parity.compare(ours, ref, atol=1e-5, rtol=2e-6, loss_rtol=1e-6)
    assert all(r.ok for r in rows), parity.format_table(rows, enforce=True)
    return rows


@pytest.fixture(scope="module")
def custom_pth(tmp_path_factory):
    return _mae_pth(tmp_path_factory.mktemp("custom") / "small.pth")


def test_custom_mae_without_head_counts_is_refused_in_one_line(custom_pth, tmp_path, capsys):
    out = tmp_path / "out"
    assert pth_to_orbax.main([str(custom_pth), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "small.pth" in err
    assert "img_size 64, patch_size 8, in_chans 3, embed_dim 96, depth 2, mlp_ratio 4" in err
    assert "decoder_embed_dim 64, decoder_depth 2" in err and "fit no preset" in err
    assert "--set num_heads=N --set decoder_num_heads=N" in err
    assert not out.exists()


def test_custom_mae_converts_round_trips_and_matches_both_references(
    custom_pth, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "ckpt"
    assert pth_to_orbax.main([str(custom_pth), str(out), "--quiet", *HEAD_FLAGS]) == 0
    printed = capsys.readouterr().out
    assert "custom size" in printed and "3 heads" in printed and "decoder width 64" in printed
    meta = json.loads((out / "mae_jax.json").read_text())
    assert meta["config"] == CUSTOM.replace(norm_pix_loss=meta["config"]["norm_pix_loss"]).to_dict()
    assert meta["head_counts"] == "given" and meta["preset"] is None

    back = tmp_path / "back.pth"
    assert orbax_to_pth.main([str(out), str(back)]) == 0
    original = torch.load(custom_pth, weights_only=True)["model"]
    returned = torch.load(back, weights_only=True)["model"]
    assert sorted(original) == sorted(returned)
    for k, v in original.items():
        assert torch.equal(v, returned[k]), k

    rows = _assert_parity(out, custom_pth)
    assert {"patch_embed", "enc_blocks", "latent", "dec_blocks", "pred", "loss"} <= {
        r.stage for r in rows
    }
    monkeypatch.syspath_prepend(str(FAKE_OFFICIAL / "_fake_site"))
    _assert_parity(out, None, official_repo=FAKE_OFFICIAL)  # the official class, same kwargs


@pytest.mark.parametrize("global_pool", [True, False], ids=["global-pool", "cls-token"])
def test_custom_classifier_converts_and_matches_hf(tmp_path, capsys, global_pool):
    vit = ViTConfig(
        **{k: getattr(CUSTOM, k) for k in ViTConfig().to_dict() if hasattr(CUSTOM, k)},
        num_classes=7,
        global_pool=global_pool,
    )
    pth = official_pth_of(mae_jax.create_classifier(vit, rngs=nnx.Rngs(2)), tmp_path / "c.pth", 2)
    out = tmp_path / "ckpt"
    assert pth_to_orbax.main([str(pth), str(out), "--quiet"]) == 2
    assert "--set num_heads=N" in capsys.readouterr().err
    assert pth_to_orbax.main([str(pth), str(out), "--quiet", "--set", "num_heads=3"]) == 0
    config = mae_jax.load_pretrained(out).config
    assert (config.num_heads, config.num_classes, config.global_pool) == (3, 7, global_pool)
    _assert_parity(out, pth)


def test_a_set_that_disagrees_with_the_shapes_is_refused(custom_pth, tmp_path, capsys):
    argv = [str(custom_pth), str(tmp_path / "o"), "--quiet", *HEAD_FLAGS, "--set", "depth=3"]
    assert pth_to_orbax.main(argv) == 2
    err = capsys.readouterr().err
    assert "--set depth=3 disagrees with the file, whose shapes give depth 2" in err
    argv[-1] = "num_heads=5"  # 96 is not divisible by 5
    assert pth_to_orbax.main(argv) == 2
    assert "not divisible by its 5 heads" in capsys.readouterr().err
    argv[-1] = "depth=2"  # what the shapes give: accepted, not a clash of two values
    assert pth_to_orbax.main(argv) == 0
    assert mae_jax.load_pretrained(tmp_path / "o").config.depth == 2


def test_preset_widths_with_other_heads(tmp_path, capsys, monkeypatch):
    """Tiny preset sizes but 2 and 6 heads (the preset has 4 and 3): without --set the preset's
    heads are assumed, and said; the outputs then differ, and only the right heads pass parity
    against the official code built with the file's real heads."""
    true = mae_jax.get_config("mae_vit_tiny_patch4", num_heads=2, decoder_num_heads=6)
    pth = _mae_pth(tmp_path / "heads.pth", true, seed=3)
    assumed, right = tmp_path / "assumed", tmp_path / "right"
    assert pth_to_orbax.main([str(pth), str(assumed), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "note: head counts assumed from mae_vit_tiny_patch4" in printed
    assert json.loads((assumed / "mae_jax.json").read_text())["head_counts"] == (
        "assumed from mae_vit_tiny_patch4"
    )
    flags = ["--set", "num_heads=2", "--set", "decoder_num_heads=6"]
    assert pth_to_orbax.main([str(pth), str(right), "--quiet", *flags]) == 0

    imgs = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    noise = jnp.asarray(np.random.default_rng(1).random((2, 64)), jnp.float32)
    preds = [mae_jax.load_pretrained(p)(imgs, noise=noise)[1] for p in (assumed, right)]
    assert np.abs(np.asarray(preds[0]) - np.asarray(preds[1])).max() > 1e-3

    # The user's clone registers the model with its real heads; the parity tool builds that.
    repo = tmp_path / "clone"
    shutil.copytree(FAKE_OFFICIAL, repo, ignore=shutil.ignore_patterns("_fake_site", "__pycache__"))
    with open(repo / "models_mae.py", "a") as f:
        f.write(
            "\n\ndef mae_tiny_heads2(**kwargs):\n"
            "    return MaskedAutoencoderViT(img_size=32, patch_size=4, embed_dim=64, depth=2,\n"
            "        num_heads=2, decoder_embed_dim=48, decoder_depth=2, decoder_num_heads=6,\n"
            "        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)\n"
        )
    monkeypatch.syspath_prepend(str(FAKE_OFFICIAL / "_fake_site"))
    official = dict(official_repo=repo, official_arch="mae_tiny_heads2")
    _assert_parity(right, pth, **official)
    ours, ref, _ = parity.run_parity(assumed, pth=pth, batch=2, seed=1, **official)
    rows = parity.compare(ours, ref, atol=1e-5, rtol=2e-6, loss_rtol=1e-6)
    assert not all(r.ok for r in rows)


# ------------------------------------------------------------------ training custom sizes


def _folder(root: Path, n: int = 16) -> Path:
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def _pretrain_settings(data: Path, **kw):
    """test_train's tiny pretraining run, 10 epochs, the lr from blr, a checkpoint every 2 steps."""
    return _cfg(data, **({"epochs": 10, "lr": None, "ckpt_every": 2} | kw))


def test_pretraining_a_custom_model_resumes_and_refuses_another_model(tmp_path):
    from mae_jax import train

    data = _folder(tmp_path / "imgs")
    model = {"embed_dim": 48, "num_heads": 3, "depth": 1, "decoder_num_heads": 4}
    cfg = _pretrain_settings(data, model=model, max_steps=2)
    cfg = cfg.with_overrides(["model.decoder_embed_dim=32", "model.mlp_ratio=2"])
    assert cfg.model == model | {"decoder_embed_dim": 32, "mlp_ratio": 2.0}
    train.pretrain(cfg, tmp_path / "run", progress=False)
    summary = train.pretrain(
        dataclasses.replace(cfg, max_steps=4), tmp_path / "run", progress=False
    )
    assert (summary["start_step"], summary["end_step"]) == (2, 4)
    loaded = mae_jax.load_pretrained(tmp_path / "run").config
    assert (loaded.embed_dim, loaded.num_heads, loaded.depth, loaded.mlp_ratio) == (48, 3, 1, 2.0)
    assert (loaded.decoder_embed_dim, loaded.decoder_num_heads) == (32, 4)

    wider = cfg.with_overrides(["model.embed_dim=96"])
    with pytest.raises(SettingsError, match=r"model\.embed_dim: 48 -> 96"):
        train.pretrain(wider, tmp_path / "run", progress=False)


@pytest.mark.parametrize(
    "setting, message",
    [
        ("model.num_heads=5", "encoder width 64 is not divisible by its 5 heads"),
        ("model.embed_dim=66", "encoder width 66 is not divisible by its 4 heads"),
        ("model.patch_size=5", "img_size 32 is not a multiple of patch_size 5"),
        ("model.widht=3", "model settings are:"),
    ],
)
def test_invalid_model_settings_are_one_line_errors_before_anything_is_built(
    tmp_path, capsys, setting, message
):
    from mae_jax import cli

    argv = ["pretrain", "--data", str(tmp_path), "--preset", "mae_vit_tiny_patch4"]
    argv += ["--workdir", str(tmp_path / "run"), "--quiet", "--set", setting]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()
