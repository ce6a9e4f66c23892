"""Export a mae-jax MAE checkpoint as a Hugging Face ViTMAE directory (config.json + model.safetensors).

    mae-jax to-hf out/mae_vit_large vit-mae-large/
    python convert/orbax_to_hf.py out/mae_vit_large vit-mae-large/  # from a clone

``ViTMAEForPreTraining.from_pretrained(OUT_DIR)`` (``ViTMAEModel`` for an encoder-only checkpoint)
loads the result with no missing or unexpected key. The weights are written in transformers 4's
key spelling, which transformers 4 and 5 both load, with both fixed position tables (a freshly
built transformers ViTMAE leaves them at zero, so they must be in the file). config.json holds
every ViTMAEConfig field: the sizes, head counts, LayerNorm eps, exact GELU, ``norm_pix_loss``
and the mask ratio (recorded when the checkpoint came from a Hugging Face directory, else 0.75).
torch is not needed. Either path may be a bucket URL. A local output directory is written under
a temporary name and renamed when complete; in a bucket, config.json is written last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a clone: a module of the package `convert`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "convert"

from flax.traverse_util import flatten_dict

from mae_jax._files import atomic_write, is_url, naming, replace_dir, run_path
from mae_jax._memory import return_large_blocks_to_the_system
from mae_jax.checkpoint import CheckpointError, load_state, read_metadata
from mae_jax.config import MAEConfig

from . import hf_format, mapping
from .pth_to_orbax import ConversionError, HeldSignals, check_finite, run_script


def export_hf(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    strict: bool = False,
) -> os.PathLike:
    """Write the MAE checkpoint as a Hugging Face ViTMAE directory ``out_dir``; returns its path.

    Weights with NaN or inf values are a NonFiniteWarning, with ``strict`` a ConversionError;
    a classifier checkpoint is a ConversionError (transformers' ViTMAE has no classifier).
    """
    out = run_path(out_dir)
    return_large_blocks_to_the_system()
    with naming(out):
        if out.exists() and not force:
            raise FileExistsError(f"{out}: already exists (pass --force to replace it)")
    meta = read_metadata(checkpoint)
    if meta["model_type"] not in ("mae", "mae_encoder"):
        raise ConversionError(
            f"{checkpoint}: is a {meta['model_type']} checkpoint; transformers' ViTMAE holds MAEs "
            "(with or without decoder) only"
        )
    with_decoder = meta["model_type"] == "mae"
    config = MAEConfig.from_dict(meta["config"])
    state_dict = mapping.official_from_state_consuming(flatten_dict(load_state(checkpoint)))
    check_finite(state_dict, checkpoint, strict=strict, done="written as they are")
    tensors = hf_format.hf_from_official(state_dict, prefix="vit." if with_decoder else "")
    del state_dict
    settings = hf_format.config_to_json(
        config, with_decoder=with_decoder, mask_ratio=float(meta.get("mask_ratio", 0.75))
    )
    with HeldSignals(out) as held:
        _write_dir(out, tensors, settings, force=force, check_interrupt=held.check)
    return out


def _write_dir(out, tensors: dict, settings: dict, *, force: bool, check_interrupt) -> None:
    """The weights, then config.json, into a temporary sibling renamed to ``out`` (local), or
    into ``out`` itself with config.json last (a bucket)."""
    config_text = json.dumps(settings, indent=2, sort_keys=True) + "\n"
    with naming(out):
        if is_url(out):
            if out.exists():
                (out / hf_format.CONFIG_FILE).unlink(missing_ok=True)
                out.rmtree()
            hf_format.write_safetensors(out / hf_format.SAFETENSORS_FILE, tensors)
            check_interrupt()
            atomic_write(out / hf_format.CONFIG_FILE, config_text)
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            hf_format.write_safetensors(tmp / hf_format.SAFETENSORS_FILE, tensors)
            atomic_write(tmp / hf_format.CONFIG_FILE, config_text)
            check_interrupt()
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


DESCRIPTION = "Export a mae-jax MAE checkpoint as a Hugging Face ViTMAE directory."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``orbax_to_hf.py`` and of ``mae-jax to-hf``."""
    p.add_argument(
        "checkpoint", help="mae-jax checkpoint directory (an MAE, with or without decoder)"
    )
    p.add_argument("out_dir", help="the directory to write (config.json + model.safetensors)")
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse weights with NaN or inf values (by default: written, with a warning)",
    )


def run(args: argparse.Namespace) -> int:
    """Export as ``add_arguments``' options say; the exit status (errors: one line on stderr)."""
    code, out = run_script(
        lambda: export_hf(args.checkpoint, args.out_dir, force=args.force, strict=args.strict),
        args.out_dir,
        (CheckpointError, ConversionError, OSError),
    )
    if code:
        return code
    with naming(out):
        kind = json.loads((out / hf_format.CONFIG_FILE).read_text())["architectures"][0]
    print(f"wrote {out}: load it with transformers' {kind}.from_pretrained({str(out)!r})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="orbax_to_hf.py", description=DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
