"""Hugging Face ``ViTMAE`` run on official-layout MAE weights: the independent PyTorch reference.

``hf_mae_forward`` maps an official ``MaskedAutoencoderViT`` state_dict onto
``ViTMAEForPreTraining`` (transformers >= 5), runs one forward pass with the given masking noise
and returns every intermediate stage under the names of the golden files (``STAGES``).
``hf_encoder_forward`` does the same for encoder-only checkpoints (the released
``mae_pretrain_vit_*.pth`` layout) and ``hf_classifier_forward`` for the fine-tuned classifier.

With ``attn="eager"`` HF reproduces the official code bit for bit on CPU
(see shared/reference/HF_VITMAE_MAPPING.md); the default SDPA kernel rounds differently (~2e-6).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel

from mae_jax.config import MAEConfig

from .hf_format import official_name

STAGES = (
    "patch_embed",
    "x_masked",
    "enc_in",
    "enc_blocks",
    "latent",
    "mask",
    "ids_restore",
    "dec_embed",
    "dec_in",
    "dec_blocks",
    "dec_norm",
    "pred",
    "loss",
)
ENCODER_STAGES = STAGES[:7]

# How many names an error message lists per category before it says "... and N more".
_MAX_LISTED = 12


class StateDictMismatchError(ValueError):
    """A state_dict does not have the keys or shapes the model needs."""


class ReferenceInputError(ValueError):
    """Images or noise that do not fit the model."""


def _listed(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def check_state_dict(
    given: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], *, what: str
) -> None:
    """Raise StateDictMismatchError naming every missing, unexpected and mis-shaped key."""
    missing = set(expected) - set(given)
    unexpected = set(given) - set(expected)
    wrong = [
        f"{k} {tuple(given[k].shape)} != {tuple(expected[k])}"
        for k in sorted(set(given) & set(expected))
        if tuple(given[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"- missing: {_listed(missing)}")
    if unexpected:
        problems.append(f"+ unexpected: {_listed(unexpected)}")
    if wrong:
        problems.append(f"shape (got != want): {'; '.join(wrong[:_MAX_LISTED])}")
    if problems:
        raise StateDictMismatchError(f"{what}: " + " | ".join(problems))


def as_float32_tensor(value: Any) -> torch.Tensor:
    """A float32 CPU tensor (own memory) from a numpy array or a tensor."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float32)
    return torch.from_numpy(np.array(value, dtype=np.float32, copy=True))


def load_official_into_hf(
    model: torch.nn.Module,
    state_dict: Mapping[str, Any],
    *,
    what: str,
    ignore_hf: tuple[str, ...] = (),
    also_expected: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Fill every tensor of an HF ViTMAE model from official keys, then load strictly.

    ``ignore_hf`` names HF keys with no official counterpart (they keep the model's own values);
    ``also_expected`` names official keys the caller uses itself: checked, not loaded.
    """
    target = model.state_dict()
    plan = {k: official_name(k) for k in target if k not in ignore_hf}
    expected = dict(also_expected or {})
    for hf_key, (name, third) in plan.items():
        shape = tuple(target[hf_key].shape)
        expected[name] = shape if third is None else (3 * shape[0], *shape[1:])
    check_state_dict(state_dict, expected, what=what)

    converted = {k: v for k, v in target.items() if k in ignore_hf}
    for hf_key, (name, third) in plan.items():
        tensor = as_float32_tensor(state_dict[name])
        if third is not None:
            rows = tensor.shape[0] // 3
            tensor = tensor[third * rows : (third + 1) * rows]
        converted[hf_key] = tensor.clone()
    model.load_state_dict(converted, strict=True)


# ----------------------------------------------------------------------------------------------
# Running a model and recording its stages.


def vitmae_config(
    config: MAEConfig, *, mask_ratio: float, norm_pix_loss: bool, attn: str = "eager"
) -> ViTMAEConfig:
    """The ViTMAEConfig of an official MAE architecture (eps, exact GELU, no dropout)."""
    return ViTMAEConfig(
        image_size=config.img_size,
        patch_size=config.patch_size,
        num_channels=config.in_chans,
        hidden_size=config.embed_dim,
        num_hidden_layers=config.depth,
        num_attention_heads=config.num_heads,
        intermediate_size=int(config.embed_dim * config.mlp_ratio),
        decoder_hidden_size=config.decoder_embed_dim,
        decoder_num_hidden_layers=config.decoder_depth,
        decoder_num_attention_heads=config.decoder_num_heads,
        decoder_intermediate_size=int(config.decoder_embed_dim * config.mlp_ratio),
        layer_norm_eps=config.layer_norm_eps,
        hidden_act="gelu",  # the exact erf form, as nn.GELU() in timm's Mlp
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        qkv_bias=True,
        mask_ratio=mask_ratio,
        norm_pix_loss=norm_pix_loss,
        attn_implementation=attn,
    )


@contextlib.contextmanager
def exact_float32(device: str | torch.device) -> Iterator[None]:
    """On CUDA, TF32 off for matmuls and cuDNN (restored afterwards): parity needs full fp32."""
    if torch.device(device).type != "cuda":
        yield
        return
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return _first_tensor(value[0])
    if isinstance(value, Mapping):
        return _first_tensor(next(iter(value.values())))  # also a transformers ModelOutput
    raise TypeError(f"no tensor in a {type(value).__name__}")


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """float -> float32, integer -> int64, on the host."""
    array = tensor.detach().cpu().numpy()
    return array.astype(np.int64 if np.issubdtype(array.dtype, np.integer) else np.float32)


class StageRecorder:
    """Forward hooks that keep the first tensor a module returns (or receives), by stage name."""

    def __init__(self) -> None:
        self.seen: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._handles: list[Any] = []

    def output(self, module: torch.nn.Module, stage: str) -> None:
        def hook(_module, _args, out):
            self.seen[stage].append(_first_tensor(out).detach())

        self._handles.append(module.register_forward_hook(hook))

    def input(self, module: torch.nn.Module, stage: str) -> None:
        def hook(_module, args, kwargs):
            self.seen[stage].append(_first_tensor(args if args else kwargs).detach())

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def one(self, stage: str) -> np.ndarray:
        """The single recording of ``stage``."""
        recorded = self.seen[stage]
        if len(recorded) != 1:
            raise RuntimeError(f"stage {stage!r} was recorded {len(recorded)} times, expected once")
        return to_numpy(recorded[0])

    def stacked(self, stage: str, like: np.ndarray) -> np.ndarray:
        """The recordings of ``stage`` stacked block-major, (num_blocks, *like.shape)."""
        recorded = [to_numpy(t) for t in self.seen[stage]]
        return np.stack(recorded) if recorded else np.zeros((0, *like.shape), np.float32)

    def __enter__(self) -> StageRecorder:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def check_inputs(
    imgs_nchw: np.ndarray,
    noise: np.ndarray | None,
    *,
    img_size: int,
    in_chans: int,
    num_patches: int,
) -> None:
    """Raise ReferenceInputError unless imgs are (N, C, H, W) at the model size and noise (N, L)."""
    imgs_shape = tuple(np.shape(imgs_nchw))
    want = (in_chans, img_size, img_size)
    if len(imgs_shape) != 4 or imgs_shape[1:] != want:
        raise ReferenceInputError(
            f"images have shape {imgs_shape}, expected (N, {', '.join(map(str, want))}) NCHW"
        )
    if noise is not None and tuple(np.shape(noise)) != (imgs_shape[0], num_patches):
        raise ReferenceInputError(
            f"noise has shape {tuple(np.shape(noise))}, "
            f"expected (N, L) = ({imgs_shape[0]}, {num_patches})"
        )


def _check_inputs_for(config: MAEConfig, imgs_nchw: np.ndarray, noise: np.ndarray | None) -> None:
    check_inputs(
        imgs_nchw,
        noise,
        img_size=config.img_size,
        in_chans=config.in_chans,
        num_patches=config.num_patches,
    )


def _tensor_on(array: np.ndarray, device: str, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True)).to(device=device, dtype=dtype)


def _record_encoder(recorder: StageRecorder, encoder: ViTMAEModel) -> None:
    recorder.output(encoder.embeddings.patch_embeddings, "patch_embed")
    recorder.output(encoder.embeddings, "enc_in")
    for layer in encoder.layers:
        recorder.output(layer, "enc_blocks")
    recorder.input(encoder.layernorm, "enc_out")
    recorder.output(encoder.layernorm, "latent")


def _encoder_stages(recorder: StageRecorder, mask, ids_restore) -> dict[str, np.ndarray]:
    enc_in = recorder.one("enc_in")
    return {
        "patch_embed": recorder.one("patch_embed"),
        "x_masked": enc_in[:, 1:],
        "enc_in": enc_in,
        "enc_blocks": recorder.stacked("enc_blocks", like=enc_in),
        "latent": recorder.one("latent"),
        "mask": to_numpy(mask),
        "ids_restore": to_numpy(ids_restore),
    }


def hf_mae_forward(
    state_dict: Mapping[str, np.ndarray],
    config: MAEConfig,
    imgs_nchw: np.ndarray,
    noise: np.ndarray,
    *,
    mask_ratio: float,
    norm_pix_loss: bool,
    attn: str = "eager",
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """HF ViTMAEForPreTraining on an official MAE state_dict: imgs (N,C,H,W), noise (N,L) -> STAGES.

    Shapes: patch_embed (N,L,D), x_masked (N,K,D), enc_in/latent (N,1+K,D), enc_blocks
    (depth,N,1+K,D), mask (N,L) 1=removed, ids_restore (N,L) int64, dec_embed (N,1+K,Dd),
    dec_in/dec_norm (N,1+L,Dd), dec_blocks (dec_depth,N,1+L,Dd), pred (N,L,p*p*C), loss ().
    """
    _check_inputs_for(config, imgs_nchw, noise)
    if "mask_token" not in state_dict and not any(k.startswith("decoder_") for k in state_dict):
        raise StateDictMismatchError(
            "MAE state_dict has no mask_token or decoder_* keys: an encoder-only checkpoint "
            "(use hf_encoder_forward)"
        )
    model = ViTMAEForPreTraining(
        vitmae_config(config, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss, attn=attn)
    )
    load_official_into_hf(model, state_dict, what="MAE state_dict vs ViTMAEForPreTraining")
    return _pretraining_stages(model, imgs_nchw, noise, device)


def _pretraining_stages(
    model: ViTMAEForPreTraining, imgs_nchw: np.ndarray, noise: np.ndarray, device: str
) -> dict[str, np.ndarray]:
    """STAGES of a loaded ViTMAEForPreTraining (its config's mask ratio and norm_pix_loss)."""
    model = model.to(device=device, dtype=torch.float32).eval()
    with exact_float32(device), torch.no_grad(), StageRecorder() as rec:
        _record_encoder(rec, model.vit)
        decoder = model.decoder
        rec.output(decoder.decoder_embed, "dec_embed")
        first = decoder.decoder_layers[0] if len(decoder.decoder_layers) else decoder.decoder_norm
        rec.input(first, "dec_in")
        for layer in decoder.decoder_layers:
            rec.output(layer, "dec_blocks")
        rec.output(decoder.decoder_norm, "dec_norm")
        out = model(pixel_values=_tensor_on(imgs_nchw, device), noise=_tensor_on(noise, device))

        stages = _encoder_stages(rec, out.mask, out.ids_restore)
        dec_in = rec.one("dec_in")
        stages.update(
            dec_embed=rec.one("dec_embed"),
            dec_in=dec_in,
            dec_blocks=rec.stacked("dec_blocks", like=dec_in),
            dec_norm=rec.one("dec_norm"),
            pred=to_numpy(out.logits),
            loss=to_numpy(out.loss).reshape(()),
        )
    return {name: stages[name] for name in STAGES}


def hf_encoder_forward(
    state_dict: Mapping[str, np.ndarray],
    config: MAEConfig,
    imgs_nchw: np.ndarray,
    noise: np.ndarray,
    *,
    mask_ratio: float,
    attn: str = "eager",
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """HF ViTMAEModel on an encoder-only state_dict: imgs (N,C,H,W), noise (N,L) -> ENCODER_STAGES.

    Same shapes as in ``hf_mae_forward``; the checkpoint has no decoder_* or mask_token keys.
    """
    _check_inputs_for(config, imgs_nchw, noise)
    model = ViTMAEModel(
        vitmae_config(config, mask_ratio=mask_ratio, norm_pix_loss=False, attn=attn)
    )
    load_official_into_hf(model, state_dict, what="encoder state_dict vs ViTMAEModel")
    return _encoder_only_stages(model, imgs_nchw, noise, device)


def _encoder_only_stages(
    model: ViTMAEModel, imgs_nchw: np.ndarray, noise: np.ndarray, device: str
) -> dict[str, np.ndarray]:
    """ENCODER_STAGES of a loaded ViTMAEModel (its config's mask ratio)."""
    model = model.to(device=device, dtype=torch.float32).eval()
    with exact_float32(device), torch.no_grad(), StageRecorder() as rec:
        _record_encoder(rec, model)
        out = model(pixel_values=_tensor_on(imgs_nchw, device), noise=_tensor_on(noise, device))
        stages = _encoder_stages(rec, out.mask, out.ids_restore)
    return {name: stages[name] for name in ENCODER_STAGES}


def hf_directory_forward(
    directory: str,
    imgs_nchw: np.ndarray,
    noise: np.ndarray,
    *,
    mask_ratio: float,
    with_decoder: bool,
    attn: str = "eager",
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """A local Hugging Face ViTMAE directory's own model (``from_pretrained``, every key loaded,
    its config as it is but the mask ratio): imgs (N,C,H,W), noise (N,L) -> STAGES, or with
    ``with_decoder`` False ENCODER_STAGES (of a ViTMAEModel directory, or of the encoder of a
    ViTMAEForPreTraining one)."""
    import json
    from pathlib import Path

    try:
        architectures = json.loads((Path(directory) / "config.json").read_text()).get(
            "architectures"
        ) or ["ViTMAEForPreTraining" if with_decoder else "ViTMAEModel"]
    except (OSError, ValueError, AttributeError) as e:
        raise StateDictMismatchError(f"{directory}/config.json: unreadable ({e})") from None
    cls = ViTMAEModel if architectures == ["ViTMAEModel"] else ViTMAEForPreTraining
    if with_decoder and cls is ViTMAEModel:
        raise StateDictMismatchError(
            f"{directory}: holds a ViTMAEModel (no decoder) and the checkpoint has a decoder; "
            "compare an encoder-only checkpoint with it"
        )
    try:
        model, info = cls.from_pretrained(
            directory, attn_implementation=attn, output_loading_info=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StateDictMismatchError(
            f"{directory}: transformers cannot load it ({first})"
        ) from None
    problems = [
        f"{what}: {_listed(info[what])}"
        for what in ("missing_keys", "unexpected_keys", "mismatched_keys")
        if info.get(what)
    ]
    if problems:
        raise StateDictMismatchError(
            f"{directory}: {cls.__name__}.from_pretrained: " + " | ".join(problems)
        )
    model.config.mask_ratio = mask_ratio
    config = model.config
    check_inputs(
        imgs_nchw,
        noise,
        img_size=config.image_size,
        in_chans=config.num_channels,
        num_patches=(config.image_size // config.patch_size) ** 2,
    )
    if with_decoder:
        return _pretraining_stages(model, imgs_nchw, noise, device)
    encoder = model.vit if cls is ViTMAEForPreTraining else model
    encoder.config.mask_ratio = mask_ratio
    return _encoder_only_stages(encoder, imgs_nchw, noise, device)


def hf_classifier_forward(
    state_dict: Mapping[str, np.ndarray],
    imgs_nchw: np.ndarray,
    *,
    embed_dim: int,
    depth: int,
    num_heads: int,
    patch_size: int,
    img_size: int,
    global_pool: bool,
    in_chans: int = 3,
    mlp_ratio: float = 4.0,
    layer_norm_eps: float = 1e-6,
    attn: str = "eager",
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """The fine-tuned ViT classifier run through HF ViTMAEModel: imgs (N,C,H,W) -> features, logits.

    Returns patch_embed (N,L,D), enc_in (N,1+L,D), enc_blocks (depth,N,1+L,D), features (N,D)
    (mean of patch tokens then fc_norm if ``global_pool``, else norm of the cls token) and
    logits (N,C). Mask ratio 0 with noise arange(L) keeps every token in its own order, so the
    encoder is the plain ViT; pooling, fc_norm and head are applied by hand.
    """
    config = MAEConfig(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        layer_norm_eps=layer_norm_eps,
    )
    _check_inputs_for(config, imgs_nchw, None)
    model = ViTMAEModel(vitmae_config(config, mask_ratio=0.0, norm_pix_loss=False, attn=attn))
    head_weight = state_dict.get("head.weight")
    num_classes = head_weight.shape[0] if head_weight is not None and head_weight.ndim == 2 else 0
    by_hand = {"head.weight": (num_classes, embed_dim), "head.bias": (num_classes,)}
    unused: tuple[str, ...] = ()
    if global_pool:
        # This classifier has fc_norm instead of the final norm, so vit.layernorm stays unused.
        by_hand.update({"fc_norm.weight": (embed_dim,), "fc_norm.bias": (embed_dim,)})
        unused = ("layernorm.weight", "layernorm.bias")
    load_official_into_hf(
        model,
        state_dict,
        what=f"classifier state_dict (global_pool={global_pool}) vs ViT",
        ignore_hf=unused,
        also_expected=by_hand,
    )
    model = model.to(device=device, dtype=torch.float32).eval()
    head = {k: as_float32_tensor(state_dict[k]).to(device) for k in by_hand}

    batch = np.shape(imgs_nchw)[0]
    identity = np.broadcast_to(
        np.arange(config.num_patches, dtype=np.float32), (batch, config.num_patches)
    )
    with exact_float32(device), torch.no_grad(), StageRecorder() as rec:
        _record_encoder(rec, model)
        out = model(pixel_values=_tensor_on(imgs_nchw, device), noise=_tensor_on(identity, device))
        if global_pool:
            tokens = rec.seen["enc_out"][0]
            features = F.layer_norm(
                tokens[:, 1:, :].mean(dim=1),
                (embed_dim,),
                head["fc_norm.weight"],
                head["fc_norm.bias"],
                eps=layer_norm_eps,
            )
        else:
            features = out.last_hidden_state[:, 0]
        logits = F.linear(features, head["head.weight"], head["head.bias"])
        enc_in = rec.one("enc_in")
        return {
            "patch_embed": rec.one("patch_embed"),
            "enc_in": enc_in,
            "enc_blocks": rec.stacked("enc_blocks", like=enc_in),
            "features": to_numpy(features),
            "logits": to_numpy(logits),
        }
