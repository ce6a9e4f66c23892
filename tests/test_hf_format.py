"""Hugging Face ViTMAE directories, both ways: convert, to-hf and parity --hf.

The directories come from transformers itself (``save_pretrained`` of random weights) or, for
transformers 4's key spelling, from a transformers 5 state_dict renamed here by hand and checked
by transformers' own loader. Tolerances (parity's defaults, the issue's): every float stage
within 1e-5 max abs error, mask and ids_restore identical, loss within 1e-6 relative; JAX runs at
highest precision, transformers with eager attention on CPU.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mae_jax
from convert import parity
from convert.orbax_to_hf import export_hf
from convert.pth_to_orbax import ConversionError, convert_pth
from mae_jax import cli
from mae_jax.model import MissingDecoderError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load as safetensors_load  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"

TINY = dict(
    image_size=32,
    patch_size=4,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=256,
    decoder_hidden_size=48,
    decoder_num_hidden_layers=2,
    decoder_num_attention_heads=3,
    decoder_intermediate_size=192,
    layer_norm_eps=1e-6,
)
# A size no preset has: other widths, depths, heads, MLP ratio 2, eps, mask ratio, norm-pix loss.
CUSTOM = dict(
    image_size=24,
    patch_size=6,
    num_channels=3,
    hidden_size=40,
    num_hidden_layers=3,
    num_attention_heads=5,
    intermediate_size=80,
    decoder_hidden_size=32,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=64,
    layer_norm_eps=1e-5,
    mask_ratio=0.5,
    norm_pix_loss=True,
)


def _random_model(cls, settings: dict, seed: int):
    """A transformers ViTMAE of ``settings`` with every tensor random (a fresh one has zero
    position tables and tokens, which would hide a mapping mistake)."""
    config = transformers.ViTMAEConfig(**settings)
    model = cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in model.state_dict().items():
            noise = torch.randn(value.shape, generator=gen)
            is_scale = re.search(r"(layernorm\w*|decoder_norm)\.weight$", name)
            value.copy_(1.0 + 0.1 * noise if is_scale else 0.05 * noise)
    return model


def _saved(cls, settings, path: Path, seed: int = 0, **save) -> Path:
    _random_model(cls, settings, seed).save_pretrained(path, **save)
    return path


def _assert_parity(checkpoint, hf_dir, mask_ratio=0.75, decoder=True):
    ours, ref, _ = parity.run_parity(checkpoint, hf=hf_dir, batch=2, mask_ratio=mask_ratio, seed=3)
    rows = parity.compare(ours, ref, atol=1e-5, loss_rtol=1e-6)
    stages = {r.stage for r in rows}
    want = {"patch_embed", "x_masked", "enc_blocks", "latent", "mask", "ids_restore"}
    if decoder:
        want |= {"dec_in", "dec_blocks", "pred", "loss"}
    assert want <= stages, stages
    bad = [r for r in rows if not r.ok]
    assert not bad, parity.format_table(rows, enforce=True)
    return {r.stage: r.max_abs for r in rows}


def _loaded_cleanly(cls, path):
    model, info = cls.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model


# --------------------------------------------------------------------------- HF -> mae-jax


@pytest.mark.parametrize(
    "settings, cls_name, shards",
    [(TINY, "ViTMAEForPreTraining", False), (CUSTOM, "ViTMAEForPreTraining", True)],
    ids=["tiny", "custom-sharded"],
)
def test_save_pretrained_directory_converts_and_matches_hf(tmp_path, settings, cls_name, shards):
    cls = getattr(transformers, cls_name)
    save = {"max_shard_size": "20KB"} if shards else {}
    hf_dir = _saved(cls, settings, tmp_path / "hf", **save)
    assert (hf_dir / "model.safetensors.index.json").exists() == shards
    out, meta = convert_pth(hf_dir, tmp_path / "ckpt")
    config = mae_jax.load_pretrained(out).config
    assert (config.embed_dim, config.depth, config.num_heads) == (
        settings["hidden_size"],
        settings["num_hidden_layers"],
        settings["num_attention_heads"],
    )
    assert config.mlp_ratio == settings["intermediate_size"] / settings["hidden_size"]
    assert config.layer_norm_eps == settings["layer_norm_eps"]
    assert config.norm_pix_loss == settings.get("norm_pix_loss", False)
    assert meta["mask_ratio"] == settings.get("mask_ratio", 0.75)
    assert meta["preset"] == ("mae_vit_tiny_patch4" if settings is TINY else None)
    assert meta["source"]["key_names"] == "transformers 5 save_pretrained"
    _assert_parity(out, hf_dir, mask_ratio=meta["mask_ratio"])


def test_encoder_only_directory_converts_and_refuses_to_reconstruct(tmp_path):
    hf_dir = _saved(transformers.ViTMAEModel, TINY, tmp_path / "hf")
    out, meta = convert_pth(hf_dir, tmp_path / "ckpt")
    assert meta["family"] == "mae_encoder" and meta["source"]["architecture"] == "ViTMAEModel"
    model = mae_jax.load_pretrained(out)
    assert not model.with_decoder
    with pytest.raises(MissingDecoderError, match="no decoder weights"):
        model.forward_full(
            np.zeros((1, 32, 32, 3), np.float32), noise=np.zeros((1, 64), np.float32)
        )
    _assert_parity(out, hf_dir, decoder=False)
    # --encoder-only keeps the encoder of a full directory; its decoder keys are listed as ignored
    full = _saved(transformers.ViTMAEForPreTraining, TINY, tmp_path / "full")
    out, meta = convert_pth(full, tmp_path / "enc", encoder_only=True)
    assert not mae_jax.load_pretrained(out).with_decoder
    assert "mask_token" in meta["ignored_keys"] and "decoder_pred.weight" in meta["ignored_keys"]
    _assert_parity(out, full, decoder=False)  # against the full directory's own encoder
    with pytest.raises(ValueError, match="holds a ViTMAEModel"):
        parity.run_parity(convert_pth(full, tmp_path / "mae")[0], hf=hf_dir)


def _v4_name(key: str) -> str:
    """transformers 5's in-memory name -> the name transformers 4 wrote (the hub's files)."""
    key = re.sub(r"^vit\.layers\.", "vit.encoder.layer.", key)
    for new, old in (
        (".attention.q_proj.", ".attention.attention.query."),
        (".attention.k_proj.", ".attention.attention.key."),
        (".attention.v_proj.", ".attention.attention.value."),
        (".attention.o_proj.", ".attention.output.dense."),
        (".mlp.fc1.", ".intermediate.dense."),
        (".mlp.fc2.", ".output.dense."),
    ):
        key = key.replace(new, old)
    return key


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_transformers_4_directory_converts_and_matches_hf(tmp_path, weights):
    model = _random_model(transformers.ViTMAEForPreTraining, TINY, seed=1)
    hf_dir = tmp_path / "hub"
    hf_dir.mkdir()
    sd = {_v4_name(k): v.numpy() for k, v in model.state_dict().items()}
    assert "decoder.decoder_layers.1.attention.attention.value.bias" in sd
    assert "vit.encoder.layer.0.intermediate.dense.weight" in sd
    if weights == "model.safetensors":
        save_file(sd, str(hf_dir / weights), metadata={"format": "pt"})
    else:
        torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, hf_dir / weights)
    (hf_dir / "config.json").write_text(model.config.to_json_string())
    _loaded_cleanly(transformers.ViTMAEForPreTraining, hf_dir)  # transformers' own reading
    out, meta = convert_pth(hf_dir, tmp_path / "ckpt")
    assert meta["source"]["key_names"] == "transformers 4"
    _assert_parity(out, hf_dir)
    # and back: the same names, every tensor bit for bit
    if weights == "model.safetensors":
        back = export_hf(out, tmp_path / "back")
        written = load_file(str(back / "model.safetensors"))
        assert set(written) == set(sd)
        for k, v in sd.items():
            assert written[k].dtype == v.dtype and np.array_equal(written[k], v), k


# --------------------------------------------------------------------------- mae-jax -> HF


def test_round_trip_hf_to_mae_jax_to_hf_is_bit_exact(tmp_path, capsys):
    hf_dir = _saved(transformers.ViTMAEForPreTraining, CUSTOM, tmp_path / "hf", seed=2)
    out, _ = convert_pth(hf_dir, tmp_path / "ckpt")
    capsys.readouterr()
    assert cli.main(["convert", str(hf_dir), str(tmp_path / "again")]) == 0
    assert "note: LayerNorm eps 1e-05, as config.json gives it" in capsys.readouterr().out
    code = cli.main(["to-hf", str(out), str(tmp_path / "back")])
    assert code == 0
    back = tmp_path / "back"
    original = transformers.ViTMAEForPreTraining.from_pretrained(hf_dir).state_dict()
    again = _loaded_cleanly(transformers.ViTMAEForPreTraining, back).state_dict()
    assert list(again) == list(original)
    for k, v in original.items():
        assert again[k].dtype == v.dtype and torch.equal(again[k], v), k
    written = json.loads((back / "config.json").read_text())
    saved = json.loads((hf_dir / "config.json").read_text())
    for field in set(saved) - {"transformers_version"}:
        assert written[field] == saved[field], field


def test_to_hf_of_the_official_golden_model_loads_and_matches(tmp_path, capsys):
    ckpt, _ = convert_pth(GOLDEN / "tiny_shared.pth", tmp_path / "ckpt")
    assert cli.main(["to-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    assert "ViTMAEForPreTraining.from_pretrained" in capsys.readouterr().out
    model = _loaded_cleanly(transformers.ViTMAEForPreTraining, tmp_path / "hf")
    # config.json complete: every field transformers' config has, at MAE's values
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    fields = set(transformers.ViTMAEConfig().to_diff_dict()) - {"transformers_version"}
    assert fields <= set(written), fields - set(written)
    assert model.config.layer_norm_eps == 1e-6 and model.config.hidden_act == "gelu"
    # the fixed tables are in the file (a fresh transformers ViTMAE leaves them at zero)
    table = model.vit.embeddings.position_embeddings.detach().numpy()
    assert np.abs(table).max() > 0.5
    # through the CLI: the directory's own model agrees with the checkpoint stage by stage
    assert cli.main(["parity", str(ckpt), "--hf", str(tmp_path / "hf")]) == 0
    text = capsys.readouterr().out
    assert "its own transformers ViTMAEForPreTraining" in text
    assert "all stages within tolerance" in text


def test_to_hf_of_an_encoder_only_checkpoint(tmp_path):
    ckpt, _ = convert_pth(GOLDEN / "tiny_shared_encoder_only.pth", tmp_path / "ckpt")
    back = export_hf(ckpt, tmp_path / "hf")
    assert json.loads((back / "config.json").read_text())["architectures"] == ["ViTMAEModel"]
    _loaded_cleanly(transformers.ViTMAEModel, back)
    assert all(
        not k.startswith(("vit.", "decoder.")) for k in load_file(str(back / "model.safetensors"))
    )


def test_parity_hf_catches_a_different_model(tmp_path, capsys):
    hf_dir = _saved(transformers.ViTMAEForPreTraining, TINY, tmp_path / "hf", seed=4)
    other = _saved(transformers.ViTMAEForPreTraining, TINY, tmp_path / "other", seed=5)
    out, _ = convert_pth(hf_dir, tmp_path / "ckpt")
    capsys.readouterr()
    assert cli.main(["parity", str(out), "--hf", str(other)]) == 1
    assert "OVER" in capsys.readouterr().out


# --------------------------------------------------------------------------- bad directories


def _break(kind: str, hf_dir: Path) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    weights = hf_dir / "model.safetensors"
    if kind == "no config":
        (hf_dir / "config.json").unlink()
    elif kind == "no weights":
        weights.unlink()
    elif kind == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif kind == "config depth":
        config["num_hidden_layers"] = 3
    elif kind == "config width":
        config["hidden_size"] = 32
        config["intermediate_size"] = 128
    elif kind == "not ViTMAE":
        config["model_type"] = "vit"
        config["architectures"] = ["ViTForImageClassification"]
    if kind.startswith(("config", "not")):
        (hf_dir / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "kind, needles",
    [
        ("no config", ["config.json: missing"]),
        ("no weights", ["no weights", "model.safetensors"]),
        ("truncated weights", ["model.safetensors: not a readable safetensors file"]),
        ("config depth", ["model.safetensors", "missing vit.encoder.layer.2."]),
        ("config width", ["model.safetensors", "! shape vit.", "config.json gives (32"]),
        ("not ViTMAE", ["config.json: model_type 'vit'", "not a ViTMAE model"]),
    ],
)
def test_bad_directories_give_one_line_errors(tmp_path, capsys, kind, needles):
    hf_dir = _saved(transformers.ViTMAEForPreTraining, TINY, tmp_path / "hf")
    _break(kind, hf_dir)
    out = tmp_path / "ckpt"
    capsys.readouterr()  # transformers' progress bars while saving
    assert cli.main(["convert", str(hf_dir), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt")] == []


def test_to_hf_refuses_a_classifier_and_an_existing_directory(tmp_path):
    ckpt, _ = convert_pth(GOLDEN / "tiny_shared.pth", tmp_path / "ckpt")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        export_hf(ckpt, tmp_path / "taken")
    with pytest.raises(ConversionError, match="classifier"):
        export_hf(_classifier(tmp_path), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def _classifier(tmp_path):
    gp = GOLDEN / "vit_tiny_shared_gp.pth"
    out, _ = convert_pth(gp, tmp_path / "clf", settings=["num_heads=4"])
    return out


# --------------------------------------------------------------------------- in a bucket


def test_hf_directories_to_and_from_a_bucket(gcs_dir, tmp_path):
    """convert reads an HF directory from gs://, to-hf writes one there, parity --hf reads it."""
    from etils import epath

    hf_dir = _saved(transformers.ViTMAEForPreTraining, TINY, tmp_path / "hf", seed=6)
    for f in hf_dir.iterdir():
        epath.Path(f"{gcs_dir}/hf/{f.name}").write_bytes(f.read_bytes())
    ckpt, _ = convert_pth(f"{gcs_dir}/hf", tmp_path / "ckpt")
    back = export_hf(ckpt, f"{gcs_dir}/back")
    written = load_file(str(hf_dir / "model.safetensors"))  # transformers 5's own spelling
    again = safetensors_load(epath.Path(f"{back}/model.safetensors").read_bytes())
    decoder = "decoder.decoder_encoder.layer."
    assert {k.replace(decoder, "decoder.decoder_layers.") for k in written} == set(again)
    for k, v in written.items():
        assert np.array_equal(again[k.replace(decoder, "decoder.decoder_layers.")], v), k
    _assert_parity(ckpt, back)


NO_TORCH = """
import sys


class RefuseTorch:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, RefuseTorch)
from mae_jax import cli

assert cli.main(["convert", sys.argv[1], sys.argv[2], "--quiet"]) == 0
assert cli.main(["to-hf", sys.argv[2], sys.argv[3]]) == 0
assert "torch" not in sys.modules and "transformers" not in sys.modules
"""


def test_both_directions_run_without_torch(tmp_path):
    hf_dir = _saved(transformers.ViTMAEModel, TINY, tmp_path / "hf", seed=7)
    p = subprocess.run(
        [sys.executable, "-c", NO_TORCH, hf_dir, tmp_path / "ckpt", tmp_path / "back"],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    written = load_file(str(tmp_path / "back" / "model.safetensors"))
    original = load_file(str(hf_dir / "model.safetensors"))
    assert set(written) == set(original)
    assert all(np.array_equal(written[k], v) for k, v in original.items())
