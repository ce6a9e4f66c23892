"""The name table between the official PyTorch state_dict and the mae-jax parameter tree.

Names match segment for segment (``blocks.3.attn.qkv.weight`` is ``blocks/3/attn/qkv/kernel``);
only the leaf names and the value layouts differ, by these rules:

    Linear weight  [out, in]           <-> kernel [in, out]          (transpose)
    Conv weight    [out, in, kh, kw]   <-> kernel [kh, kw, in, out]  (permute 2, 3, 1, 0)
    LayerNorm      weight              <-> scale                     (copy)
    everything else (biases, cls_token, mask_token, position tables)  (copy)

This module also recognizes which official family a state_dict belongs to and infers the
architecture from its tensor shapes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from mae_jax.config import PRESETS, VIT_PRESETS, MAEConfig, ViTConfig, parse_setting

Path = tuple  # a path in the model's state tree, e.g. ('blocks', 3, 'attn', 'qkv', 'kernel')

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight"}


class MappingError(ValueError):
    """A state_dict that does not fit the model: the message lists what is wrong."""


def official_key(path: Path) -> str:
    """('blocks', 3, 'norm1', 'scale') -> 'blocks.3.norm1.weight'."""
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, _LEAF_TO_TORCH.get(leaf, leaf)])


def to_official(path: Path, value: np.ndarray) -> np.ndarray:
    """A mae-jax value -> the official tensor layout."""
    if path[-1] == "kernel":
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T)
    return np.asarray(value)


def from_official(path: Path, value: np.ndarray) -> np.ndarray:
    """An official tensor -> the mae-jax layout of the parameter at ``path``."""
    if path[-1] == "kernel":
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T)
    return np.asarray(value)


@dataclass
class Report:
    """What a conversion used and left out."""

    ignored: list[str] = field(default_factory=list)
    filled_by_default: list[str] = field(default_factory=list)


def official_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The official tensor shape of the mae-jax leaf at ``path`` of ``shape``."""
    if path[-1] == "kernel":
        order = (3, 2, 0, 1) if len(shape) == 4 else tuple(reversed(range(len(shape))))
        return tuple(shape[i] for i in order)
    return tuple(shape)


def key_mismatch(
    unexpected: list[str], missing: list[str], mismatched: list[str], against: str = ""
) -> str:
    """One line on keys that do not fit (``against`` what, if said): the counts, then the first
    12 keys (+ unexpected, - missing, ! shape)."""
    parts = [f"+ unexpected {k}" for k in unexpected] + [f"- missing {k}" for k in missing]
    parts += [f"! shape {m}" for m in mismatched]
    shown = "; ".join(parts[:12]) + (f"; ... ({len(parts) - 12} more)" if len(parts) > 12 else "")
    return (
        f"{len(unexpected)} unexpected, {len(missing)} missing, {len(mismatched)} mis-shaped "
        f"keys{f' against {against}' if against else ''}: {shown}"
    )


def state_from_official(
    state_dict: MutableMapping[str, np.ndarray],
    target: Mapping,
    *,
    ignore: tuple[str, ...] = (),
    defaults: Mapping[str, np.ndarray] | None = None,
    finish: Callable[[np.ndarray], Any] | None = None,
    consume: bool = False,
    reuse: bool = False,
) -> tuple[dict, Report]:
    """Fill the nested ``target`` tree (arrays or shape structs) from an official state_dict.

    Strict: every source key is used or matched by a regex in ``ignore``; every target leaf is
    filled (from the source, or from ``defaults`` keyed by official name); every shape is checked.
    Raises MappingError listing '+ unexpected', '- missing' and '! shape' keys, before any value
    is converted. Then values are converted one at a time: ``finish`` (e.g. ``jnp.asarray``) is
    applied to each, and with ``consume`` each source entry is removed from ``state_dict`` once
    converted, so that a whole model is never held twice.

    ``reuse`` (with ``consume``): the caller holds no other reference to the source arrays, so the
    memory of a consumed kernel is reused for the transposed copy of the next kernel of the same
    size (only sources that are the sole user of their buffer). Memory never touched before costs
    a page fault per 4 KiB, which made up most of the time of converting a model.
    """
    report = Report()
    defaults = dict(defaults or {})
    flat_target = flatten_dict(target)
    sources, missing, mismatched, used = {}, [], [], set()
    for path, leaf in flat_target.items():
        key = official_key(path)
        if key in state_dict:
            used.add(key)
            have = tuple(np.shape(state_dict[key]))
        elif key in defaults:
            have = tuple(np.shape(defaults[key]))
            report.filled_by_default.append(key)
        else:
            missing.append(key)
            continue
        want = official_shape(path, tuple(leaf.shape))
        if have != want:
            mismatched.append(f"{key}: {have} in file, model needs {want}")
            continue
        sources[path] = key
    unexpected = []
    for key in state_dict:
        if key in used:
            continue
        if any(re.fullmatch(pattern, key) for pattern in ignore):
            report.ignored.append(key)
        else:
            unexpected.append(key)
    if missing or unexpected or mismatched:
        raise MappingError(key_mismatch(unexpected, missing, mismatched))
    out = {}
    spare = _SpareBuffers(state_dict) if reuse and consume else None
    for path, key in sources.items():
        if key not in state_dict:
            source = defaults[key]
        else:
            source = state_dict.pop(key) if consume else state_dict[key]
        dtype = np.dtype(flat_target[path].dtype)
        source = np.asarray(source)
        if path[-1] == "kernel" and source.ndim in (2, 4) and source.dtype == dtype:
            value = _permute(source, (2, 3, 1, 0), spare)
        else:
            value = from_official(path, source).astype(dtype, copy=False)
        del source
        out[path] = value if finish is None else finish(value)
        del value
    return unflatten_dict(out), report


# Source rows per step of a 2-D transpose: the fastest measured here (2-4x a plain np.copyto).
_TRANSPOSE_ROWS = 8


def _permute(
    source: np.ndarray, conv_axes: tuple, spare: _SpareBuffers | None = None
) -> np.ndarray:
    """``source`` transposed (2-D) or permuted by ``conv_axes`` (4-D) into a spare buffer of its
    size (then ``source``'s own buffer becomes spare) or a new array."""
    axes = conv_axes if source.ndim == 4 else tuple(reversed(range(source.ndim)))
    shape = tuple(source.shape[a] for a in axes)
    into = None if spare is None else spare.take(shape, source.dtype)
    if into is None:
        into = _new_array(shape, source.dtype)
    if source.ndim == 2:
        # In short blocks of rows: numpy copies a transposed view element by element, and a few
        # source rows stay in cache while their columns are written.
        rows = _TRANSPOSE_ROWS
        for i in range(0, source.shape[0], rows):
            into[:, i : i + rows] = source[i : i + rows].T
    else:
        np.copyto(into, source.transpose(axes))
    if spare is not None:
        spare.give(source)
    return into


def _new_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialized C-contiguous array; a large one in 4 KiB pages of its own mapping.

    NumPy asks for transparent huge pages for large arrays; touching such new memory was up to 4x
    slower here (the kernel compacts memory to find 2 MiB pages).
    """
    from .pth_io import _new_buffer

    return _new_buffer(math.prod(shape) * np.dtype(dtype).itemsize).view(dtype).reshape(shape)


class _SpareBuffers:
    """Buffers of consumed kernels, by byte size, to hold the next kernels' transposed copies."""

    def __init__(self, sources: Mapping[Any, Any]):
        # How many source arrays use each buffer: one shared with another entry is never reused.
        self._users: dict[int, int] = {}
        for value in sources.values():
            if isinstance(value, np.ndarray):
                root = id(_root(value))
                self._users[root] = self._users.get(root, 0) + 1
        self._free: dict[int, list[np.ndarray]] = {}

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        free = self._free.get(math.prod(shape) * dtype.itemsize)
        return free.pop().view(dtype).reshape(shape) if free else None

    def give(self, source: np.ndarray) -> None:
        root = _root(source)
        if (
            self._users.get(id(root)) == 1
            and root.flags.c_contiguous
            and root.flags.writeable
            and root.nbytes == source.nbytes
            and source.flags.c_contiguous
        ):
            self._free.setdefault(root.nbytes, []).append(root.reshape(-1).view(np.uint8))


def _root(array: np.ndarray) -> np.ndarray:
    """The array at the bottom of a chain of views (the one that owns, or wraps, the memory)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def official_from_state(state: Mapping) -> dict[str, np.ndarray]:
    """A model's nested state -> an official-layout state_dict, in the official key order."""
    flat = {official_key(p): to_official(p, np.asarray(v)) for p, v in flatten_dict(state).items()}
    return in_official_order(flat)


def official_from_state_consuming(flat: dict[Path, Any]) -> dict[str, np.ndarray]:
    """``official_from_state`` of a flat state ({path: host array}) that is emptied as it goes.

    Each entry is removed once converted, and a kernel is transposed into the memory of an
    earlier consumed kernel of the same size where that memory is its alone (see
    ``state_from_official``'s ``reuse``): the caller must hold no other reference to the arrays.
    """
    spare = _SpareBuffers(flat)
    out = {}
    for path in list(flat):
        value = np.asarray(flat.pop(path))
        if path[-1] == "kernel" and value.ndim in (2, 4):
            result = _permute(value, (3, 2, 0, 1), spare)
        else:
            result = to_official(path, value)
        del value
        out[official_key(path)] = result
    return in_official_order(out)


def in_official_order(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The same entries in the order of the official model's state_dict."""
    return dict(sorted(state_dict.items(), key=lambda kv: _official_order(kv[0])))


_TOP_ORDER = (
    "cls_token",
    "pos_embed",
    "mask_token",
    "decoder_pos_embed",
    "patch_embed",
    "blocks",
    "norm",
    "head",
    "fc_norm",  # registered after the head in models_vit, so it comes last in its state_dict
    "decoder_embed",
    "decoder_blocks",
    "decoder_norm",
    "decoder_pred",
)
_BLOCK_ORDER = tuple(
    f"{layer}.{leaf}"
    for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    for leaf in ("weight", "bias")
)


def _official_order(key: str) -> tuple:
    """Sort key giving the official state_dict order (tokens, tables, patch_embed, blocks, ...)."""
    top, _, rest = key.partition(".")
    rank = _TOP_ORDER.index(top) if top in _TOP_ORDER else len(_TOP_ORDER)
    index, _, suffix = rest.partition(".") if rest[:1].isdigit() else ("-1", "", rest)
    if suffix in _BLOCK_ORDER:
        within = _BLOCK_ORDER.index(suffix)
    else:
        within = 1 if suffix.endswith("bias") else 0
    return (rank, int(index), within, suffix)


# --------------------------------------------------------------------------- families


FAMILY_MAE = "mae"  # encoder and decoder: the visualize and *_full files
FAMILY_ENCODER = "mae_encoder"  # encoder only: the mae_pretrain_vit_*.pth files
FAMILY_CLASSIFIER = "classifier"  # fine-tuned models_vit classifiers (fc_norm or norm, head)

FAMILY_HELP = {
    FAMILY_MAE: "an MAE with its decoder (mae_visualize_vit_*.pth or mae_pretrain_vit_*_full.pth)",
    FAMILY_ENCODER: "an encoder-only MAE pretraining checkpoint (mae_pretrain_vit_*.pth): no decoder",
    FAMILY_CLASSIFIER: "a fine-tuned classifier (mae_finetuned_vit_*.pth): encoder, pooling norm and head",
}


def detect_family(state_dict: Mapping[str, np.ndarray]) -> str:
    """Which official family a state_dict belongs to; MappingError if it is none of them."""
    keys = set(state_dict)
    if "head.weight" in keys:
        return FAMILY_CLASSIFIER
    if "patch_embed.proj.weight" not in keys or "cls_token" not in keys or "pos_embed" not in keys:
        raise MappingError(
            "not an MAE or ViT state_dict (no patch_embed.proj.weight / cls_token / pos_embed)"
        )
    if any(k.startswith(("decoder_", "mask_token")) for k in keys):
        return FAMILY_MAE
    return FAMILY_ENCODER


def _count_blocks(keys, prefix: str) -> int:
    ids = {int(m.group(1)) for k in keys if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def classifier_pooling(state_dict: Mapping[str, np.ndarray]) -> bool:
    """True for a global-pool classifier (fc_norm), False for a cls-token one (norm)."""
    has_fc_norm, has_norm = "fc_norm.weight" in state_dict, "norm.weight" in state_dict
    if has_fc_norm == has_norm:
        which = "both" if has_norm else "neither"
        raise MappingError(
            f"classifier with {which} fc_norm.weight and norm.weight: cannot tell global pool "
            "(fc_norm) from cls-token pooling (norm)"
        )
    return has_fc_norm


# The sizes that identify an architecture; a file whose sizes all equal a preset's is that preset's
# architecture, up to what shapes cannot show (the head counts). The image size, the class count and
# the pooling may differ from the preset's.
_IDENTITY_FIELDS = (
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "mlp_ratio",
    "decoder_embed_dim",
    "decoder_depth",
)


def read_sizes(state_dict: Mapping[str, np.ndarray], family: str) -> dict:
    """Every config field that the tensor shapes determine, read from them.

    Image size from the position table, patch size and channels from the patch embedding, widths,
    depths and the MLP ratio from the blocks; for a classifier the class count and the pooling.
    """
    proj = state_dict["patch_embed.proj.weight"]
    if proj.ndim != 4 or proj.shape[2] != proj.shape[3]:
        raise MappingError(
            f"patch_embed.proj.weight has shape {tuple(proj.shape)}, not [width, channels, p, p]"
        )
    embed_dim, in_chans, patch_size, _ = (int(x) for x in proj.shape)
    num_patches = state_dict["pos_embed"].shape[1] - 1
    grid = int(round(num_patches**0.5))
    if grid * grid != num_patches:
        raise MappingError(f"pos_embed has {num_patches} patch rows, not a square grid")
    sizes: dict = {
        "img_size": grid * patch_size,
        "patch_size": patch_size,
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "depth": _count_blocks(state_dict, "blocks"),
    }
    if "blocks.0.mlp.fc1.weight" in state_dict:
        sizes["mlp_ratio"] = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    if family == FAMILY_MAE:
        sizes["decoder_embed_dim"] = int(state_dict["decoder_embed.weight"].shape[0])
        sizes["decoder_depth"] = _count_blocks(state_dict, "decoder_blocks")
        fc1 = state_dict.get("decoder_blocks.0.mlp.fc1.weight")
        ratio = None if fc1 is None else fc1.shape[0] / sizes["decoder_embed_dim"]
        if ratio is not None and "mlp_ratio" in sizes and ratio != sizes["mlp_ratio"]:
            raise MappingError(
                f"decoder MLP ratio {ratio:g} differs from the encoder's {sizes['mlp_ratio']:g}; "
                "the official MaskedAutoencoderViT (and mae-jax) use one mlp_ratio for both"
            )
    if family == FAMILY_CLASSIFIER:
        head = state_dict["head.weight"]
        if head.ndim != 2 or head.shape[1] != embed_dim:
            raise MappingError(
                f"head.weight has shape {tuple(head.shape)}, not [classes, {embed_dim}]"
            )
        sizes.update(num_classes=int(head.shape[0]), global_pool=classifier_pooling(state_dict))
    return sizes


def parse_settings(pairs: list[str], cls: type) -> dict:
    """``["num_heads=3", ...]`` -> {field: value}, typed as ``cls``'s fields; MappingError if bad."""
    defaults = cls().to_dict()
    settings: dict = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or key not in defaults:
            raise MappingError(
                f"--set {pair}: expected KEY=VALUE with KEY one of {', '.join(defaults)}"
            )
        try:
            settings[key] = parse_setting(key, text.strip(), type(defaults[key]).__name__)
        except ValueError as err:
            raise MappingError(str(err)) from None
    return settings


@dataclass
class Inferred:
    """What ``infer_config`` found: the config, the preset of the same sizes, how heads were set."""

    config: MAEConfig | ViTConfig
    preset: str | None  # the preset whose sizes the file has (None: a custom size)
    heads: str  # "given" (--set) or "assumed from <preset>"


def infer_config(
    state_dict: Mapping[str, np.ndarray], family: str, settings: Mapping | None = None
) -> Inferred:
    """The full config of a state_dict: sizes from the shapes, head counts from ``settings``.

    ``settings`` are config fields (``num_heads``, ``decoder_num_heads``, or any other, which is
    checked against the shapes when they determine it). Head counts not given are taken from the
    preset with the same sizes, and said so; with no such preset the file is refused.
    A classifier's config is a ``ViTConfig``; an MAE's (with or without decoder) an ``MAEConfig``.
    """
    settings = dict(settings or {})
    classifier = family == FAMILY_CLASSIFIER
    cls = ViTConfig if classifier else MAEConfig
    presets: Mapping[str, MAEConfig | ViTConfig] = VIT_PRESETS if classifier else PRESETS
    sizes = read_sizes(state_dict, family)
    fields = set(cls().to_dict())
    for key, value in settings.items():
        if key not in fields:
            raise MappingError(f"--set {key}: not a {cls.__name__} field")
        if key in sizes and value != sizes[key]:
            raise MappingError(
                f"--set {key}={value} disagrees with the file, whose shapes give {key} {sizes[key]}"
            )
    identity = {k: v for k, v in sizes.items() if k in _IDENTITY_FIELDS}
    match = next(
        (
            name
            for name, p in presets.items()
            if all(getattr(p, k) == v for k, v in identity.items())
        ),
        None,
    )
    head_fields = ["num_heads"] if family != FAMILY_MAE else ["num_heads", "decoder_num_heads"]
    missing = [k for k in head_fields if k not in settings]
    if missing and match is None:
        shown = ", ".join(
            f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in sizes.items()
        )
        flags = " ".join(f"--set {k}=N" for k in head_fields)
        raise MappingError(
            f"sizes read ({shown}) fit no preset, and head counts cannot be read from shapes: "
            f"give them with {flags}"
        )
    base = presets[match] if match is not None else cls()
    heads = "given" if not missing else f"assumed from {match}"
    if missing and len(missing) < len(head_fields):
        heads = f"{missing[0]} assumed from {match}"
    try:
        config = base.replace(**{**sizes, **settings})  # a setting may repeat a size
    except (ValueError, TypeError) as err:
        raise MappingError(str(err)) from None
    return Inferred(config, match, heads)


def check_arch(arch: str, sizes: Mapping, config_cls: type) -> None:
    """MappingError when the preset ``arch`` disagrees with the sizes read from the shapes."""
    presets: Mapping[str, MAEConfig | ViTConfig] = (
        VIT_PRESETS if config_cls is ViTConfig else PRESETS
    )
    if arch not in presets:
        holds = "a classifier" if presets is VIT_PRESETS else "an MAE"
        raise MappingError(
            f"unknown --arch {arch!r} for {holds}; known presets: {', '.join(presets)}"
        )
    want = presets[arch]
    diffs = [
        f"{f} {sizes[f]} in the file, {getattr(want, f)} in {arch}"
        for f in _IDENTITY_FIELDS
        if f in sizes and sizes[f] != getattr(want, f)
    ]
    if diffs:
        raise MappingError(f"--arch {arch} does not fit the file: " + "; ".join(diffs))
