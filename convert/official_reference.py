"""Run the user's own clone of facebookresearch/mae under today's libraries and record every stage.

The official ``models_mae.py`` (commit efb2a80) was written for timm 0.3.2 and numpy < 1.24. Two
things break today, and both are bridged here for the duration of one call, without editing the
user's files (no bytecode is written into the clone either):

- ``Block(..., qk_scale=None, ...)``: timm >= 0.6 has no ``qk_scale`` and raises TypeError. While
  the model is built, ``models_mae.Block`` is a wrapper that drops ``qk_scale=None``.
- ``util/pos_embed.py`` uses ``np.float`` (float64), removed in numpy 1.24: the alias exists only
  while the model is built.

The masking noise drawn inside ``random_masking`` (``torch.rand(N, L)``) is replaced by the given
noise during the forward pass, so the run is comparable with the goldens and with HF.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from mae_jax.config import MAEConfig

from .hf_reference import (
    STAGES,
    StageRecorder,
    as_float32_tensor,
    check_inputs,
    check_state_dict,
    exact_float32,
    to_numpy,
)

# Top-level modules of the official repository that a second repository would collide with.
_REPO_MODULES = ("models_mae", "util")


class OfficialRepoError(RuntimeError):
    """The official repository cannot be imported, built or run."""


def official_model_kwargs(config: MAEConfig) -> dict[str, Any]:
    """Kwargs of the official ``MaskedAutoencoderViT`` class (as ``arch``) for ``config``."""
    return dict(
        img_size=config.img_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        decoder_embed_dim=config.decoder_embed_dim,
        decoder_depth=config.decoder_depth,
        decoder_num_heads=config.decoder_num_heads,
        mlp_ratio=config.mlp_ratio,
        norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_eps),
        norm_pix_loss=config.norm_pix_loss,
    )


def _is_repo_module(name: str) -> bool:
    return any(name == top or name.startswith(top + ".") for top in _REPO_MODULES)


@contextlib.contextmanager
def _imported_from(repo: Path) -> Iterator[ModuleType]:
    """``models_mae`` imported from ``repo``; sys.path and sys.modules restored afterwards."""
    saved = {name: mod for name, mod in sys.modules.items() if _is_repo_module(name)}
    for name in saved:
        del sys.modules[name]
    saved_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # leave the user's clone as it was: no __pycache__
    sys.path.insert(0, str(repo))
    try:
        # util/ has no __init__.py in the official repo (a namespace package), and a regular
        # package called `util` anywhere on sys.path would win over it: bind it to the repo first.
        spec = importlib.machinery.PathFinder.find_spec("util", [str(repo)])
        if spec is not None:
            util = importlib.util.module_from_spec(spec)
            sys.modules["util"] = util
            if spec.loader is not None:
                spec.loader.exec_module(util)
        try:
            models_mae = importlib.import_module("models_mae")
        except Exception as e:
            raise OfficialRepoError(
                f"{repo / 'models_mae.py'} could not be imported: {type(e).__name__}: {e}"
            ) from e
        yield models_mae
    finally:
        for name in [n for n in sys.modules if _is_repo_module(n)]:
            del sys.modules[name]
        sys.modules.update(saved)
        sys.path.remove(str(repo))
        sys.dont_write_bytecode = saved_bytecode


@contextlib.contextmanager
def _numpy_float_alias() -> Iterator[None]:
    """``np.float`` (= builtin float, i.e. float64) while the official pos-embed code runs."""
    added = not hasattr(np, "float")
    if added:
        np.float = float
    try:
        yield
    finally:
        if added:
            del np.float


def _tolerating_qk_scale(block_cls: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """``block_cls`` if it takes ``qk_scale``, else a builder that drops ``qk_scale=None``."""
    if "qk_scale" in inspect.signature(block_cls).parameters:
        return block_cls

    def build(*args: Any, qk_scale: float | None = None, **kwargs: Any) -> nn.Module:
        if qk_scale is not None:  # a real scale would change the model: refuse, don't drop it
            raise OfficialRepoError(f"this timm's Block has no qk_scale; got qk_scale={qk_scale}")
        return block_cls(*args, **kwargs)

    return build


def _build(models_mae: ModuleType, arch: str, kwargs: Mapping[str, Any], repo: Path) -> nn.Module:
    factory = getattr(models_mae, arch, None)
    if not callable(factory):
        known = sorted(
            n for n in vars(models_mae) if n.startswith("mae_") or n == "MaskedAutoencoderViT"
        )
        raise OfficialRepoError(
            f"{repo / 'models_mae.py'} has no model {arch!r}; it has: {', '.join(known)}"
        )
    original_block = getattr(models_mae, "Block", None)
    if original_block is not None:
        models_mae.Block = _tolerating_qk_scale(original_block)
    try:
        with _numpy_float_alias():
            return factory(**kwargs)
    except OfficialRepoError:
        raise
    except Exception as e:
        raise OfficialRepoError(
            f"{arch}(**{{{', '.join(sorted(kwargs))}}}) from {repo / 'models_mae.py'} failed: "
            f"{type(e).__name__}: {e}"
        ) from e
    finally:
        if original_block is not None:
            models_mae.Block = original_block


@contextlib.contextmanager
def _torch_rand_returning(noise: torch.Tensor) -> Iterator[list[int]]:
    """While active, ``torch.rand`` of the noise shape returns a copy of ``noise`` (counted)."""
    original = torch.rand
    draws = [0]

    def rand(*size: Any, **kwargs: Any) -> torch.Tensor:
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
        if tuple(shape) != tuple(noise.shape):
            return original(*size, **kwargs)
        draws[0] += 1
        return noise.to(device=kwargs.get("device") or noise.device, copy=True)

    torch.rand = rand
    try:
        yield draws
    finally:
        torch.rand = original


def _first(size: int | tuple[int, ...]) -> int:
    return size[0] if isinstance(size, (tuple, list)) else size


def official_mae_forward(
    repo: str | os.PathLike,
    arch: str,
    state_dict: Mapping[str, np.ndarray],
    imgs_nchw: np.ndarray,
    noise: np.ndarray,
    *,
    mask_ratio: float,
    norm_pix_loss: bool,
    device: str = "cpu",
    model_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """The official MAE from the clone at ``repo``: imgs (N,C,H,W), noise (N,L) -> STAGES.

    ``arch`` is a factory of its models_mae.py (``mae_vit_base_patch16``...) called with
    ``model_kwargs``, or ``"MaskedAutoencoderViT"`` with ``official_model_kwargs(config)`` for a
    custom size. Stages and shapes are those of ``convert.hf_reference.hf_mae_forward``.
    """
    repo = Path(repo).expanduser().resolve()
    if not (repo / "models_mae.py").is_file():
        raise OfficialRepoError(
            f"{repo}: no models_mae.py here; expected a clone of facebookresearch/mae"
        )
    try:
        importlib.import_module("timm.models.vision_transformer")
    except Exception as e:  # timm can fail with RuntimeError too, through a broken torchvision
        raise OfficialRepoError(
            f"timm is not importable ({type(e).__name__}: {e}); the official models_mae.py needs it"
        ) from e

    with _imported_from(repo) as models_mae:
        model = _build(models_mae, arch, dict(model_kwargs or {}), repo)
        model.norm_pix_loss = norm_pix_loss
        # timm >= 0.9 attention takes a fused SDPA kernel by default; its explicit path rounds
        # like timm 0.3.2, which made the goldens.
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
        check_state_dict(
            state_dict,
            {k: tuple(v.shape) for k, v in model.state_dict().items()},
            what=f"state_dict vs {arch} of {repo}",
        )
        model.load_state_dict({k: as_float32_tensor(v) for k, v in state_dict.items()}, strict=True)
        model = model.to(device=device, dtype=torch.float32).eval()

        patch_embed = model.patch_embed
        check_inputs(
            imgs_nchw,
            noise,
            img_size=_first(patch_embed.img_size),
            in_chans=patch_embed.proj.in_channels,
            num_patches=patch_embed.num_patches,
        )
        imgs = torch.from_numpy(np.array(imgs_nchw, np.float32)).to(device)
        noise_t = torch.from_numpy(np.array(noise, np.float32)).to(device)

        with (
            exact_float32(device),
            torch.no_grad(),
            StageRecorder() as rec,
            _torch_rand_returning(noise_t) as draws,
        ):
            rec.output(patch_embed, "patch_embed")
            rec.input(model.blocks[0] if len(model.blocks) else model.norm, "enc_in")
            for block in model.blocks:
                rec.output(block, "enc_blocks")
            rec.output(model.norm, "latent")
            rec.output(model.decoder_embed, "dec_embed")
            decoder_blocks = model.decoder_blocks
            rec.input(decoder_blocks[0] if len(decoder_blocks) else model.decoder_norm, "dec_in")
            for block in decoder_blocks:
                rec.output(block, "dec_blocks")
            rec.output(model.decoder_norm, "dec_norm")

            latent, mask, ids_restore = model.forward_encoder(imgs, mask_ratio)
            pred = model.forward_decoder(latent, ids_restore)
            loss = model.forward_loss(imgs, pred, mask)
        if draws[0] != 1:
            raise OfficialRepoError(
                f"{repo / 'models_mae.py'}: the forward pass drew torch.rand{tuple(noise_t.shape)} "
                f"{draws[0]} times, expected once (in random_masking); cannot inject the noise"
            )

    enc_in = rec.one("enc_in")
    dec_in = rec.one("dec_in")
    stages = {
        "patch_embed": rec.one("patch_embed"),
        "x_masked": enc_in[:, 1:],
        "enc_in": enc_in,
        "enc_blocks": rec.stacked("enc_blocks", like=enc_in),
        "latent": to_numpy(latent),
        "mask": to_numpy(mask),
        "ids_restore": to_numpy(ids_restore),
        "dec_embed": rec.one("dec_embed"),
        "dec_in": dec_in,
        "dec_blocks": rec.stacked("dec_blocks", like=dec_in),
        "dec_norm": rec.one("dec_norm"),
        "pred": to_numpy(pred),
        "loss": to_numpy(loss).reshape(()),
    }
    return {name: stages[name] for name in STAGES}
