"""The converter: the whole .pth -> Orbax -> .pth path, its strictness, and every bad input."""

import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import mae_jax
from convert import mapping, orbax_to_pth, pth_to_orbax

torch = pytest.importorskip("torch")

ROOT = Path(__file__).parent.parent
GOLDEN = Path(__file__).parent / "golden"
FAKE_OFFICIAL = Path(__file__).parent / "fixtures" / "fake_official_mae"


def _golden_sd():
    return {
        k: v.numpy()
        for k, v in torch.load(GOLDEN / "tiny_shared.pth", weights_only=True)["model"].items()
    }


def _save(obj, path):
    torch.save(obj, path)
    return path


def _cli(*args, cwd=ROOT):
    """Run a converter script the way a user does; returns (exit code, stdout, stderr)."""
    p = subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    return p.returncode, p.stdout, p.stderr


def _assert_clean_failure(out: Path):
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == []


# ------------------------------------------------------------------ round trip


def test_round_trip_is_bit_identical_and_loads_strictly(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    back = tmp_path / "back.pth"
    code, stdout, stderr = _cli(
        "convert/pth_to_orbax.py", GOLDEN / "tiny_shared.pth", out, "--quiet"
    )
    assert code == 0, stderr
    assert "mae_vit_tiny_patch4" in stdout
    code, _, stderr = _cli("convert/orbax_to_pth.py", out, back)
    assert code == 0, stderr
    original = torch.load(GOLDEN / "tiny_shared.pth", weights_only=True)["model"]
    loaded = torch.load(back, weights_only=True)
    assert set(loaded) == {"model"}
    assert list(loaded["model"]) == list(original)  # the official key order too
    for k, v in original.items():
        assert loaded["model"][k].dtype == v.dtype and torch.equal(loaded["model"][k], v), k
    # the official model class loads it with strict=True and reproduces the golden outputs (a
    # stand-in with the official interface: CI cannot hold the official code)
    from convert.official_reference import official_mae_forward, official_model_kwargs

    monkeypatch.syspath_prepend(str(FAKE_OFFICIAL / "_fake_site"))
    g = np.load(GOLDEN / "tiny_shared__r0.75__np0.npz")
    sd_back = {k: v.numpy() for k, v in loaded["model"].items()}
    config = mae_jax.get_config("mae_vit_tiny_patch4")
    ref = official_mae_forward(
        FAKE_OFFICIAL,
        "MaskedAutoencoderViT",
        sd_back,
        g["x"],
        g["noise"],
        mask_ratio=0.75,
        norm_pix_loss=False,
        model_kwargs=official_model_kwargs(config),
    )
    from tests.test_references import TORCH_VS_GOLDEN_ATOL

    np.testing.assert_allclose(ref["pred"], g["pred"], rtol=0, atol=TORCH_VS_GOLDEN_ATOL)


def test_metadata_records_source_and_config(tmp_path):
    out, meta = pth_to_orbax.convert_pth(GOLDEN / "tiny_shared.pth", tmp_path / "c")
    import hashlib
    import json

    saved = json.loads((out / "mae_jax.json").read_text())
    assert (
        saved["source"]["sha256"]
        == hashlib.sha256((GOLDEN / "tiny_shared.pth").read_bytes()).hexdigest()
    )
    assert saved["source"]["file"] == "tiny_shared.pth"
    assert saved["family"] == "mae" and saved["model_type"] == "mae" and saved["converter_version"]
    assert mae_jax.MAEConfig.from_dict(saved["config"]) == mae_jax.get_config("mae_vit_tiny_patch4")
    # the golden tables are the official sin-cos values
    assert saved["pos_embed_max_abs_diff_from_sincos"] == 0.0


@pytest.mark.parametrize("layout", ["bare", "ddp", "training"])
def test_accepted_layouts(tmp_path, layout):
    sd = torch.load(GOLDEN / "tiny_shared.pth", weights_only=True)["model"]
    obj = {
        "bare": dict(sd),
        "ddp": {f"module.{k}": v for k, v in sd.items()},
        "training": {"model": sd, "optimizer": {}, "epoch": 7, "scaler": {}},
    }[layout]
    src = _save(obj, tmp_path / "src.pth")
    out, _ = pth_to_orbax.convert_pth(src, tmp_path / "c")
    a = mapping.official_from_state(mae_jax.checkpoint.state_as_numpy(mae_jax.load_pretrained(out)))
    for k, v in sd.items():
        np.testing.assert_array_equal(a[k], v.numpy())


def test_loaded_position_tables_win_over_recomputed(tmp_path):
    sd = torch.load(GOLDEN / "tiny_shared.pth", weights_only=True)["model"]
    sd["pos_embed"] = sd["pos_embed"] + 0.125  # e.g. tables converted from TF
    src = _save({"model": sd}, tmp_path / "src.pth")
    out, meta = pth_to_orbax.convert_pth(src, tmp_path / "c")
    model = mae_jax.load_pretrained(out)
    np.testing.assert_array_equal(np.asarray(model.pos_embed[...]), sd["pos_embed"].numpy())
    assert meta["pos_embed_max_abs_diff_from_sincos"] == pytest.approx(0.125)


def test_encoder_only_family(tmp_path):
    out, meta = pth_to_orbax.convert_pth(GOLDEN / "tiny_shared_encoder_only.pth", tmp_path / "c")
    assert meta["family"] == "mae_encoder"
    model = mae_jax.load_pretrained(out)
    assert not model.with_decoder
    back = tmp_path / "back.pth"
    orbax_to_pth.export_pth(out, back)
    assert set(torch.load(back, weights_only=True)["model"]) == set(
        torch.load(GOLDEN / "tiny_shared_encoder_only.pth", weights_only=True)["model"]
    )


def test_classifier_converts_to_a_classifier_or_to_its_encoder(tmp_path):
    code, stdout, err = _cli(
        "convert/pth_to_orbax.py", GOLDEN / "vit_tiny_shared_gp.pth", tmp_path / "clf", "--quiet"
    )
    assert code == 0, err
    assert "vit_tiny_patch4" in stdout and "global pool" in stdout and "5 classes" in stdout
    classifier = mae_jax.load_pretrained(tmp_path / "clf")
    assert type(classifier).__name__ == "VisionTransformer"
    assert (classifier.config.num_classes, classifier.config.global_pool) == (5, True)
    # --encoder-only still extracts the MAE encoder, as before classifiers converted.
    out, meta = pth_to_orbax.convert_pth(
        GOLDEN / "vit_tiny_shared_gp.pth", tmp_path / "c", encoder_only=True
    )
    assert meta["preset"] == "mae_vit_tiny_patch4"
    assert not mae_jax.load_pretrained(out).with_decoder
    assert sorted(meta["ignored_keys"]) == [
        "fc_norm.bias",
        "fc_norm.weight",
        "head.bias",
        "head.weight",
    ]
    assert meta["filled_by_default"] == [
        "norm.bias",
        "norm.weight",
    ]  # a global-pool model has no final norm


def test_full_model_encoder_only_extraction(tmp_path):
    out, meta = pth_to_orbax.convert_pth(
        GOLDEN / "tiny_shared.pth", tmp_path / "c", encoder_only=True
    )
    assert meta["ignored_keys"] and all(
        k.startswith(("decoder_", "mask_token")) for k in meta["ignored_keys"]
    )
    assert not mae_jax.load_pretrained(out).with_decoder


# ------------------------------------------------------------------ strictness


def test_strict_mapping_lists_every_problem():
    sd = _golden_sd()
    sd["blocks.0.attn.extra"] = np.zeros(3, np.float32)
    del sd["decoder_norm.bias"]
    sd["norm.weight"] = np.zeros(65, np.float32)
    from flax import nnx

    target = nnx.to_pure_dict(
        nnx.state(nnx.eval_shape(lambda: mae_jax.create_model("mae_vit_tiny_patch4")))
    )
    with pytest.raises(mapping.MappingError) as e:
        mapping.state_from_official(sd, target)
    msg = str(e.value)
    assert "+ unexpected blocks.0.attn.extra" in msg
    assert "- missing decoder_norm.bias" in msg
    assert "! shape norm.weight: (65,) in file, model needs (64,)" in msg
    assert "\n" not in msg


def test_name_table_rules():
    assert mapping.official_key(("blocks", 3, "norm1", "scale")) == "blocks.3.norm1.weight"
    assert (
        mapping.official_key(("blocks", 3, "attn", "qkv", "kernel")) == "blocks.3.attn.qkv.weight"
    )
    assert mapping.official_key(("patch_embed", "proj", "bias")) == "patch_embed.proj.bias"
    w = np.arange(2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    k = mapping.from_official(("patch_embed", "proj", "kernel"), w)
    assert k.shape == (4, 4, 3, 2) and k[1, 2, 0, 1] == w[1, 0, 1, 2]
    np.testing.assert_array_equal(mapping.to_official(("patch_embed", "proj", "kernel"), k), w)
    lin = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(mapping.from_official(("head", "kernel"), lin), lin.T)


def test_kernels_reuse_only_buffers_they_alone_use():
    """With reuse, a consumed kernel's memory takes a later kernel's transpose, unless shared."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 4)).astype(np.float32)
    shared = rng.standard_normal((2, 6, 4)).astype(np.float32)  # two kernels in one buffer
    sd = {
        "x.weight": a.copy(),
        "y.weight": a.copy() + 1,
        "s.weight": shared[0],
        "t.weight": shared[1],
        "u.weight": rng.standard_normal((6, 4)).astype(np.float32),
        "conv.weight": rng.standard_normal((3, 2, 4, 4)).astype(np.float32),
    }
    want = {k: mapping.from_official((k, "kernel"), v) for k, v in sd.items()}
    target = {k.split(".")[0]: {"kernel": np.zeros(w.shape, np.float32)} for k, w in want.items()}
    buffer_of_x = mapping._root(sd["x.weight"])
    originals = {k: v.copy() for k, v in sd.items()}
    out, _ = mapping.state_from_official(dict(sd), target, consume=True, reuse=True)
    for key, w in want.items():
        np.testing.assert_array_equal(out[key.split(".")[0]]["kernel"], w)
    # y's transpose went into x's old buffer; the shared buffer was never overwritten.
    assert mapping._root(out["y"]["kernel"]) is buffer_of_x
    np.testing.assert_array_equal(shared[0], originals["s.weight"])
    np.testing.assert_array_equal(shared[1], originals["t.weight"])


def test_abstract_model_is_eval_shape_of_the_model():
    import jax
    from flax import nnx

    from mae_jax.checkpoint import abstract_model, build_model
    from mae_jax.config import PRESETS, VIT_PRESETS

    mae = PRESETS["mae_vit_tiny_patch4"]
    vit = next(iter(VIT_PRESETS.values())).replace(depth=2)
    cases = [("mae", mae), ("mae_encoder", mae), ("vit_classifier", vit)]
    cases.append(("vit_classifier", vit.replace(global_pool=not vit.global_pool)))
    for model_type, config in cases:
        fast = nnx.split(abstract_model(model_type, config))
        slow = nnx.split(nnx.eval_shape(lambda: build_model(model_type, config)))  # noqa: B023
        assert fast[0] == slow[0], model_type
        fast_leaves = jax.tree_util.tree_leaves_with_path(fast[1])
        slow_leaves = jax.tree_util.tree_leaves_with_path(slow[1])
        assert [(p, x.shape, x.dtype) for p, x in fast_leaves] == [
            (p, x.shape, x.dtype) for p, x in slow_leaves
        ], model_type


# ------------------------------------------------------------------ bad input


def _evil_pickle_pth(path: Path, marker: Path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"model": Evil()}, protocol=2))
        z.writestr("evil/version", "3\n")
    return path


def _truncated(tmp_path):
    data = (GOLDEN / "tiny_shared.pth").read_bytes()
    p = tmp_path / "truncated.pth"
    p.write_bytes(data[: len(data) // 2])
    return p


def _not_torch(tmp_path):
    p = tmp_path / "notes.pth"
    p.write_text("these are not weights\n")
    return p


def _no_preset(tmp_path):
    sd = torch.load(GOLDEN / "tiny_shared.pth", weights_only=True)["model"]
    sd = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}  # depth 1 fits no preset
    return _save({"model": sd}, tmp_path / "odd.pth")


@pytest.mark.parametrize(
    "make_src, extra, expect",
    [
        (_truncated, [], "truncated.pth"),
        (_not_torch, [], "notes.pth"),
        (_no_preset, [], "fit no preset"),
        (
            lambda t: GOLDEN / "tiny_shared.pth",
            ["--arch", "mae_vit_base_patch16"],
            "--arch mae_vit_base_patch16 does not fit",
        ),
        (lambda t: GOLDEN / "tiny_shared.pth", ["--arch", "vit_gigantic"], "unknown --arch"),
    ],
    ids=["truncated", "not-a-torch-archive", "no-preset", "wrong-arch", "unknown-arch"],
)
def test_bad_input_one_line_error_no_output(tmp_path, make_src, extra, expect):
    out = tmp_path / "out"
    code, stdout, err = _cli("convert/pth_to_orbax.py", make_src(tmp_path), out, "--quiet", *extra)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert expect in err
    _assert_clean_failure(out)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    src = _evil_pickle_pth(tmp_path / "evil.pth", marker)
    code, _, err = _cli("convert/pth_to_orbax.py", src, tmp_path / "out", "--quiet")
    assert code == 2 and "evil.pth" in err and "system" in err and err.count("\n") == 1
    assert not marker.exists()
    _assert_clean_failure(tmp_path / "out")


def test_existing_output_is_refused_unless_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _cli("convert/pth_to_orbax.py", GOLDEN / "tiny_shared.pth", out, "--quiet")
    assert code == 2 and "already exists" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = _cli(
        "convert/pth_to_orbax.py", GOLDEN / "tiny_shared.pth", out, "--quiet", "--force"
    )
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "mae_jax.json").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    code, _, err = _cli(
        "convert/pth_to_orbax.py", GOLDEN / "tiny_shared.pth", locked / "out", "--quiet"
    )
    locked.chmod(0o700)
    assert code == 2 and "locked" in err and err.count("\n") == 1


def test_output_under_a_file_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = _cli(
        "convert/pth_to_orbax.py", GOLDEN / "tiny_shared.pth", blocker / "out", "--quiet"
    )
    assert code == 2 and "a_file" in err and err.count("\n") == 1


def test_encoder_only_checkpoint_cannot_reconstruct(tmp_path):
    out, _ = pth_to_orbax.convert_pth(GOLDEN / "tiny_shared_encoder_only.pth", tmp_path / "c")
    model = mae_jax.load_pretrained(out)
    import jax

    with pytest.raises(mae_jax.MissingDecoderError, match=r"mae_visualize_vit_\*\.pth.*_full\.pth"):
        model(jax.numpy.zeros((1, 32, 32, 3)), key=jax.random.key(0))


def test_orbax_to_pth_errors(tmp_path):
    code, _, err = _cli("convert/orbax_to_pth.py", tmp_path / "missing", tmp_path / "x.pth")
    assert code == 2 and "missing" in err and "no such checkpoint directory" in err
    assert not (tmp_path / "x.pth").exists()
