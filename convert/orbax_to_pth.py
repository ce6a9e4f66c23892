"""Export a mae-jax checkpoint directory as an official-layout ``.pth`` ({'model': state_dict}).

    mae-jax to-pth out/mae_vit_large back.pth
    python convert/orbax_to_pth.py out/mae_vit_large back.pth  # from a clone

The official ``models_mae`` model (or, for a classifier, ``models_vit``) loads the result with
``strict=True``; a file converted with pth_to_orbax.py comes back with bit-identical tensors in the
same key order. torch is not needed. Either path may be a bucket URL (``gs://...``).
Weights with NaN or inf values are written with a warning that names them; ``--strict`` refuses
them. SIGINT or SIGTERM while the file is written leave it as it was (absent, or the previous
file) and no temporary file (exit status 128 + the signal's number).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a clone: a module of the package `convert`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "convert"

from flax.traverse_util import flatten_dict

from mae_jax._files import naming, run_path
from mae_jax._memory import return_large_blocks_to_the_system
from mae_jax.checkpoint import CheckpointError, load_state

from . import mapping
from .pth_io import PthError, write_pth
from .pth_to_orbax import ConversionError, HeldSignals, check_finite, run_script


def export_pth(
    checkpoint: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    force: bool = False,
    strict: bool = False,
) -> os.PathLike:
    """Write the checkpoint's weights to ``dst`` as {'model': official state_dict}; either may be
    a bucket URL. Weights with NaN or inf values are a NonFiniteWarning, with ``strict`` a
    ConversionError; SIGINT or SIGTERM while ``dst`` is written raise ``Interrupted`` once the
    temporary file is removed."""
    dst = run_path(dst)
    return_large_blocks_to_the_system()
    with naming(dst):
        if dst.exists() and not force:
            raise FileExistsError(f"{dst}: already exists (pass --force to replace it)")
    # One tensor at a time, each array dropped once converted, a kernel transposed into the memory
    # of one already converted: the model is never held twice, and little new memory is touched.
    state_dict = mapping.official_from_state_consuming(flatten_dict(load_state(checkpoint)))
    check_finite(state_dict, checkpoint, strict=strict, done="written as they are")
    with HeldSignals(dst) as held:
        write_pth({"model": state_dict}, dst, check_interrupt=held.check)
    return dst


DESCRIPTION = "Export a mae-jax checkpoint directory as an official-layout .pth file."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``orbax_to_pth.py`` and of ``mae-jax to-pth``."""
    p.add_argument("checkpoint", help="mae-jax checkpoint directory")
    p.add_argument("dst", help="the .pth file to write")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse weights with NaN or inf values (by default: written, with a warning)",
    )


def run(args: argparse.Namespace) -> int:
    """Export as ``add_arguments``' options say; the exit status (errors: one line on stderr)."""
    code, dst = run_script(
        lambda: export_pth(args.checkpoint, args.dst, force=args.force, strict=args.strict),
        args.dst,
        (CheckpointError, ConversionError, PthError, OSError),
    )
    if code:
        return code
    print(f"wrote {dst}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="orbax_to_pth.py", description=DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
