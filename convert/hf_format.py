"""Hugging Face ``ViTMAE`` directories (``config.json`` + safetensors), read and written without torch.

The key table between transformers' ViTMAE names and the official MAE state_dict lives here, so
that the converter reads hub directories without torch and the PyTorch reference
(``hf_reference.py``) maps official weights onto transformers' model with the same rows.

transformers has spelled the same tensors three ways, and files exist in each spelling:

    in memory, transformers 5          vit.layers.N.attention.q_proj.weight
    files written by transformers 4    vit.encoder.layer.N.attention.attention.query.weight
    (the hub's files)                  decoder.decoder_layers.N.attention.attention.query.weight
    files written by transformers 5    as transformers 4, but the decoder's blocks are
    (save_pretrained, 5.25 checked)    decoder.decoder_encoder.layer.N.attention.attention.query...

A ``ViTMAEModel`` (no decoder) is saved without the ``vit.`` prefix. All of them are read;
directories are written in transformers 4's spelling, which transformers 4 and 5 both load.
HF splits the official fused ``attn.qkv`` into q/k/v projections (rows [0:D], [D:2D], [2D:3D]);
nothing else is transposed or reshaped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mae_jax._files import naming, run_path
from mae_jax.config import MAEConfig

from . import mapping

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
PRETRAINING = "ViTMAEForPreTraining"
ENCODER_ONLY = "ViTMAEModel"


class HFFormatError(ValueError):
    """A directory that is not a readable ViTMAE model; the message names the file and the reason."""


# ----------------------------------------------------------------------------------------------
# Key table: HF name (transformers 5, in memory) -> official name. The table goes from HF to
# official so that one pass over an HF model's own state_dict both predicts the official layout
# and fills every HF tensor; ``hf_names`` runs it backwards.

# (HF prefix, official prefix), first match wins; the "vit." prefix of the encoder inside
# ViTMAEForPreTraining is stripped before the lookup.
_TOP_LEVEL = (
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("layernorm.", "norm."),
    ("layers.", "blocks."),
    ("decoder.mask_token", "mask_token"),
    ("decoder.decoder_pos_embed", "decoder_pos_embed"),
    ("decoder.decoder_layers.", "decoder_blocks."),
    ("decoder.decoder_", "decoder_"),  # decoder_embed, decoder_norm, decoder_pred
)
# Inside one transformer block: (HF prefix, official prefix, third of the fused qkv or None).
_IN_BLOCK = (
    ("layernorm_before.", "norm1.", None),
    ("layernorm_after.", "norm2.", None),
    ("attention.o_proj.", "attn.proj.", None),
    ("attention.q_proj.", "attn.qkv.", 0),
    ("attention.k_proj.", "attn.qkv.", 1),
    ("attention.v_proj.", "attn.qkv.", 2),
    ("mlp.fc1.", "mlp.fc1.", None),
    ("mlp.fc2.", "mlp.fc2.", None),
)
_BLOCK_LISTS = ("blocks.", "decoder_blocks.")

# Inside a block: (the spelling of transformers 4's files, transformers 5's in-memory spelling).
_FILE_IN_BLOCK = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)
_BLOCK_KEY = re.compile(r"^((?:vit\.)?layers\.|decoder\.decoder_layers\.)(\d+)\.(.*)$")


def _replace_prefix(name: str, table) -> tuple[str, tuple] | None:
    for row in table:
        if name.startswith(row[0]):
            return row[1] + name[len(row[0]) :], row[2:]
    return None


def official_name(hf_key: str) -> tuple[str, int | None]:
    """The official key an HF ViTMAE key (transformers 5 spelling) is read from, and which third
    of a fused qkv (or None). KeyError for a name outside the table."""
    key = hf_key.removeprefix("vit.")
    hit = _replace_prefix(key, _TOP_LEVEL)
    if hit is None:
        raise KeyError(f"no official name for HF key {hf_key!r} (transformers layout changed?)")
    name, _ = hit
    for block_list in _BLOCK_LISTS:
        if name.startswith(block_list):
            index, _, rest = name[len(block_list) :].partition(".")
            inner = _replace_prefix(rest, _IN_BLOCK)
            if inner is None or not index.isdigit():
                raise KeyError(
                    f"no official name for HF key {hf_key!r} (transformers layout changed?)"
                )
            (rest, (third,)) = inner
            return f"{block_list}{index}.{rest}", third
    return name, None


def hf_names(official: str, *, prefix: str = "vit.") -> list[tuple[str, int | None]]:
    """The HF keys (transformers 5 spelling) an official key becomes, each with its third of a
    fused qkv (or None); ``prefix`` goes before the encoder's keys."""
    for block_list in _BLOCK_LISTS:
        if official.startswith(block_list):
            index, _, rest = official[len(block_list) :].partition(".")
            hf_list = next(hf for hf, off in _TOP_LEVEL if off == block_list)
            head = ("" if hf_list.startswith("decoder.") else prefix) + f"{hf_list}{index}."
            return [
                (head + hf + rest[len(off) :], third)
                for hf, off, third in _IN_BLOCK
                if rest.startswith(off)
            ]
    for hf, off in _TOP_LEVEL:
        if official.startswith(off) and off not in _BLOCK_LISTS:
            head = "" if hf.startswith("decoder.") else prefix
            return [(head + hf + official[len(off) :], None)]
    raise KeyError(f"no HF name for official key {official!r}")


def file_name(hf_key: str, decoder_blocks: str = "decoder.decoder_layers.") -> str:
    """A transformers 5 key -> the spelling of transformers 4's files (what is written), with
    ``decoder_blocks`` naming the decoder's block list."""
    m = _BLOCK_KEY.match(hf_key)
    if m is None:
        return hf_key
    head, index, rest = m.groups()
    spelled = {"layers.": "encoder.layer.", "vit.layers.": "vit.encoder.layer."}.get(
        head, decoder_blocks
    )
    for old, new in _FILE_IN_BLOCK:
        if rest.startswith(new):
            rest = old + rest[len(new) :]
            break
    return f"{spelled}{index}.{rest}"


# ----------------------------------------------------------------------------------------------
# config.json <-> MAEConfig

# ViTMAEConfig's defaults, for fields a config.json leaves out.
_HF_DEFAULTS = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "qkv_bias": True,
    "decoder_num_attention_heads": 16,
    "decoder_hidden_size": 512,
    "decoder_num_hidden_layers": 8,
    "decoder_intermediate_size": 2048,
    "mask_ratio": 0.75,
    "norm_pix_loss": False,
}


@dataclass
class HFConfig:
    """What a ViTMAE config.json says, in mae-jax's terms."""

    config: MAEConfig
    mask_ratio: float
    architecture: str | None  # ViTMAEForPreTraining, ViTMAEModel, or None when not recorded
    raw: dict


def _square(value: Any, what: str, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise HFFormatError(f"{where}: {what} {value} is not square; mae-jax needs one size")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise HFFormatError(f"{where}: {what} {value!r} is not a positive whole number")
    return value


def _whole(raw: Mapping, key: str, where: str) -> int:
    value = raw[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise HFFormatError(f"{where}: {key} {value!r} is not a whole number")
    return value


def read_config(directory: Any) -> HFConfig:
    """The ViTMAE config.json of ``directory`` (local or a bucket URL), as an MAEConfig."""
    path = run_path(directory) / CONFIG_FILE
    with naming(path):
        if not run_path(directory).is_dir():
            raise HFFormatError(f"{directory}: no such directory")
        if not path.is_file():
            raise HFFormatError(f"{path}: missing; a Hugging Face model directory has one")
        text = path.read_bytes()
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFFormatError(f"{path}: not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise HFFormatError(f"{path}: not a JSON object")
    return config_from_json(raw, str(path))


def config_from_json(raw: dict, where: str) -> HFConfig:
    """A ViTMAEConfig's JSON -> HFConfig; HFFormatError naming ``where`` if mae-jax cannot run it."""
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    if model_type != "vit_mae":
        shown = f"model_type {model_type!r}" + (
            f" ({', '.join(map(str, architectures))})" if architectures else ""
        )
        raise HFFormatError(f"{where}: {shown} is not a ViTMAE model (model_type 'vit_mae')")
    known = [a for a in architectures if a in (PRETRAINING, ENCODER_ONLY)]
    if architectures and not known:
        raise HFFormatError(
            f"{where}: architectures {architectures} holds neither {PRETRAINING} nor {ENCODER_ONLY}"
        )
    full = {**_HF_DEFAULTS, **raw}
    if full["hidden_act"] != "gelu":
        raise HFFormatError(
            f"{where}: hidden_act {full['hidden_act']!r}; MAE (and mae-jax) use the exact GELU 'gelu'"
        )
    if full["qkv_bias"] is not True:
        raise HFFormatError(f"{where}: qkv_bias is off; MAE (and mae-jax) have q, k, v biases")
    sizes = {
        k: _whole(full, k, where)
        for k in _HF_DEFAULTS
        if k.endswith(("_size", "_layers", "_heads", "_channels"))
        and k not in ("image_size", "patch_size")
    }
    hidden, decoder_hidden = sizes["hidden_size"], sizes["decoder_hidden_size"]
    if not hidden or not decoder_hidden:
        raise HFFormatError(f"{where}: hidden_size and decoder_hidden_size must be positive")
    ratio = sizes["intermediate_size"] / hidden
    decoder_ratio = sizes["decoder_intermediate_size"] / decoder_hidden
    if ratio != decoder_ratio:
        raise HFFormatError(
            f"{where}: intermediate_size / hidden_size ({ratio:g}) differs from the decoder's "
            f"({decoder_ratio:g}); MAE (and mae-jax) use one MLP ratio for both"
        )
    try:
        config = MAEConfig(
            img_size=_square(full["image_size"], "image_size", where),
            patch_size=_square(full["patch_size"], "patch_size", where),
            in_chans=sizes["num_channels"],
            embed_dim=hidden,
            depth=sizes["num_hidden_layers"],
            num_heads=sizes["num_attention_heads"],
            mlp_ratio=ratio,
            layer_norm_eps=float(full["layer_norm_eps"]),
            decoder_embed_dim=decoder_hidden,
            decoder_depth=sizes["decoder_num_hidden_layers"],
            decoder_num_heads=sizes["decoder_num_attention_heads"],
            norm_pix_loss=bool(full["norm_pix_loss"]),
        )
        mask_ratio = float(full["mask_ratio"])
    except (ValueError, TypeError) as e:
        raise HFFormatError(f"{where}: {e}") from None
    return HFConfig(config, mask_ratio, known[0] if known else None, raw)


def config_to_json(config: MAEConfig, *, with_decoder: bool, mask_ratio: float = 0.75) -> dict:
    """The complete ViTMAEConfig JSON of an MAE config (every field ViTMAEConfig has)."""
    mlp = config.mlp_ratio
    return {
        "architectures": [PRETRAINING if with_decoder else ENCODER_ONLY],
        "attention_probs_dropout_prob": 0.0,
        "decoder_hidden_size": config.decoder_embed_dim,
        "decoder_intermediate_size": int(config.decoder_embed_dim * mlp),
        "decoder_num_attention_heads": config.decoder_num_heads,
        "decoder_num_hidden_layers": config.decoder_depth,
        "dtype": "float32",
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "hidden_size": config.embed_dim,
        "image_size": config.img_size,
        "initializer_range": 0.02,
        "intermediate_size": int(config.embed_dim * mlp),
        "layer_norm_eps": config.layer_norm_eps,
        "mask_ratio": mask_ratio,
        "model_type": "vit_mae",
        "norm_pix_loss": config.norm_pix_loss,
        "num_attention_heads": config.num_heads,
        "num_channels": config.in_chans,
        "num_hidden_layers": config.depth,
        "patch_size": config.patch_size,
        "qkv_bias": True,
    }


# ----------------------------------------------------------------------------------------------
# Weights


@dataclass
class HFWeights:
    """The tensors of a directory, by the names its files use, and where they came from."""

    tensors: dict[str, np.ndarray]
    files: dict[str, str]  # file name -> sha256
    total_bytes: int


def _read_safetensors(path: Any) -> tuple[dict[str, np.ndarray], str]:
    """A safetensors file's tensors and sha256; a local file is read once into its arrays."""
    from safetensors import SafetensorError
    from safetensors.numpy import load, load_file

    from mae_jax._files import is_url

    digest = hashlib.sha256()
    try:
        if is_url(path):
            with naming(path):
                data = path.read_bytes()
            digest.update(data)
            return load(data), digest.hexdigest()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        return load_file(os.fspath(path)), digest.hexdigest()
    except (SafetensorError, ValueError, KeyError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise HFFormatError(f"{path}: not a readable safetensors file ({reason})") from None


def _read_bin(path: Any) -> tuple[dict[str, np.ndarray], str]:
    from .pth_io import PthError, read_pth

    digest = hashlib.sha256()
    try:
        obj = read_pth(path, digest=digest, allow_overlap=False)
    except PthError as e:
        raise HFFormatError(str(e)) from None
    if not isinstance(obj, Mapping) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise HFFormatError(f"{path}: not a state_dict (expected a dict of tensors)")
    return dict(obj), digest.hexdigest()


def _index_files(index: Any) -> list[str]:
    with naming(index):
        text = index.read_bytes()
    try:
        weight_map = json.loads(text)["weight_map"]
        files = sorted({str(name) for name in weight_map.values()})
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise HFFormatError(f"{index}: not a shard index ({type(e).__name__}: {e})") from None
    bad = [f for f in files if "/" in f or "\\" in f or f.startswith(".")]
    if bad:
        raise HFFormatError(f"{index}: names shard files outside its directory: {', '.join(bad)}")
    return files


def read_weights(directory: Any) -> HFWeights:
    """Every tensor of the directory's model.safetensors (or its shards, or, without one, its
    pytorch_model.bin through the safe .pth reader), by the names the files use."""
    directory = run_path(directory)
    with naming(directory):
        present = {
            name: (directory / name).is_file()
            for name in (SAFETENSORS_FILE, SAFETENSORS_INDEX, BIN_FILE, BIN_INDEX)
        }
    if present[SAFETENSORS_FILE]:
        files, reader = [SAFETENSORS_FILE], _read_safetensors
    elif present[SAFETENSORS_INDEX]:
        files, reader = _index_files(directory / SAFETENSORS_INDEX), _read_safetensors
    elif present[BIN_FILE]:
        files, reader = [BIN_FILE], _read_bin
    elif present[BIN_INDEX]:
        files, reader = _index_files(directory / BIN_INDEX), _read_bin
    else:
        raise HFFormatError(
            f"{directory}: no weights ({SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or {BIN_FILE})"
        )
    tensors: dict[str, np.ndarray] = {}
    digests: dict[str, str] = {}
    total = 0
    for name in files:
        path = directory / name
        with naming(path):
            if not path.is_file():
                raise HFFormatError(f"{path}: missing (named by the shard index)")
            total += path.stat().length
        part, digests[name] = reader(path)
        twice = sorted(set(part) & set(tensors))
        if twice:
            raise HFFormatError(
                f"{path}: holds {', '.join(twice[:4])} again (also in another shard)"
            )
        tensors.update(part)
    if not tensors:
        raise HFFormatError(f"{directory / files[0]}: holds no tensors")
    return HFWeights(tensors, digests, total)


def write_safetensors(path: Any, tensors: Mapping[str, np.ndarray]) -> None:
    """``tensors`` as a safetensors file (metadata format 'pt', what transformers expects)."""
    from safetensors.numpy import save

    from mae_jax._files import atomic_write

    atomic_write(
        path,
        save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata={"format": "pt"}),
    )


# ----------------------------------------------------------------------------------------------
# Official state_dict <-> HF tensors


@dataclass
class Spelling:
    """How a directory's files spell their keys."""

    prefix: str  # "vit." (ViTMAEForPreTraining) or "" (ViTMAEModel)
    legacy: bool  # transformers 4's block names (what the hub's files and save_pretrained hold)
    decoder_blocks: str  # the decoder's block list: decoder.decoder_layers. (or transformers 5's
    # save_pretrained's decoder.decoder_encoder.layer.)

    @property
    def name(self) -> str:
        """For messages and the metadata."""
        if not self.legacy:
            return "transformers 5 in-memory"
        if self.decoder_blocks != "decoder.decoder_layers.":
            return "transformers 5 save_pretrained"
        return "transformers 4"


def spelling_of(keys: list[str]) -> Spelling:
    """The spelling the keys use (the prefix of a ViTMAEForPreTraining; old or new block names)."""
    prefix = "vit." if any(k.startswith("vit.") for k in keys) else ""
    legacy = any(
        k.removeprefix(prefix).startswith("encoder.layer.")
        or any(f".{old}" in k for old, _ in _FILE_IN_BLOCK)
        for k in keys
    )
    quirk = "decoder.decoder_encoder.layer."
    decoder_blocks = (
        quirk if legacy and any(k.startswith(quirk) for k in keys) else "decoder.decoder_layers."
    )
    return Spelling(prefix, legacy, decoder_blocks)


def expected_keys(
    official_shapes: Mapping[str, tuple[int, ...]], spelling: Spelling
) -> dict[str, tuple[str, int | None, tuple[int, ...]]]:
    """{file key: (official key, third of qkv or None, shape)} of a model whose official keys and
    shapes are ``official_shapes``, spelled as ``spelling``."""
    expected = {}
    for official, shape in official_shapes.items():
        for hf, third in hf_names(official, prefix=spelling.prefix):
            key = file_name(hf, spelling.decoder_blocks) if spelling.legacy else hf
            part = shape if third is None else (shape[0] // 3, *shape[1:])
            expected[key] = (official, third, tuple(part))
    return expected


def check_keys(
    tensors: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[str, int | None, tuple[int, ...]]],
) -> None:
    """HFFormatError (without the file name) listing '+ unexpected', '- missing' and '! shape'
    keys of ``tensors`` against ``expected`` (see ``expected_keys``), unless they agree."""
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    mismatched = [
        f"{k}: {tuple(tensors[k].shape)} in the weights, config.json gives {expected[k][2]}"
        for k in expected
        if k in tensors and tuple(tensors[k].shape) != expected[k][2]
    ]
    if missing or unexpected or mismatched:
        raise HFFormatError(
            mapping.key_mismatch(unexpected, missing, mismatched, against="config.json")
        )


def official_from_hf(
    tensors: dict[str, np.ndarray],
    expected: Mapping[str, tuple[str, int | None, tuple[int, ...]]],
) -> dict[str, np.ndarray]:
    """The official state_dict of checked HF tensors (``check_keys``): q, k and v stacked into
    qkv, the rest renamed; each source entry is removed from ``tensors`` once used."""
    thirds: dict[str, list] = {}
    out: dict[str, np.ndarray] = {}
    for key, (official, third, _) in expected.items():
        value = tensors.pop(key)
        if third is None:
            out[official] = value
        else:
            parts = thirds.setdefault(official, [None, None, None])
            parts[third] = value
            if all(p is not None for p in parts):
                out[official] = np.concatenate(parts, axis=0)
                del thirds[official]
    return out


def hf_from_official(state_dict: Mapping[str, np.ndarray], *, prefix: str) -> dict[str, np.ndarray]:
    """HF tensors (transformers 4's spelling, as files hold them) of an official state_dict."""
    out = {}
    for official, value in state_dict.items():
        names = hf_names(official, prefix=prefix)
        for hf, third in names:
            if third is None:
                out[file_name(hf)] = value
            else:
                rows = value.shape[0] // 3
                out[file_name(hf)] = np.ascontiguousarray(value[third * rows : (third + 1) * rows])
    return out


def local_copy(directory: Any, into: str) -> str:
    """``directory`` itself when local; else its config and weight files copied into ``into``."""
    from mae_jax._files import copy_file, is_url

    if not is_url(directory):
        return os.fspath(directory)
    source = run_path(directory)
    with naming(source):
        names = [
            p.name for p in source.iterdir() if p.name.endswith((".json", ".safetensors", ".bin"))
        ]
    for name in names:
        copy_file(source / name, os.path.join(into, name))
    return into
