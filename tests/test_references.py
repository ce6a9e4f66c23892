"""The PyTorch references (HF ViTMAE, and the official-repo runner on a stand-in repo) vs goldens."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from convert.hf_reference import (
    ENCODER_STAGES,
    STAGES,
    ReferenceInputError,
    StateDictMismatchError,
    exact_float32,
    hf_classifier_forward,
    hf_encoder_forward,
    hf_mae_forward,
)
from convert.official_reference import (
    OfficialRepoError,
    official_mae_forward,
    official_model_kwargs,
)
from mae_jax.config import get_config

GOLDEN = Path(__file__).parent / "golden"
FAKE_REPO = Path(__file__).parent / "fixtures" / "fake_official_mae"
TINY = get_config("mae_vit_tiny_patch4")
CASES = [(ratio, norm_pix) for ratio in ("0.75", "0.9") for norm_pix in (0, 1)]
CLASSIFIER = dict(embed_dim=64, depth=2, num_heads=4, patch_size=4, img_size=32)
# torch on this machine against the goldens, which torch wrote on another CPU. Its float32 kernels
# round differently on another x86 ISA: 0.0 on the AMD EPYC (AVX2) that wrote them, up to 2.2e-6
# on an Intel Xeon (AVX-512) in every stage after the first block. Comparisons of two references
# on the same machine keep 1e-6 (SAME_MACHINE_ATOL).
TORCH_VS_GOLDEN_ATOL = 3e-6
SAME_MACHINE_ATOL = 1e-6


def _load_pth(name: str) -> dict[str, np.ndarray]:
    model = torch.load(GOLDEN / name, map_location="cpu", weights_only=True)["model"]
    return {k: v.numpy() for k, v in model.items()}


@pytest.fixture(scope="module")
def tiny_weights() -> dict[str, np.ndarray]:
    return _load_pth("tiny_shared.pth")


def _golden(ratio: str, norm_pix: int):
    return np.load(GOLDEN / f"tiny_shared__r{ratio}__np{norm_pix}.npz")


def _golden_stage(golden, stage: str) -> np.ndarray:
    return golden[f"stage_{stage}"] if f"stage_{stage}" in golden.files else golden[stage]


def _assert_matches_golden(out: dict, golden, stages, atol: float) -> dict[str, float]:
    errors = {}
    for stage in stages:
        want = _golden_stage(golden, stage)
        got = out[stage]
        assert got.shape == want.shape, (stage, got.shape, want.shape)
        assert got.dtype == want.dtype, (stage, got.dtype, want.dtype)
        if stage in ("mask", "ids_restore"):
            np.testing.assert_array_equal(got, want, err_msg=stage)
        errors[stage] = float(np.max(np.abs(got.astype(np.float64) - want)))
    bad = {stage: err for stage, err in errors.items() if err > atol}
    assert not bad, f"stages beyond {atol}: {bad}"
    return errors


# ----------------------------------------------------------------------------------------------
# Hugging Face ViTMAE


@pytest.mark.parametrize("ratio,norm_pix", CASES)
def test_hf_mae_forward_reproduces_every_golden_stage(tiny_weights, ratio, norm_pix):
    golden = _golden(ratio, norm_pix)
    out = hf_mae_forward(
        tiny_weights,
        TINY,
        golden["x"],
        golden["noise"],
        mask_ratio=float(ratio),
        norm_pix_loss=bool(norm_pix),
    )
    assert tuple(out) == STAGES
    # Eager attention computes in timm 0.3.2's order: measured 0.0 on every stage.
    _assert_matches_golden(out, golden, STAGES, atol=TORCH_VS_GOLDEN_ATOL)
    assert out["x_masked"].shape[1] == int(golden["len_keep"])


def test_hf_encoder_forward_on_encoder_only_checkpoint():
    golden = _golden("0.75", 0)
    weights = _load_pth("tiny_shared_encoder_only.pth")
    assert not any(k.startswith("decoder_") or k == "mask_token" for k in weights)
    out = hf_encoder_forward(weights, TINY, golden["x"], golden["noise"], mask_ratio=0.75)
    assert tuple(out) == ENCODER_STAGES
    _assert_matches_golden(out, golden, ENCODER_STAGES, atol=TORCH_VS_GOLDEN_ATOL)


def test_hf_classifier_forward_matches_global_pool_golden():
    golden = np.load(GOLDEN / "vit_tiny_shared_gp.npz")
    assert bool(golden["global_pool"])
    weights = _load_pth("vit_tiny_shared_gp.pth")
    out = hf_classifier_forward(weights, golden["x"], global_pool=True, **CLASSIFIER)
    errors = _assert_matches_golden(
        out,
        golden,
        ("patch_embed", "enc_in", "enc_blocks", "features", "logits"),
        atol=TORCH_VS_GOLDEN_ATOL,
    )
    assert out["logits"].shape == (2, 5)
    assert set(errors) == {"patch_embed", "enc_in", "enc_blocks", "features", "logits"}


def test_hf_classifier_cls_token_variant_uses_norm_of_cls():
    """global_pool=False: features = norm(last block output)[:, 0], checked by hand."""
    golden = np.load(GOLDEN / "vit_tiny_shared_gp.npz")
    weights = _load_pth("vit_tiny_shared_gp.pth")
    weights["norm.weight"] = weights.pop("fc_norm.weight")
    weights["norm.bias"] = weights.pop("fc_norm.bias")
    out = hf_classifier_forward(weights, golden["x"], global_pool=False, **CLASSIFIER)
    np.testing.assert_allclose(
        out["enc_blocks"], golden["stage_enc_blocks"], rtol=0, atol=TORCH_VS_GOLDEN_ATOL
    )
    cls_out = torch.from_numpy(out["enc_blocks"][-1][:, 0])
    want = torch.nn.functional.layer_norm(
        cls_out, (64,), torch.from_numpy(weights["norm.weight"]),
        torch.from_numpy(weights["norm.bias"]), eps=1e-6,
    ).numpy()  # fmt: skip
    np.testing.assert_allclose(out["features"], want, atol=1e-6, rtol=0)
    logits = want @ weights["head.weight"].T + weights["head.bias"]
    np.testing.assert_allclose(out["logits"], logits, atol=1e-5, rtol=0)


def _broken(weights: dict, how: str) -> tuple[dict, str]:
    weights = dict(weights)
    if how == "missing":
        del weights["blocks.1.mlp.fc2.bias"]
        return weights, "- missing: blocks.1.mlp.fc2.bias"
    if how == "extra":
        weights["blocks.2.norm1.weight"] = np.ones(64, np.float32)
        return weights, "+ unexpected: blocks.2.norm1.weight"
    weights["decoder_blocks.0.attn.qkv.weight"] = np.zeros((144, 64), np.float32)
    return weights, "decoder_blocks.0.attn.qkv.weight (144, 64) != (144, 48)"


@pytest.mark.parametrize("how", ["missing", "extra", "shape"])
def test_hf_mae_forward_rejects_broken_state_dict(tiny_weights, how):
    golden = _golden("0.75", 0)
    weights, expected = _broken(tiny_weights, how)
    with pytest.raises(StateDictMismatchError) as info:
        hf_mae_forward(
            weights, TINY, golden["x"], golden["noise"], mask_ratio=0.75, norm_pix_loss=False
        )
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_hf_errors_name_the_problem(tiny_weights):
    golden = _golden("0.75", 0)
    encoder_only = _load_pth("tiny_shared_encoder_only.pth")
    with pytest.raises(StateDictMismatchError, match="encoder-only.*hf_encoder_forward"):
        hf_mae_forward(
            encoder_only, TINY, golden["x"], golden["noise"], mask_ratio=0.75, norm_pix_loss=False
        )
    # A full MAE checkpoint into the encoder: every decoder key is unexpected.
    with pytest.raises(StateDictMismatchError, match=r"\+ unexpected: decoder_blocks\.0\."):
        hf_encoder_forward(tiny_weights, TINY, golden["x"], golden["noise"], mask_ratio=0.75)
    with pytest.raises(ReferenceInputError, match=r"noise has shape \(2, 63\)"):
        hf_encoder_forward(
            encoder_only, TINY, golden["x"], golden["noise"][:, :63], mask_ratio=0.75
        )
    with pytest.raises(ReferenceInputError, match=r"images have shape \(2, 32, 32, 3\)"):
        hf_encoder_forward(encoder_only, TINY, golden["x_nhwc"], golden["noise"], mask_ratio=0.75)
    classifier = _load_pth("vit_tiny_shared_gp.pth")
    with pytest.raises(StateDictMismatchError, match="missing: norm.bias, norm.weight"):
        hf_classifier_forward(classifier, golden["x"], global_pool=False, **CLASSIFIER)


def test_exact_float32_turns_tf32_off_on_cuda_and_restores_it():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32)
    try:
        matmul.allow_tf32, cudnn.allow_tf32 = True, True
        with exact_float32("cuda:0"):
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, False)
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (True, True)
        with exact_float32("cpu"):
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (True, True)
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


# ----------------------------------------------------------------------------------------------
# The official-repo runner, on a stand-in repository and a stand-in timm


@pytest.fixture
def fake_timm(monkeypatch):
    """`import timm` finds the stand-in (a modern-timm Block that rejects qk_scale)."""
    monkeypatch.syspath_prepend(str(FAKE_REPO / "_fake_site"))
    yield
    for name in [n for n in sys.modules if n == "timm" or n.startswith("timm.")]:
        del sys.modules[name]


def _run_official(weights, golden, repo: Path = FAKE_REPO):
    return official_mae_forward(
        repo,
        "MaskedAutoencoderViT",
        weights,
        golden["x"],
        golden["noise"],
        mask_ratio=float(golden["mask_ratio"]),
        norm_pix_loss=bool(golden["norm_pix_loss"]),
        model_kwargs=official_model_kwargs(TINY),
    )


@pytest.mark.parametrize("ratio,norm_pix", CASES)
def test_official_runner_on_stand_in_repo_reproduces_goldens(
    tiny_weights, fake_timm, monkeypatch, tmp_path, ratio, norm_pix
):
    from timm.models.vision_transformer import Block

    # A private copy of the stand-in repo, so that "no bytecode written into it" can be checked.
    repo = tmp_path / "mae"
    shutil.copytree(FAKE_REPO, repo, ignore=shutil.ignore_patterns("_fake_site", "__pycache__"))
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    rand_before = torch.rand
    path_before = list(sys.path)
    other_util = types.ModuleType("util")  # a user's own `util` must survive the call
    monkeypatch.setitem(sys.modules, "util", other_util)
    assert not hasattr(np, "float")

    golden = _golden(ratio, norm_pix)
    out = _run_official(tiny_weights, golden, repo)

    assert tuple(out) == STAGES
    _assert_matches_golden(out, golden, STAGES, atol=TORCH_VS_GOLDEN_ATOL)
    # On the same machine the stand-in's explicit attention matches HF's eager attention (both in
    # timm 0.3.2's order); a runner that left timm's fused SDPA path on would be off by about
    # 2.4e-6, so 1e-6 here checks that switch.
    hf = hf_mae_forward(
        tiny_weights, TINY, golden["x"], golden["noise"],
        mask_ratio=float(ratio), norm_pix_loss=bool(norm_pix),
    )  # fmt: skip
    apart = {k: float(np.max(np.abs(out[k].astype(np.float64) - hf[k]))) for k in STAGES}
    assert max(apart.values()) <= SAME_MACHINE_ATOL, apart

    # Nothing stays patched or imported.
    assert not hasattr(np, "float")
    assert torch.rand is rand_before
    assert sys.path == path_before
    assert sys.modules["util"] is other_util
    assert "models_mae" not in sys.modules and "util.pos_embed" not in sys.modules
    with pytest.raises(TypeError, match="qk_scale"):
        Block(8, 2, qk_scale=None)
    assert not list(repo.rglob("__pycache__")), "bytecode written into the repo"
    assert sys.dont_write_bytecode is False


def test_official_runner_reports_bad_repo_arch_and_weights(tiny_weights, fake_timm, tmp_path):
    golden = _golden("0.75", 0)
    with pytest.raises(OfficialRepoError, match="no models_mae.py"):
        official_mae_forward(
            tmp_path, "mae_vit_base_patch16", tiny_weights, golden["x"], golden["noise"],
            mask_ratio=0.75, norm_pix_loss=False,
        )  # fmt: skip
    with pytest.raises(OfficialRepoError, match="no model 'mae_vit_tiny'.*mae_vit_base_patch16"):
        official_mae_forward(
            FAKE_REPO, "mae_vit_tiny", tiny_weights, golden["x"], golden["noise"],
            mask_ratio=0.75, norm_pix_loss=False,
        )  # fmt: skip
    weights, expected = _broken(tiny_weights, "missing")
    with pytest.raises(StateDictMismatchError, match=expected.replace(".", r"\.")):
        _run_official(weights, golden)
    assert not hasattr(np, "float") and "models_mae" not in sys.modules


def test_official_runner_without_timm(tiny_weights, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    golden = _golden("0.75", 0)
    with pytest.raises(OfficialRepoError, match="timm is not importable"):
        _run_official(tiny_weights, golden)
