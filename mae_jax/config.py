"""Model configurations: frozen dataclasses with the official preset names."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, TypeVar

_C = TypeVar("_C", bound="_EncoderConfig")


def parse_setting(key: str, raw: str, type_name: str) -> Any:
    """The text of a ``--set key=value`` as a value of the field's type (``int``, ``float``,
    ``bool``, ``str``, ``tuple[float, ...]`` as comma-separated numbers; ``none`` for optional
    fields). ValueError naming the setting if invalid."""
    if raw.lower() in ("none", "null") and "None" in type_name:
        return None
    if type_name.startswith("tuple[float"):
        try:
            return tuple(float(part) for part in raw.split(","))
        except ValueError:
            raise ValueError(f"--set {key}={raw}: not comma-separated numbers") from None
    try:
        if type_name.startswith("bool"):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if type_name.startswith("int"):
            return int(raw)
        if type_name.startswith("float"):
            return float(raw)
    except ValueError:
        raise ValueError(f"--set {key}={raw}: not a valid {type_name}") from None
    return raw


@dataclasses.dataclass(frozen=True)
class _EncoderConfig:
    """The ViT encoder's sizes, shared by the MAE and the classifier, with JSON round trip.

    Field names follow the official constructors (``MaskedAutoencoderViT``, ``VisionTransformer``).
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
            )
        self._check_width(self.embed_dim, self.num_heads, "encoder")

    @staticmethod
    def _check_width(dim: int, heads: int, what: str) -> None:
        if dim % heads:
            raise ValueError(f"{what} width {dim} is not divisible by its {heads} heads")
        if dim % 4:
            raise ValueError(f"2-D sin-cos position embeddings need widths divisible by 4 ({what})")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def replace(self: _C, **changes: Any) -> _C:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls: type[_C], d: dict[str, Any]) -> _C:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls: type[_C], text: str) -> _C:
        return cls.from_dict(json.loads(text))


@dataclasses.dataclass(frozen=True)
class MAEConfig(_EncoderConfig):
    """Architecture of a masked autoencoder: the encoder, and the decoder used in pretraining."""

    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    norm_pix_loss: bool = False

    def __post_init__(self):
        super().__post_init__()
        self._check_width(self.decoder_embed_dim, self.decoder_num_heads, "decoder")

    @property
    def patch_dim(self) -> int:
        """Length of one patch vector: p * p * channels."""
        return self.patch_size**2 * self.in_chans


_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

# The three registered official architectures (models_mae.py), plus a tiny one for tests and demos
# that equals the golden `tiny_shared` model of the official code.
PRESETS: dict[str, MAEConfig] = {
    "mae_vit_base_patch16": MAEConfig(
        patch_size=16, embed_dim=768, depth=12, num_heads=12, **_DECODER
    ),
    "mae_vit_large_patch16": MAEConfig(
        patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_DECODER
    ),
    "mae_vit_huge_patch14": MAEConfig(
        patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_DECODER
    ),
    "mae_vit_tiny_patch4": MAEConfig(
        img_size=32,
        patch_size=4,
        embed_dim=64,
        depth=2,
        num_heads=4,
        decoder_embed_dim=48,
        decoder_depth=2,
        decoder_num_heads=3,
    ),
    # The small model that ships with the package for the offline demo (mae_jax/assets).
    "mae_demo_patch8": MAEConfig(
        img_size=64,
        patch_size=8,
        embed_dim=128,
        depth=4,
        num_heads=4,
        decoder_embed_dim=96,
        decoder_depth=2,
        decoder_num_heads=4,
    ),
}


def get_config(name: str, **overrides: Any) -> MAEConfig:
    """The preset ``name`` (an official name such as ``mae_vit_large_patch16``), with overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)


@dataclasses.dataclass(frozen=True)
class ViTConfig(_EncoderConfig):
    """Architecture of a fine-tuned ViT classifier (the official ``models_vit.VisionTransformer``).

    ``global_pool``: mean of the patch tokens then ``fc_norm`` (the fine-tuning default); otherwise
    the final ``norm`` and the cls token (the linear-probe default). ``drop_path_rate`` is the
    stochastic depth of the last block (it rises linearly from 0 over the blocks).
    """

    num_classes: int = 1000
    global_pool: bool = True
    drop_path_rate: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {self.num_classes}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


# The three registered official classifiers (models_vit.py) with the published fine-tuning
# recipe's drop path (FINETUNE.md: 0.1 / 0.2 / 0.3), plus a tiny one equal to the golden
# `vit_tiny_shared_gp` classifier of the official code.
VIT_PRESETS: dict[str, ViTConfig] = {
    "vit_base_patch16": ViTConfig(
        patch_size=16, embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.1
    ),
    "vit_large_patch16": ViTConfig(
        patch_size=16, embed_dim=1024, depth=24, num_heads=16, drop_path_rate=0.2
    ),
    "vit_huge_patch14": ViTConfig(
        patch_size=14, embed_dim=1280, depth=32, num_heads=16, drop_path_rate=0.3
    ),
    "vit_tiny_patch4": ViTConfig(
        img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=5
    ),
}


def get_vit_config(name: str, **overrides: Any) -> ViTConfig:
    """The classifier preset ``name`` (e.g. ``vit_base_patch16``), with overrides."""
    if name not in VIT_PRESETS:
        raise ValueError(f"unknown classifier preset {name!r}; known: {', '.join(VIT_PRESETS)}")
    return VIT_PRESETS[name].replace(**overrides)
