"""Prove that mae-jax and PyTorch compute the same numbers for the same weights, input and mask.

    mae-jax parity out/mae_vit_large --pth mae_visualize_vit_large.pth
    mae-jax parity out/mae_vit_large --pth ... --official-repo ~/src/mae
    mae-jax parity out/vit_mae_base --hf vit-mae-base/  # a Hugging Face directory's own model
    python convert/parity.py out/mae_vit_large --pth ...  # from a clone

The PyTorch side needs the torch extra (``pip install "mae-jax[torch]"``).

Runs the JAX model of a checkpoint directory and an independent PyTorch implementation on the same
weights, the same random images and the same masking noise, and prints one row per stage with the
max abs error and the max relative error (max |jax - torch| / max |torch|). Exits 1 when a stage is
over tolerance. The PyTorch side is Hugging Face transformers' ViTMAEForPreTraining configured with
MAE's hyperparameters (eager attention), or with --official-repo the user's own clone of
facebookresearch/mae, or with --hf a Hugging Face ViTMAE directory's own model, as
``from_pretrained`` loads it (its config as it is, eager attention, the mask ratio of --mask-ratio). A fine-tuned classifier checkpoint is compared (no masking) with HF's ViT
encoder plus the official pooling and head: encoder blocks, features and logits. Both sides run at
full float32 precision (JAX's highest matmul precision, torch with TF32 off); with --dtype bfloat16
the JAX side computes in bfloat16 and the errors against the float32 reference are reported
without failing.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a clone: a module of the package `convert`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "convert"

import numpy as np

from .hf_format import local_copy

# stage -> (what it is, compared exactly?)
STAGE_ROWS = {
    "patch_embed": "patch embedding",
    "x_masked": "visible tokens",
    "enc_blocks": "encoder blocks",
    "latent": "encoder output",
    "mask": "mask",
    "ids_restore": "ids_restore",
    "dec_in": "decoder input",
    "dec_blocks": "decoder blocks",
    "pred": "decoder prediction",
    "loss": "loss",
    "features": "features",  # a classifier's pooled features, the head's input
    "logits": "logits",
}
EXACT = ("mask", "ids_restore")


@dataclasses.dataclass
class Row:
    stage: str
    shape: tuple
    max_abs: float
    max_rel: float
    tolerance: float  # bound on max_abs (atol + rtol * max |reference|); for the loss, on max_rel
    ok: bool


class ParityInputError(Exception):
    """Bad arguments or files; the message names the file."""


def compare(
    jax_out: dict[str, np.ndarray],
    ref: dict[str, np.ndarray],
    *,
    atol: float,
    loss_rtol: float,
    rtol: float = 0.0,
) -> list[Row]:
    """One Row per stage present on both sides.

    A float stage passes when max |jax - torch| <= atol + rtol * max |torch|: float32 rounding
    grows with the size of the activations, which real checkpoints make larger than random ones.
    """
    rows = []
    for stage in STAGE_ROWS:
        if stage not in jax_out or stage not in ref:
            continue
        a = np.asarray(jax_out[stage], np.float64)
        b = np.asarray(ref[stage], np.float64)
        if a.shape != b.shape:
            rows.append(Row(stage, a.shape, np.inf, np.inf, 0.0, False))
            continue
        diff = float(np.abs(a - b).max()) if a.size else 0.0
        scale = float(np.abs(b).max()) if b.size else 0.0
        rel = diff / scale if scale > 0 else diff
        if stage in EXACT:
            rows.append(Row(stage, a.shape, diff, rel, 0.0, diff == 0.0))
        elif stage == "loss":
            rows.append(Row(stage, a.shape, diff, rel, loss_rtol, rel <= loss_rtol))
        else:
            bound = atol + rtol * scale
            rows.append(Row(stage, a.shape, diff, rel, bound, diff <= bound))
    return rows


def format_table(rows: list[Row], *, enforce: bool) -> str:
    lines = [
        f"{'stage':<20} {'shape':<22} {'max abs':>10} {'max rel':>10} {'tolerance':>12}  result"
    ]
    for r in rows:
        what = STAGE_ROWS[r.stage]
        if r.stage in EXACT:
            tol = "exact"
        elif r.stage == "loss":
            tol = f"rel {r.tolerance:.0e}"
        else:
            tol = f"abs {r.tolerance:.1e}"
        verdict = ("ok" if r.ok else "OVER") if enforce else "(reported)"
        lines.append(
            f"{what:<20} {str(tuple(r.shape)):<22} {r.max_abs:>10.2e} {r.max_rel:>10.2e} {tol:>12}  {verdict}"
        )
    return "\n".join(lines)


def jax_stages(model, imgs_nhwc: np.ndarray, noise: np.ndarray, mask_ratio: float) -> dict:
    """The JAX model's stages under the given noise, at the highest matmul precision."""
    import jax
    import jax.numpy as jnp

    from mae_jax.masking import masking_from_noise

    with jax.default_matmul_precision("highest"):
        if model.with_decoder:
            out = model.forward_full(
                jnp.asarray(imgs_nhwc),
                noise=jnp.asarray(noise),
                mask_ratio=mask_ratio,
                capture_stages=True,
            )
            stages = dict(out.stages)
            stages.update(
                latent=out.latent,
                mask=out.mask,
                ids_restore=out.ids_restore,
                pred=out.pred,
                loss=out.loss,
            )
        else:
            masks = masking_from_noise(jnp.asarray(noise), mask_ratio)
            stages = {}
            latent = model.forward_encoder(jnp.asarray(imgs_nhwc), masks, stages)
            stages.update(latent=latent, mask=masks.mask, ids_restore=masks.ids_restore)
    return {
        k: np.asarray(v, np.float32) if k != "ids_restore" else np.asarray(v)
        for k, v in stages.items()
    }


def run_parity(
    checkpoint: str | Path,
    *,
    pth: str | Path | None = None,
    official_repo: str | Path | None = None,
    official_arch: str | None = None,
    batch: int = 2,
    mask_ratio: float = 0.75,
    seed: int = 0,
    dtype: str = "float32",
    device: str | None = None,
    hf: str | Path | None = None,
) -> tuple[dict, dict, dict]:
    """Run both sides; returns (JAX stages, reference stages, info about the run).

    ``hf``: a Hugging Face ViTMAE directory whose own model is the reference (not with ``pth``
    or ``official_repo``)."""
    import jax
    import jax.numpy as jnp

    from mae_jax._files import run_path
    from mae_jax.checkpoint import state_as_numpy
    from mae_jax.classifier import VisionTransformer
    from mae_jax.loading import load_pretrained

    from .mapping import official_from_state
    from .pth_io import read_pth
    from .pth_to_orbax import extract_state_dict

    if dtype not in ("float32", "bfloat16"):
        raise ParityInputError(f"--dtype must be float32 or bfloat16, got {dtype}")
    model = load_pretrained(checkpoint, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    config = model.config
    is_classifier = isinstance(model, VisionTransformer)
    if is_classifier and official_repo is not None:
        raise ParityInputError(
            f"{checkpoint}: is a classifier; --official-repo runs the official MAE only "
            "(leave it out to compare with transformers)"
        )
    if hf is not None and (pth is not None or official_repo is not None):
        raise ParityInputError(
            "--hf compares with the directory's own model: leave out --pth and --official-repo"
        )
    if hf is not None and is_classifier:
        raise ParityInputError(
            f"{checkpoint}: is a classifier; --hf compares MAEs (transformers' ViTMAE)"
        )
    if hf is not None:
        state_dict = {}
        source = f"{checkpoint}"
    elif pth is not None:
        state_dict = extract_state_dict(read_pth(pth), run_path(pth))
        source = f"{pth}"
    else:  # the checkpoint's own weights, exported to the official layout
        state_dict = official_from_state(state_as_numpy(model))
        source = f"{checkpoint} (exported to the official layout)"
    if not is_classifier and not model.with_decoder:
        state_dict = {
            k: v for k, v in state_dict.items() if not k.startswith(("decoder_", "mask_token"))
        }

    rng = np.random.default_rng(seed)
    imgs_nchw = rng.standard_normal(
        (batch, config.in_chans, config.img_size, config.img_size)
    ).astype(np.float32)
    noise = rng.random((batch, config.num_patches), dtype=np.float32)
    torch_device = device or ("cuda" if _cuda_available() else "cpu")

    if is_classifier:
        with jax.default_matmul_precision("highest"):
            stages = model.forward_stages(jnp.asarray(imgs_nchw.transpose(0, 2, 3, 1)))
        ours = {k: np.asarray(v, np.float32) for k, v in stages.items()}
    else:
        ours = jax_stages(model, imgs_nchw.transpose(0, 2, 3, 1), noise, mask_ratio)
    if is_classifier:
        from .hf_reference import hf_classifier_forward

        ref = hf_classifier_forward(
            state_dict,
            imgs_nchw,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            patch_size=config.patch_size,
            img_size=config.img_size,
            global_pool=config.global_pool,
            in_chans=config.in_chans,
            mlp_ratio=config.mlp_ratio,
            layer_norm_eps=config.layer_norm_eps,
            device=torch_device,
        )
        reference = (
            "transformers ViTMAEModel (eager attention, no masking) + official pooling and head"
        )
    elif hf is not None:
        from .hf_reference import hf_directory_forward

        with tempfile.TemporaryDirectory() as scratch:
            ref = hf_directory_forward(
                local_copy(hf, scratch),
                imgs_nchw,
                noise,
                mask_ratio=mask_ratio,
                with_decoder=model.with_decoder,
                device=torch_device,
            )
        kind = "ViTMAEForPreTraining" if model.with_decoder else "ViTMAEModel"
        reference = f"{hf}: its own transformers {kind} (eager attention)"
    elif official_repo is not None:
        from .official_reference import official_mae_forward, official_model_kwargs

        arch = official_arch or "MaskedAutoencoderViT"
        kwargs = official_model_kwargs(config) if arch == "MaskedAutoencoderViT" else None
        ref = official_mae_forward(
            official_repo,
            arch,
            state_dict,
            imgs_nchw,
            noise,
            mask_ratio=mask_ratio,
            norm_pix_loss=config.norm_pix_loss,
            device=torch_device,
            model_kwargs=kwargs,
        )
        reference = f"official code at {official_repo}"
    elif model.with_decoder:
        from .hf_reference import hf_mae_forward

        ref = hf_mae_forward(
            state_dict,
            config,
            imgs_nchw,
            noise,
            mask_ratio=mask_ratio,
            norm_pix_loss=config.norm_pix_loss,
            device=torch_device,
        )
        reference = "transformers ViTMAEForPreTraining (eager attention)"
    else:
        from .hf_reference import hf_encoder_forward

        ref = hf_encoder_forward(
            state_dict, config, imgs_nchw, noise, mask_ratio=mask_ratio, device=torch_device
        )
        reference = "transformers ViTMAEModel (eager attention; encoder-only checkpoint)"
    jax_device = jax.devices()[0]
    if is_classifier:
        pooling = "global pool + fc_norm" if config.global_pool else "cls token + norm"
        described = f"batch {batch}, classifier with {pooling}, {config.num_classes} classes"
    else:
        described = f"batch {batch}, mask ratio {mask_ratio}, norm_pix_loss {config.norm_pix_loss}"
    info = {
        "input": described,
        "source": source,
        "reference": reference,
        "jax_device": f"{jax_device.platform} ({jax_device.device_kind})",
        "torch_device": torch_device,
        "dtype": dtype,
        "batch": batch,
        "mask_ratio": mask_ratio,
        "norm_pix_loss": getattr(config, "norm_pix_loss", None),
    }
    return ours, ref, info


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


DESCRIPTION = "Compare mae-jax with PyTorch on the same weights, input and mask, stage by stage."

# What the PyTorch side imports, and the extra that installs it.
TORCH_MODULES = ("torch", "transformers")
TORCH_EXTRA = 'pip install "mae-jax[torch]" (in a clone: pip install -e ".[torch]")'


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``parity.py`` and of ``mae-jax parity``."""
    p.add_argument("checkpoint", help="mae-jax checkpoint directory")
    p.add_argument(
        "--pth",
        help="the official .pth the checkpoint came from (default: export the checkpoint's own weights)",
    )
    p.add_argument(
        "--official-repo", help="a clone of facebookresearch/mae to use instead of transformers"
    )
    p.add_argument(
        "--hf",
        metavar="HF_DIR",
        help="a Hugging Face ViTMAE directory: compare with its own model (from_pretrained)",
    )
    p.add_argument(
        "--official-arch",
        help="factory in the clone's models_mae.py (default: MaskedAutoencoderViT with the checkpoint's sizes)",
    )
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the random images and masking noise"
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="JAX compute dtype"
    )
    p.add_argument(
        "--device", choices=["cpu", "cuda"], help="torch device (default: cuda when available)"
    )
    p.add_argument(
        "--atol",
        type=float,
        default=1e-5,
        help="absolute part of the float tolerance (default 1e-5)",
    )
    p.add_argument(
        "--rtol",
        type=float,
        default=2e-6,
        help="relative part: a stage may be off by atol + rtol * max|reference| (default 2e-6)",
    )
    p.add_argument(
        "--loss-rtol",
        type=float,
        default=1e-6,
        help="relative error allowed on the loss (default 1e-6)",
    )


def run(args: argparse.Namespace) -> int:
    """Compare as ``add_arguments``' options say: 0 within tolerance, 1 over it, 2 for bad input
    or a missing PyTorch (one line on stderr)."""
    try:
        from .hf_reference import ReferenceInputError, StateDictMismatchError
        from .official_reference import OfficialRepoError
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] not in TORCH_MODULES:
            raise
        print(
            f"error: parity needs PyTorch and transformers ({e}); install the torch extra: "
            f"{TORCH_EXTRA}",
            file=sys.stderr,
        )
        return 2
    from mae_jax.checkpoint import CheckpointError

    from .pth_io import PthError
    from .pth_to_orbax import ConversionError

    try:
        ours, ref, info = run_parity(
            args.checkpoint,
            pth=args.pth,
            official_repo=args.official_repo,
            official_arch=args.official_arch,
            batch=args.batch,
            mask_ratio=args.mask_ratio,
            seed=args.seed,
            dtype=args.dtype,
            device=args.device,
            hf=args.hf,
        )
    except (
        CheckpointError,
        PthError,
        ConversionError,
        ParityInputError,
        OfficialRepoError,
        StateDictMismatchError,
        ReferenceInputError,
        OSError,
    ) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    rows = compare(ours, ref, atol=args.atol, rtol=args.rtol, loss_rtol=args.loss_rtol)
    enforce = args.dtype == "float32"
    print(f"weights:   {info['source']}")
    print(f"reference: {info['reference']}")
    print(
        f"devices:   jax {info['jax_device']}, torch {info['torch_device']}; "
        f"jax dtype {info['dtype']} vs float32 reference"
    )
    print(f"input:     {info['input']}")
    print(format_table(rows, enforce=enforce))
    failed = [r.stage for r in rows if not r.ok]
    if enforce and failed:
        print(f"FAILED: {', '.join(STAGE_ROWS[s] for s in failed)} over tolerance", file=sys.stderr)
        return 1
    print(
        "parity: all stages within tolerance"
        if enforce
        else "bfloat16 errors reported (not enforced)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="parity.py", description=DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
