"""The fine-tuned ViT classifier: golden stages, conversion, parity with HF, position-table
interpolation, starting from an MAE, drop path, and ``mae-jax eval``."""

import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import mae_jax
from convert import orbax_to_pth, parity
from convert.mapping import official_from_state
from convert.pth_to_orbax import ConversionError, convert_pth
from mae_jax import cli, data
from mae_jax.checkpoint import save_model, state_as_numpy
from mae_jax.classifier import (
    EncoderMismatchError,
    _block_forward,
    classification_counts,
    drop_path,
    eval_slice_size,
    in_slices,
    init_classifier_from_mae,
    interpolate_pos_embed,
)
from mae_jax.evaluate import evaluate

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
F = torch.nn.functional

ROOT = Path(__file__).parent.parent
GOLDEN = Path(__file__).parent / "golden"


def _official_classifier_pth(path: Path, preset: str, seed: int, **overrides) -> Path:
    """Random classifier weights in the official layout, saved with torch.save."""
    model = mae_jax.create_classifier(preset, rngs=nnx.Rngs(seed), **overrides)
    return official_pth_of(model, path, seed)


def official_pth_of(model, path: Path, seed: int) -> Path:
    """``model``'s weights as {'model': state_dict} via torch.save. Biases, norms, the head and
    the (learned) position table are perturbed so that no mapping mistake can hide."""
    sd = official_from_state(state_as_numpy(model))
    rng = np.random.default_rng(seed)
    for k, v in sd.items():
        if k.endswith("bias") or "norm" in k or k.startswith(("head.", "pos_embed")):
            sd[k] = (v + rng.normal(0, 0.05, v.shape)).astype(np.float32)
    torch.save({"model": {k: torch.tensor(v) for k, v in sd.items()}}, path)
    return path


def _assert_parity_with_hf(checkpoint: Path, pth: Path, batch: int) -> dict:
    """Every stage within the parity tool's default bound (1e-5 + 2e-6 * max |reference|: ViT-B's
    block outputs reach ~10, where float32 rounding alone is ~1e-6), features and logits within
    1e-5 absolute."""
    ours, ref, _ = parity.run_parity(checkpoint, pth=pth, batch=batch, seed=3)
    rows = parity.compare(ours, ref, atol=1e-5, rtol=2e-6, loss_rtol=1e-6)
    assert {r.stage for r in rows} == {"patch_embed", "enc_blocks", "features", "logits"}
    assert all(r.ok for r in rows), parity.format_table(rows, enforce=True)
    errors = {r.stage: r.max_abs for r in rows}
    assert errors["features"] < 1e-5 and errors["logits"] < 1e-5, errors
    return errors


# ------------------------------------------------------------------ golden and parity


def test_golden_classifier_every_stage_through_the_converter(tmp_path):
    out, meta = convert_pth(GOLDEN / "vit_tiny_shared_gp.pth", tmp_path / "c")
    assert meta["preset"] == "vit_tiny_patch4" and meta["ignored_keys"] == []
    model = mae_jax.load_pretrained(out)
    assert isinstance(model, mae_jax.VisionTransformer)
    g = np.load(GOLDEN / "vit_tiny_shared_gp.npz")
    stages = model.forward_stages(jnp.asarray(g["x_nhwc"]))
    for name in ("patch_embed", "enc_in", "enc_blocks"):
        np.testing.assert_allclose(stages[name], g[f"stage_{name}"], rtol=0, atol=1e-5)
    for i in range(model.config.depth):  # block-major, one block at a time
        np.testing.assert_allclose(
            stages["enc_blocks"][i], g["stage_enc_blocks"][i], rtol=0, atol=1e-5
        )
    np.testing.assert_allclose(stages["features"], g["features"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(stages["logits"], g["logits"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(model(jnp.asarray(g["x_nhwc"])), g["logits"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(model.features(jnp.asarray(g["x_nhwc"])), g["features"], atol=1e-5)


def test_vit_base_classifier_matches_hf(tmp_path):
    pth = _official_classifier_pth(tmp_path / "ft.pth", "vit_base_patch16", 0, num_classes=10)
    out, meta = convert_pth(pth, tmp_path / "ckpt", arch="vit_base_patch16")
    assert meta["preset"] == "vit_base_patch16"
    config = mae_jax.load_pretrained(out).config
    assert (config.num_classes, config.global_pool, config.img_size) == (10, True, 224)
    _assert_parity_with_hf(out, pth, batch=2)


def test_cls_token_classifier_matches_hf(tmp_path):
    pth = _official_classifier_pth(tmp_path / "cls.pth", "vit_tiny_patch4", 1, global_pool=False)
    keys = set(torch.load(pth, weights_only=True)["model"])
    assert {"norm.weight", "norm.bias"} <= keys and not any(k.startswith("fc_norm") for k in keys)
    out, _ = convert_pth(pth, tmp_path / "ckpt")
    assert mae_jax.load_pretrained(out).config.global_pool is False
    _assert_parity_with_hf(out, pth, batch=3)


def test_parity_cli_reports_classifier_rows(tmp_path, capsys):
    out, _ = convert_pth(GOLDEN / "vit_tiny_shared_gp.pth", tmp_path / "c")
    assert parity.main([str(out), "--pth", str(GOLDEN / "vit_tiny_shared_gp.pth")]) == 0
    text = capsys.readouterr().out
    for row in ("encoder blocks", "features", "logits", "global pool + fc_norm, 5 classes"):
        assert row in text
    assert "decoder" not in text and "all stages within tolerance" in text


# ------------------------------------------------------------------ conversion


@pytest.mark.parametrize("global_pool", [True, False], ids=["global_pool", "cls_token"])
def test_round_trip_is_bit_identical(tmp_path, global_pool):
    src = GOLDEN / "vit_tiny_shared_gp.pth"
    if not global_pool:
        src = _official_classifier_pth(
            tmp_path / "cls.pth", "vit_tiny_patch4", 2, global_pool=False
        )
    out, _ = convert_pth(src, tmp_path / "c")
    orbax_to_pth.export_pth(out, tmp_path / "back.pth")
    a = torch.load(src, weights_only=True)["model"]
    b = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    assert list(a) == list(b)  # the official key order, fc_norm after the head
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_image_size_and_classes_are_read_from_the_file(tmp_path):
    pth = _official_classifier_pth(
        tmp_path / "s.pth", "vit_tiny_patch4", 3, img_size=48, num_classes=7
    )
    out, meta = convert_pth(pth, tmp_path / "c")
    config = mae_jax.load_pretrained(out).config
    assert meta["preset"] == "vit_tiny_patch4"
    assert (config.img_size, config.grid_size, config.num_classes) == (48, 12, 7)


def _cli(*args):
    p = subprocess.run(
        [sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize(
    "arch, expect",
    [
        ("vit_large_patch16", "--arch vit_large_patch16 does not fit the file: patch_size 4 in"),
        ("mae_vit_tiny_patch4", "unknown --arch 'mae_vit_tiny_patch4' for a classifier"),
    ],
)
def test_wrong_arch_is_refused(tmp_path, arch, expect):
    code, _, err = _cli(
        "convert/pth_to_orbax.py",
        GOLDEN / "vit_tiny_shared_gp.pth",
        tmp_path / "c",
        "--arch",
        arch,
        "--quiet",
    )
    assert code == 2 and expect in err and err.count("\n") == 1
    assert not (tmp_path / "c").exists()


def test_ambiguous_pooling_and_norm_pix_flags_are_refused(tmp_path):
    sd = torch.load(GOLDEN / "vit_tiny_shared_gp.pth", weights_only=True)["model"]
    both = dict(sd, **{"norm.weight": sd["fc_norm.weight"], "norm.bias": sd["fc_norm.bias"]})
    torch.save({"model": both}, tmp_path / "both.pth")
    with pytest.raises(ConversionError, match="both fc_norm.weight and norm.weight"):
        convert_pth(tmp_path / "both.pth", tmp_path / "c")
    with pytest.raises(ConversionError, match="apply to MAE checkpoints only"):
        convert_pth(GOLDEN / "vit_tiny_shared_gp.pth", tmp_path / "c", norm_pix_loss=True)


# ------------------------------------------------------------------ position tables


@pytest.mark.parametrize("old, new", [(14, 16), (14, 24), (16, 14)])
def test_interpolate_pos_embed_matches_torch_bicubic(old, new):
    rng = np.random.default_rng(old * 100 + new)
    table = rng.standard_normal((1, 1 + old * old, 64)).astype(np.float32)
    ours = np.asarray(interpolate_pos_embed(table, new))
    grid = torch.from_numpy(table[:, 1:]).reshape(1, old, old, 64).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(1, new * new, 64).numpy()
    assert ours.shape == (1, 1 + new * new, 64)
    np.testing.assert_array_equal(ours[:, :1], table[:, :1])  # the cls row is kept
    assert np.abs(ours[:, 1:] - ref).max() < 3e-6
    np.testing.assert_array_equal(np.asarray(interpolate_pos_embed(table, old)), table)


def test_interpolate_pos_embed_refuses_non_square_tables():
    with pytest.raises(ValueError, match="not a square grid"):
        interpolate_pos_embed(np.zeros((1, 1 + 15, 8), np.float32), 4)


# ------------------------------------------------------------------ from a pretrained MAE


@pytest.fixture(scope="module")
def tiny_mae(tmp_path_factory):
    out, _ = convert_pth(GOLDEN / "tiny_shared.pth", tmp_path_factory.mktemp("mae") / "c")
    return mae_jax.load_pretrained(out)


def _eq(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_init_from_mae_copies_the_encoder_exactly(tiny_mae):
    config = mae_jax.get_vit_config("vit_tiny_patch4", num_classes=3)
    clf = init_classifier_from_mae(tiny_mae, config, rngs=nnx.Rngs(5))
    mae_state, clf_state = state_as_numpy(tiny_mae), state_as_numpy(clf)
    for name in ("cls_token", "pos_embed", "patch_embed", "blocks"):
        _eq(clf_state[name], mae_state[name])
    assert isinstance(clf.pos_embed, nnx.Param)  # learned during fine-tuning
    _eq(clf_state["fc_norm"], {"scale": np.ones(64, np.float32), "bias": np.zeros(64, np.float32)})
    assert "norm" not in clf_state  # the encoder's final norm is unused with global pooling
    head = clf_state["head"]
    assert head["kernel"].shape == (64, 3) and not head["bias"].any()
    assert 1.5e-5 < head["kernel"].std() < 2.5e-5  # fine-tuning head: std 2e-5


def test_cls_token_classifier_from_mae_sees_the_encoder_output(tiny_mae):
    """With cls pooling, the features are the MAE encoder's normed cls token, computed without
    masking by the MAE's own ``encode``."""
    config = mae_jax.get_vit_config("vit_tiny_patch4", global_pool=False)
    clf = init_classifier_from_mae(tiny_mae, config)
    _eq(state_as_numpy(clf)["norm"], state_as_numpy(tiny_mae)["norm"])
    imgs = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    np.testing.assert_allclose(clf.features(imgs), tiny_mae.encode(imgs)[:, 0], atol=1e-6)


def test_init_from_an_encoder_only_checkpoint_at_a_new_resolution(tmp_path):
    out, _ = convert_pth(GOLDEN / "tiny_shared_encoder_only.pth", tmp_path / "c")
    encoder = mae_jax.load_pretrained(out)
    config = mae_jax.get_vit_config("vit_tiny_patch4", img_size=48)
    clf = init_classifier_from_mae(encoder, config)
    table = np.asarray(encoder.pos_embed[...])  # 8 x 8 grid
    grid = torch.from_numpy(table[:, 1:]).reshape(1, 8, 8, 64).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(12, 12), mode="bicubic", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(1, 144, 64).numpy()
    got = np.asarray(clf.pos_embed[...])
    np.testing.assert_array_equal(got[:, :1], table[:, :1])
    assert np.abs(got[:, 1:] - ref).max() < 3e-6
    assert clf(jnp.zeros((1, 48, 48, 3))).shape == (1, 5)


def test_init_from_mae_is_strict(tiny_mae):
    with pytest.raises(EncoderMismatchError, match="2 blocks, the classifier 3"):
        init_classifier_from_mae(tiny_mae, mae_jax.get_vit_config("vit_tiny_patch4", depth=3))
    with pytest.raises(EncoderMismatchError, match="4 heads, the classifier 2"):
        init_classifier_from_mae(tiny_mae, mae_jax.get_vit_config("vit_tiny_patch4", num_heads=2))
    wide = mae_jax.get_vit_config("vit_tiny_patch4", embed_dim=32)
    with pytest.raises(EncoderMismatchError, match=r"cls_token: shape \(1, 1, 64\) in the enc"):
        init_classifier_from_mae(tiny_mae, wide)
    state = state_as_numpy(tiny_mae)
    state["blocks"][0]["mlp"]["fc1"]["kernel"] = np.zeros((64, 128), np.float32)
    with pytest.raises(EncoderMismatchError, match=r"blocks\[0\]\['mlp'\]\['fc1'\]\['kernel'\]"):
        init_classifier_from_mae(state, mae_jax.get_vit_config("vit_tiny_patch4"))
    del state["norm"]
    with pytest.raises(EncoderMismatchError, match="no norm"):
        init_classifier_from_mae(
            state, mae_jax.get_vit_config("vit_tiny_patch4", global_pool=False)
        )


# ------------------------------------------------------------------ drop path


def test_drop_path_zeroes_whole_samples_and_keeps_the_expectation():
    x = jnp.ones((4000, 3, 5))
    y = np.asarray(drop_path(x, 0.3, jax.random.key(1)))
    per_sample = y.reshape(4000, -1)
    dropped = (per_sample == 0).all(axis=1)
    kept = np.isclose(per_sample, 1 / 0.7, rtol=0, atol=1e-6).all(axis=1)
    assert (dropped | kept).all()  # each sample's branch is dropped or scaled as a whole
    assert abs(dropped.mean() - 0.3) < 0.03
    assert abs(y.mean() - 1.0) < 0.05


def test_drop_path_in_a_block_drops_residual_branches_per_sample():
    model = mae_jax.create_classifier("vit_tiny_patch4", rngs=nnx.Rngs(0))
    block, rate = model.blocks[1], 0.5
    x = jax.random.normal(jax.random.key(2), (64, 65, 64))
    y = np.asarray(_block_forward(block, x, rate, jax.random.key(3)))
    # The four outcomes of (attention branch kept?, MLP branch kept?), computed by hand.
    outcomes = {}
    for attn_kept in (False, True):
        h = x + block.attn(block.norm1(x)) / (1 - rate) if attn_kept else x
        for mlp_kept in (False, True):
            outcomes[attn_kept, mlp_kept] = np.asarray(
                h + block.mlp(block.norm2(h)) / (1 - rate) if mlp_kept else h
            )
    seen = set()
    for i in range(64):
        match = [k for k, o in outcomes.items() if np.allclose(y[i], o[i], rtol=0, atol=1e-5)]
        assert len(match) == 1, i
        seen.add(match[0])
    assert seen == set(outcomes)


def test_drop_path_only_in_training():
    model = mae_jax.create_classifier(
        "vit_tiny_patch4", rngs=nnx.Rngs(0), drop_path_rate=0.5, depth=4
    )
    assert model.drop_path_rates() == pytest.approx([0.0, 1 / 6, 1 / 3, 0.5])
    imgs = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
    evaluation = np.asarray(model.features(imgs))
    np.testing.assert_array_equal(model.forward_features(imgs, key=jax.random.key(1)), evaluation)
    np.testing.assert_array_equal(model(imgs, key=jax.random.key(1)), model(imgs))

    def trained(seed):
        return np.asarray(model.forward_features(imgs, train=True, key=jax.random.key(seed)))

    a, b, c = trained(1), trained(1), trained(2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - evaluation).max() > 1e-2 and np.abs(a - c).max() > 1e-2
    with pytest.raises(ValueError, match="needs key="):
        model(imgs, train=True)
    no_drop = mae_jax.create_classifier("vit_tiny_patch4", rngs=nnx.Rngs(0), drop_path_rate=0.0)
    np.testing.assert_array_equal(no_drop(imgs, train=True), no_drop(imgs))


# ------------------------------------------------------------------ mae-jax eval


def _image_folder(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            h, w = rng.integers(36, 60, size=2)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def tiny_classifier(tmp_path):
    model = mae_jax.create_classifier("vit_tiny_patch4", rngs=nnx.Rngs(7), num_classes=2)
    # A head with weights large enough for the predictions to differ between images.
    model.head.kernel[...] = jax.random.normal(jax.random.key(8), (64, 2))
    return model, save_model(model, tmp_path / "clf")


def _run_cli(capsys, *argv):
    code = cli.main([*map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_reports_accuracy_and_loss_computed_independently(tmp_path, capsys, tiny_classifier):
    model, ckpt = tiny_classifier
    folder = _image_folder(tmp_path / "val", {"cat": 4, "dog": 3})
    code, out, err = _run_cli(
        capsys, "eval", "--data", folder, "--checkpoint", ckpt, "--batch-size", "3", "--quiet"
    )
    assert code == 0, err
    # Independent: the transform image by image, the model in eager mode, numpy metrics.
    images = ImageFolderImages(folder)
    logits = np.asarray(model(jnp.asarray(images.pixels)), np.float64)
    top1 = 100 * np.mean(logits.argmax(1) == images.labels)
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    loss = -log_probs[np.arange(len(images.labels)), images.labels].mean()
    m = re.search(r"\* Acc@1 ([\d.]+) Acc@2 ([\d.]+) loss ([\d.]+) \(7 images\)", out)
    assert m, out
    assert float(m.group(1)) == pytest.approx(top1, abs=1e-3)
    assert float(m.group(2)) == 100.0  # top-2 of two classes
    assert float(m.group(3)) == pytest.approx(loss, abs=1e-3)


@pytest.mark.parametrize("size", [1, 3, 7, 10])
def test_sliced_eval_forward_equals_the_whole_batch(tiny_classifier, size):
    model, _ = tiny_classifier
    images = jax.random.normal(jax.random.key(0), (7, 32, 32, 3))
    whole = model(images)
    sliced = jax.jit(lambda x: in_slices(model, x, size))(images)  # 7 = 2 slices of 3 + 1 left
    assert sliced.shape == whole.shape
    # Rounding only (the logits reach ~30 here): 1e-6 of the largest logit.
    np.testing.assert_allclose(sliced, whole, rtol=0, atol=1e-6 * float(jnp.abs(whole).max()))


def test_eval_slice_size_on_cpu():
    base = mae_jax.get_vit_config("vit_base_patch16")  # 197 tokens: 8 images of ~1,600 tokens
    tiny = mae_jax.get_vit_config("vit_tiny_patch4")  # 65 tokens: 24 images
    assert jax.default_backend() == "cpu"
    assert [eval_slice_size(base, n) for n in (1, 8, 32, 256)] == [1, 8, 8, 8]
    assert [eval_slice_size(tiny, n) for n in (3, 64)] == [3, 24]


class ImageFolderImages:
    """The eval-transformed images and labels of a folder, one by one with Pillow."""

    def __init__(self, root: Path):
        folder = data.ImageFolder(root)
        self.labels = folder.labels
        self.pixels = np.stack([data.eval_transform(data.decode_rgb(p), 32) for p in folder.paths])


def test_classification_counts_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((40, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 40).astype(np.int32)
    valid = rng.random(40) < 0.8
    got = jax.jit(classification_counts)(logits, labels, valid)
    ranks = (logits > logits[np.arange(40), labels][:, None]).sum(1)  # classes ahead of the label
    log_probs = logits - np.log(np.exp(logits.astype(np.float64)).sum(1, keepdims=True))
    nll = -log_probs[np.arange(40), labels]
    assert float(got["count"]) == valid.sum()
    assert float(got["top1"]) == ((ranks == 0) & valid).sum()
    assert float(got["top5"]) == ((ranks < 5) & valid).sum()
    assert float(got["loss"]) == pytest.approx(nll[valid].sum(), rel=1e-6)


def test_eval_metrics_match_a_direct_computation(tmp_path, tiny_classifier):
    model, _ = tiny_classifier
    folder = data.ImageFolder(_image_folder(tmp_path / "val", {"a": 5, "b": 6}, seed=1))
    result = evaluate(model, folder, batch_size=4)
    logits = np.asarray(model(jnp.asarray(ImageFolderImages(folder.root).pixels)))
    assert result["count"] == 11 and result["skipped"] == 0
    assert result["top1"] == pytest.approx(100 * np.mean(logits.argmax(1) == folder.labels))


def test_a_finished_finetuning_run_directory_gives_its_exported_classifier(
    tmp_path, capsys, tiny_classifier
):
    model, _ = tiny_classifier
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)  # a run directory: Orbax steps, and model/ at the end
    save_model(model, run / "model")
    loaded = mae_jax.load_pretrained(run)
    assert isinstance(loaded, mae_jax.VisionTransformer)
    jax.tree.map(np.testing.assert_array_equal, state_as_numpy(loaded), state_as_numpy(model))
    folder = _image_folder(tmp_path / "val", {"a": 1, "b": 1})
    code, out, err = _run_cli(capsys, "eval", "--data", folder, "--checkpoint", run, "--quiet")
    assert code == 0 and "* Acc@1" in out, err


def _one_line_error(code, err, *needles):
    assert code == 2 and err.count("\n") == 1 and err.startswith("mae-jax: error: "), err
    for needle in needles:
        assert needle in err, err


def test_eval_errors_are_one_line(tmp_path, capsys, tiny_classifier):
    _, ckpt = tiny_classifier
    mae_ckpt = save_model(mae_jax.create_model("mae_vit_tiny_patch4"), tmp_path / "mae")
    three = _image_folder(tmp_path / "three", {"a": 1, "b": 1, "c": 1})
    two = _image_folder(tmp_path / "two", {"a": 1, "b": 1})
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    for name in ("a", "b"):
        (broken / name).mkdir(parents=True)
        (broken / name / "x.jpg").write_bytes(b"not a jpeg")

    def run(data_dir, checkpoint):
        return _run_cli(capsys, "eval", "--data", data_dir, "--checkpoint", checkpoint, "--quiet")

    _one_line_error(*run(two, mae_ckpt)[::2], "has no classification head", "mae-jax finetune")
    _one_line_error(*run(three, ckpt)[::2], "3 class folder(s)", "2 classes")
    _one_line_error(*run(tmp_path / "empty", ckpt)[::2], "no images found")
    _one_line_error(*run(tmp_path / "missing", ckpt)[::2], "does not exist")
    _one_line_error(*run(broken, ckpt)[::2], "none of its 2 images could be read")
    _one_line_error(*run(two, tmp_path / "nope")[::2], "no such checkpoint directory")


def test_reconstruct_refuses_a_classifier(tmp_path, capsys, tiny_classifier):
    _, ckpt = tiny_classifier
    img = _image_folder(tmp_path / "imgs", {"a": 1}) / "a" / "0.png"
    code, _, err = _run_cli(
        capsys, "reconstruct", img, "--checkpoint", ckpt, "--out", tmp_path / "r.png"
    )
    _one_line_error(code, err, "is a classifier, it has no decoder")
    assert not (tmp_path / "r.png").exists()
