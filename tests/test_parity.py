"""Parity with an independent PyTorch implementation, through the whole user path.

Official-layout weights are written with torch.save, converted with convert/pth_to_orbax.py and
compared by convert/parity.py with transformers' ViTMAEForPreTraining (eager attention) on the
same images and masking noise. Tolerances (the issue's): every float stage within 1e-5 max abs
error, mask and ids_restore identical, loss within 1e-6 relative. JAX runs at highest precision.
"""

from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import mae_jax
from convert import parity
from convert.mapping import official_from_state
from convert.pth_to_orbax import convert_pth
from mae_jax.checkpoint import state_as_numpy

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

GOLDEN = Path(__file__).parent / "golden"
FAKE_OFFICIAL = Path(__file__).parent / "fixtures" / "fake_official_mae"


def _official_pth(preset: str, path: Path, seed: int) -> Path:
    """Random weights of ``preset`` saved as {'model': state_dict} with torch.save, like the
    released files. Biases and LayerNorm weights are perturbed so a mapping mistake cannot hide."""
    model = mae_jax.create_model(preset, rngs=nnx.Rngs(seed))
    sd = official_from_state(state_as_numpy(model))
    rng = np.random.default_rng(seed)
    for k, v in sd.items():
        if k.endswith("bias") or ".norm" in k or k.startswith(("norm.", "decoder_norm.")):
            sd[k] = (v + rng.normal(0, 0.02, v.shape)).astype(np.float32)
    torch.save({"model": {k: torch.tensor(v) for k, v in sd.items()}}, path)
    return path


def _assert_parity(checkpoint, pth, **kw):
    ours, ref, info = parity.run_parity(checkpoint, pth=pth, **kw)
    rows = parity.compare(ours, ref, atol=1e-5, loss_rtol=1e-6)
    stages = {r.stage for r in rows}
    assert {"patch_embed", "latent", "mask", "ids_restore", "pred", "loss"} <= stages
    bad = [(r.stage, r.max_abs, r.max_rel) for r in rows if not r.ok]
    assert not bad, parity.format_table(rows, enforce=True)
    return rows


@pytest.fixture(scope="module")
def base_pth(tmp_path_factory):
    return _official_pth(
        "mae_vit_base_patch16", tmp_path_factory.mktemp("base") / "mae_base.pth", 0
    )


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pixels", "norm_pix"])
def test_mae_vit_base_parity_with_hf(base_pth, tmp_path, norm_pix):
    out, _ = convert_pth(base_pth, tmp_path / "ckpt", norm_pix_loss=norm_pix)
    rows = _assert_parity(out, base_pth, batch=2, mask_ratio=0.75, seed=1)
    assert rows[0].shape == (2, 196, 768)


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pixels", "norm_pix"])
@pytest.mark.parametrize("ratio", [0.75, 0.9])
def test_tiny_parity_with_hf(tmp_path, norm_pix, ratio):
    out, _ = convert_pth(GOLDEN / "tiny_shared.pth", tmp_path / "ckpt", norm_pix_loss=norm_pix)
    _assert_parity(out, GOLDEN / "tiny_shared.pth", batch=3, mask_ratio=ratio, seed=4)


def test_cli_prints_every_stage_and_exits_zero(tmp_path, capsys):
    out, _ = convert_pth(GOLDEN / "tiny_shared.pth", tmp_path / "ckpt")
    assert parity.main([str(out), "--pth", str(GOLDEN / "tiny_shared.pth")]) == 0
    text = capsys.readouterr().out
    for what in (
        "patch embedding",
        "encoder output",
        "mask",
        "ids_restore",
        "decoder prediction",
        "loss",
    ):
        assert what in text
    assert "devices:   jax cpu" in text and "all stages within tolerance" in text


def test_cli_fails_on_a_wrong_weight(tmp_path, capsys):
    """A checkpoint whose weights differ from the .pth must be caught, stage by stage."""
    sd = torch.load(GOLDEN / "tiny_shared.pth", weights_only=True)["model"]
    sd["blocks.1.mlp.fc2.bias"][5] += 1e-3  # one channel: a uniform shift would vanish in the norm
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": sd}, wrong)
    out, _ = convert_pth(wrong, tmp_path / "ckpt")
    assert parity.main([str(out), "--pth", str(GOLDEN / "tiny_shared.pth")]) == 1
    captured = capsys.readouterr()
    assert "OVER" in captured.out and "encoder output" in captured.err
    assert (
        "patch embedding      (2, 64, 64)              0.00e+00" in captured.out
    )  # early stages still agree


def test_cli_with_an_official_clone(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(FAKE_OFFICIAL / "_fake_site"))  # the stand-in's "modern timm"
    out, _ = convert_pth(GOLDEN / "tiny_shared.pth", tmp_path / "ckpt")
    assert parity.main([str(out), "--official-repo", str(FAKE_OFFICIAL)]) == 0
    assert "official code at" in capsys.readouterr().out


def test_cli_bfloat16_reports_without_failing(tmp_path, capsys):
    out, _ = convert_pth(GOLDEN / "tiny_shared.pth", tmp_path / "ckpt")
    assert parity.main([str(out), "--dtype", "bfloat16"]) == 0
    text = capsys.readouterr().out
    assert "(reported)" in text and "jax dtype bfloat16 vs float32 reference" in text
    pred = [line for line in text.splitlines() if line.startswith("decoder prediction")][0]
    assert 1e-4 < float(pred.split()[-4]) < 0.5  # bf16 rounding is visible but bounded


def test_encoder_only_checkpoint_parity(tmp_path, capsys):
    out, _ = convert_pth(GOLDEN / "tiny_shared_encoder_only.pth", tmp_path / "ckpt")
    assert parity.main([str(out), "--pth", str(GOLDEN / "tiny_shared_encoder_only.pth")]) == 0
    text = capsys.readouterr().out
    assert "encoder output" in text and "decoder prediction" not in text


def test_cli_bad_input(tmp_path, capsys):
    assert parity.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope" in err and err.count("\n") == 1
