"""Convert an official MAE ``.pth`` checkpoint, or a Hugging Face ViTMAE directory, into a mae-jax
(Orbax) checkpoint directory.

    mae-jax convert mae_visualize_vit_large.pth out/mae_vit_large
    mae-jax convert vit-mae-base/ out/vit_mae_base   # config.json + model.safetensors
    mae-jax convert mae_finetuned_vit_base.pth out/vit_base_ft
    mae-jax convert mae_finetuned_vit_base.pth out/vit_base_enc --encoder-only
    python convert/pth_to_orbax.py mae_visualize_vit_large.pth out/mae_vit_large  # from a clone

MAEs (with or without decoder) and fine-tuned ``models_vit`` classifiers are recognized from their
keys; a classifier's pooling (fc_norm: global pool, norm: cls token), class count and learned
position table come from the file. ``--encoder-only`` keeps just the MAE encoder of either.
Every size is read from the tensor shapes; the head counts, which shapes cannot show, come from
``--set num_heads=N --set decoder_num_heads=N``, or, when the sizes equal a preset's, from that
preset (the summary and the metadata then say "head counts assumed from <preset>").
``--arch`` names the preset the file should be: its head counts, its sizes checked.
The file is read without unpickling arbitrary objects and without torch, and in memory bounded by
the file (see convert/pth_io.py): records larger than their storages, tensors whose elements
overlap (zero strides) or reach outside their storage are refused. Weights with NaN or inf values
are converted with a warning that names them; ``--strict`` refuses them. The output directory is
written under a temporary name and renamed when complete; SIGINT or SIGTERM while it is written
leave the output as it was (absent, or the previous one) and no temporary directory (exit status
128 + the signal's number). Either path may be a bucket URL (``gs://bucket/mae_vit_large.pth``,
``gs://bucket/ckpt/mae_vit_large``).

A directory is read as Hugging Face's ViTMAE (``convert_hf``): the config from its config.json
(``--set`` and ``--norm-pix-loss`` override fields), the weights from model.safetensors (read with
safetensors' NumPy reader), its shards, or pytorch_model.bin (through the safe reader), in any of
transformers' key spellings (see hf_format.py), every key checked against the config's model.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from a clone: a module of the package `convert`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "convert"

import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict

from mae_jax._files import naming, run_path
from mae_jax._memory import return_large_blocks_to_the_system
from mae_jax.checkpoint import CheckpointError, abstract_model, read_metadata, save_model
from mae_jax.config import PRESETS, VIT_PRESETS, MAEConfig, ViTConfig
from mae_jax.pos_embed import sincos_2d

from . import hf_format, mapping
from .pth_io import PthError, read_pth

CONVERTER_VERSION = "1"


class ConversionError(Exception):
    """A source file that cannot be converted; the message names the file and the reason."""


class NonFiniteWarning(UserWarning):
    """Weights with NaN or inf values, converted as they are (refused with ``strict``)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a conversion while it wrote its output; ``signum`` says which."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class HeldSignals:
    """SIGINT and SIGTERM held while an output is written, raised as ``Interrupted`` where the
    writer can stop cleanly.

    The first signal is only noted; ``check()``, which the writer calls where stopping is safe
    (last before it commits the output), raises it, and the writer removes its temporary files
    with none of its threads still writing (Orbax writes from threads of its own: a directory
    removed under them comes back). A second signal raises at once. Signals that another handler
    or SIG_IGN already owns are left alone, as is everything off the main thread.
    """

    def __init__(self, out: object):
        self._out = out
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> HeldSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
                    self._previous[sig] = signal.signal(sig, self._hold)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _hold(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
            return
        name = signal.Signals(signum).name
        raise Interrupted(
            f"{self._out}: interrupted twice ({name}): stopped without waiting for the write; "
            f"a temporary .{run_path(self._out).name}.tmp-* beside it may remain",
            signum,
        )

    def check(self) -> None:
        if self.signum is not None:
            name = signal.Signals(self.signum).name
            raise Interrupted(f"{self._out}: interrupted by {name}; nothing written", self.signum)


_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def non_finite_counts(tensors: Mapping[str, np.ndarray]) -> dict[str, int]:
    """{key: number of NaN and inf values} of the floating-point tensors that hold any."""
    counts = {}
    for key, value in tensors.items():
        if value.dtype.kind in "fc" or value.dtype == _BFLOAT16:  # every float dtype pth_io reads
            finite = np.isfinite(value)
            bad = finite.size - int(np.count_nonzero(finite))
            if bad:
                counts[key] = bad
    return counts


def check_finite(
    tensors: Mapping[str, np.ndarray], where: object, *, strict: bool, done: str
) -> dict[str, int]:
    """``non_finite_counts(tensors)``; any found is a NonFiniteWarning naming them, or with
    ``strict`` a ConversionError. ``done``: what happens to them without ``strict``."""
    counts = non_finite_counts(tensors)
    if not counts:
        return counts
    shown = [f"{k} ({n} of {tensors[k].size})" for k, n in list(counts.items())[:4]]
    if len(counts) > 4:
        shown.append(f"and {len(counts) - 4} more")
    text = f"{where}: {len(counts)} tensor(s) hold NaN or inf values: {', '.join(shown)}"
    if strict:
        raise ConversionError(f"{text}; refused (--strict), nothing written")
    warnings.warn(f"{text}; {done}", NonFiniteWarning, stacklevel=3)
    return counts


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """NonFiniteWarning printed to stderr as one line, "warning: <message>" (for the scripts)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", NonFiniteWarning)
        show = warnings.showwarning

        def one_line(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, NonFiniteWarning):
                print(f"warning: {message}", file=sys.stderr)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = one_line
        yield


def run_script(
    work: Callable[[], Any], out: object, errors: tuple[type[BaseException], ...]
) -> tuple[int, Any]:
    """``work()`` for a script's main(): (0, its result); or, after one line on stderr, (2, None)
    for one of ``errors`` and (128 + the signal's number, None) for an interruption."""
    try:
        with warnings_as_lines():
            return 0, work()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, None
    except Interrupted as e:
        print(f"error: {e}", file=sys.stderr)
        return 128 + e.signum, None
    except KeyboardInterrupt:  # Ctrl-C before the output was begun
        print(f"error: {out}: interrupted; nothing written", file=sys.stderr)
        return 128 + signal.SIGINT, None


def extract_state_dict(obj: object, src: os.PathLike) -> dict[str, np.ndarray]:
    """The weights inside a loaded .pth: {'model': sd}, a full training checkpoint, or a bare sd."""
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(f"{src}: holds no state_dict (expected a dict of tensors)")
    not_arrays = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if not_arrays:
        raise ConversionError(
            f"{src}: not a state_dict: entries {', '.join(map(str, not_arrays[:5]))} are not tensors"
        )
    # Weights saved from a DistributedDataParallel wrapper carry a 'module.' prefix.
    if all(str(k).startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def _norm_pix_from_name(src: os.PathLike, family: str) -> tuple[bool, str]:
    name = src.name.lower()
    if "_full" in name:
        return True, "inferred from the file name (*_full: normalized-pixel targets)"
    if "visualize" in name:
        return False, "inferred from the file name (visualize: pixel targets)"
    if family == mapping.FAMILY_ENCODER and name.startswith("mae_pretrain"):
        return True, "inferred from the file name (released pretraining used normalized pixels)"
    return False, "not recorded in the file; assumed pixel targets (pass --norm-pix-loss otherwise)"


def _pos_table_gap(sd: Mapping[str, np.ndarray], key: str) -> float | None:
    """Max |checkpoint table - recomputed sin-cos table|: a fact worth recording, never an error."""
    if key not in sd:
        return None
    table = sd[key][0]
    grid = int(round((table.shape[0] - 1) ** 0.5))
    return float(np.abs(table - sincos_2d(table.shape[1], grid)).max())


def convert_pth(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    arch: str | None = None,
    encoder_only: bool = False,
    norm_pix_loss: bool | None = None,
    force: bool = False,
    progress: bool = False,
    settings: Mapping[str, Any] | list[str] | None = None,
    strict: bool = False,
) -> tuple[os.PathLike, dict]:
    """Convert ``src`` into the checkpoint directory ``out``; returns (path, metadata).

    ``settings``: config fields the shapes cannot tell (``num_heads``, ``decoder_num_heads``), as
    a dict or as ``KEY=VALUE`` strings; fields the shapes do tell are checked against them.
    Weights with NaN or inf values are a NonFiniteWarning, with ``strict`` a ConversionError.
    SIGINT or SIGTERM while the output is written raise ``Interrupted`` once the temporary
    directory is removed (see HeldSignals).
    """
    src, out = run_path(src), run_path(out)
    with naming(src):
        is_dir = src.is_dir()
    if is_dir:
        return convert_hf(
            src,
            out,
            arch=arch,
            encoder_only=encoder_only,
            norm_pix_loss=norm_pix_loss,
            force=force,
            settings=settings,
            strict=strict,
        )
    return_large_blocks_to_the_system()
    _refuse_existing(out, force)
    digest = hashlib.sha256()  # of the file, computed while it is read
    obj = read_pth(src, progress=progress, digest=digest, allow_overlap=False)
    sd = extract_state_dict(obj, src)
    del obj
    non_finite = check_finite(sd, src, strict=strict, done="converted as they are")
    try:
        family = mapping.detect_family(sd)
        ignore: tuple[str, ...] = ()
        defaults = {}
        if family == mapping.FAMILY_CLASSIFIER and encoder_only:
            ignore = (r"head\..*", r"fc_norm\..*")
            if "norm.weight" not in sd:  # global-pool classifiers have fc_norm instead of norm
                dim = sd["cls_token"].shape[-1]
                defaults = {
                    "norm.weight": np.ones(dim, np.float32),
                    "norm.bias": np.zeros(dim, np.float32),
                }
        elif family == mapping.FAMILY_MAE and encoder_only:
            ignore = (r"decoder_.*", r"mask_token")
        if family == mapping.FAMILY_CLASSIFIER and not encoder_only:
            model_type = "vit_classifier"
        elif family == mapping.FAMILY_MAE and not encoder_only:
            model_type = "mae"
        else:
            model_type = "mae_encoder"
        arch_family = mapping.FAMILY_ENCODER if encoder_only else family
        config_cls = ViTConfig if model_type == "vit_classifier" else MAEConfig
        if isinstance(settings, list):
            settings = mapping.parse_settings(settings, config_cls)
        if arch is not None:
            # --arch names the preset the file should be: its sizes are checked against the
            # shapes, and its head counts are used unless --set gives them.
            mapping.check_arch(arch, mapping.read_sizes(sd, arch_family), config_cls)
            want = (VIT_PRESETS if config_cls is ViTConfig else PRESETS)[arch]
            heads = {
                k: getattr(want, k) for k in ("num_heads", "decoder_num_heads") if hasattr(want, k)
            }
            settings = heads | dict(settings or {})
        inferred = mapping.infer_config(sd, arch_family, settings)
        preset, config = inferred.preset, inferred.config
        if model_type == "vit_classifier":
            if norm_pix_loss is not None:
                raise ConversionError(
                    f"{src}: is {mapping.FAMILY_HELP[family]}; --norm-pix-loss / --pixel-targets "
                    "apply to MAE checkpoints only"
                )
            norm_pix_source = None
        else:
            if norm_pix_loss is None:
                norm_pix_loss, norm_pix_source = _norm_pix_from_name(src, family)
            else:
                norm_pix_source = "given on the command line"
            config = config.replace(norm_pix_loss=norm_pix_loss)

        gaps = {k: _pos_table_gap(sd, k) for k in ("pos_embed", "decoder_pos_embed")}
        model, report = _model_from_official(
            sd, model_type, config, ignore=ignore, defaults=defaults
        )
    except mapping.MappingError as e:
        raise ConversionError(f"{src}: {e}") from None
    with naming(src):
        src_bytes = src.stat().length
    described = {
        "preset": preset,
        "head_counts": inferred.heads,
        "family": family,
        "source": {"file": src.name, "sha256": digest.hexdigest(), "bytes": src_bytes},
        "norm_pix_loss_source": norm_pix_source,
        "non_finite_values": non_finite,
    }
    return _save_converted(model, out, described, report, gaps, force=force)


def _save_converted(
    model: Any,
    out: Any,
    described: dict,
    report: mapping.Report,
    gaps: Mapping[str, float | None],
    *,
    force: bool,
) -> tuple[os.PathLike, dict]:
    """Save the converted ``model`` with its metadata: ``described`` (where it came from) and
    what the conversion found; SIGINT and SIGTERM held while it is written."""
    metadata = {
        **described,
        "converter_version": CONVERTER_VERSION,
        "ignored_keys": report.ignored,
        "filled_by_default": report.filled_by_default,
        "pos_embed_max_abs_diff_from_sincos": gaps["pos_embed"],
        "decoder_pos_embed_max_abs_diff_from_sincos": gaps["decoder_pos_embed"],
    }
    with HeldSignals(out) as held:
        saved = save_model(model, out, metadata=metadata, force=force, check_interrupt=held.check)
    return saved, metadata


def _refuse_existing(out: Any, force: bool) -> None:
    with naming(out):
        if out.exists() and not force:
            raise ConversionError(f"{out}: already exists (pass --force to replace it)")


def convert_hf(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    arch: str | None = None,
    encoder_only: bool = False,
    norm_pix_loss: bool | None = None,
    force: bool = False,
    settings: Mapping[str, Any] | list[str] | None = None,
    strict: bool = False,
) -> tuple[os.PathLike, dict]:
    """Convert the Hugging Face ViTMAE directory ``src`` (config.json and model.safetensors, its
    shards, or pytorch_model.bin) into the checkpoint directory ``out``; returns (path, metadata).

    The config comes from config.json (``settings`` and ``norm_pix_loss`` override its fields);
    every key of the weights must be one the config's model has, in one of transformers'
    spellings (see hf_format.py), with the config's shapes. A ``ViTMAEModel`` directory (no
    decoder) becomes an encoder-only checkpoint, as does any with ``encoder_only``.
    """
    src, out = run_path(src), run_path(out)
    return_large_blocks_to_the_system()
    _refuse_existing(out, force)
    try:
        hf = hf_format.read_config(src)
        weights = hf_format.read_weights(src)
    except hf_format.HFFormatError as e:
        raise ConversionError(str(e)) from None
    tensors = weights.tensors
    non_finite = check_finite(tensors, src, strict=strict, done="converted as they are")
    if hf.architecture is None:
        with_decoder = any(k.startswith("decoder.") for k in tensors)
    else:
        with_decoder = hf.architecture == hf_format.PRETRAINING
    family = mapping.FAMILY_MAE if with_decoder else mapping.FAMILY_ENCODER
    config = hf.config
    try:
        if isinstance(settings, list):
            settings = mapping.parse_settings(settings, MAEConfig)
        config = config.replace(**dict(settings or {}))
        if arch is not None:
            mapping.check_arch(arch, config.to_dict(), MAEConfig)
    except (mapping.MappingError, ValueError, TypeError) as e:
        raise ConversionError(f"{src}: {e}") from None
    norm_pix_source = "config.json"
    if norm_pix_loss is not None:
        config = config.replace(norm_pix_loss=norm_pix_loss)
        norm_pix_source = "given on the command line"

    # Every key checked by the names and shapes of the model config.json describes, before
    # anything is converted; the error names the keys as the files spell them.
    from flax import nnx

    source_model = abstract_model("mae" if with_decoder else "mae_encoder", config)
    official_shapes = {
        mapping.official_key(path): mapping.official_shape(path, tuple(leaf.shape))
        for path, leaf in flatten_dict(nnx.to_pure_dict(nnx.state(source_model))).items()
    }
    spelling = hf_format.spelling_of(list(tensors))
    expected = hf_format.expected_keys(official_shapes, spelling)
    try:
        hf_format.check_keys(tensors, expected)
    except hf_format.HFFormatError as e:
        files = list(weights.files)
        where = src / files[0] if len(files) == 1 else f"{src} ({len(files)} shards)"
        raise ConversionError(f"{where}: {e}") from None
    del source_model
    sd = hf_format.official_from_hf(tensors, expected)
    del tensors, weights.tensors
    model_type = "mae" if with_decoder and not encoder_only else "mae_encoder"
    ignore = (r"decoder_.*", r"mask_token") if model_type != "mae" and with_decoder else ()
    try:
        # For the preset of the same sizes (the metadata's name); the shapes gave those sizes.
        sizes = mapping.read_sizes(sd, family)
        given = {k: v for k, v in config.to_dict().items() if k not in sizes}
        inferred = mapping.infer_config(sd, family, given)
        gaps = {k: _pos_table_gap(sd, k) for k in ("pos_embed", "decoder_pos_embed")}
        model, report = _model_from_official(sd, model_type, config, ignore=ignore)
    except mapping.MappingError as e:
        raise ConversionError(f"{src}: {e}") from None
    described = {
        "preset": inferred.preset,
        "head_counts": "from config.json",
        "family": family,
        "source": {
            "format": "huggingface",
            "directory": src.name,
            "architecture": hf.architecture,
            "key_names": spelling.name,
            "files": weights.files,
            "bytes": weights.total_bytes,
        },
        "norm_pix_loss_source": norm_pix_source,
        "mask_ratio": hf.mask_ratio,
        "non_finite_values": non_finite,
    }
    return _save_converted(model, out, described, report, gaps, force=force)


def _model_from_official(
    sd: dict[str, np.ndarray],
    model_type: str,
    config: MAEConfig | ViTConfig,
    *,
    ignore: tuple[str, ...] = (),
    defaults: Mapping[str, np.ndarray] | None = None,
) -> tuple[Any, mapping.Report]:
    """The model of ``model_type`` and ``config`` holding the official state_dict ``sd`` (emptied
    as it goes); MappingError when the keys or shapes do not fit."""
    import jax
    from flax import nnx

    abstract = abstract_model(model_type, config)
    graphdef, state = nnx.split(abstract)
    # One tensor at a time: each is transposed, made a JAX array and its source dropped, so
    # the model is never held twice (peak memory about the file's size). A kernel is
    # transposed into the memory of an earlier one of its size (reuse), and the JAX arrays use
    # the NumPy arrays' memory where it is aligned (may_alias): no copies beyond the transposes.
    values, report = mapping.state_from_official(
        sd,
        nnx.to_pure_dict(state),
        ignore=ignore,
        defaults=defaults,
        finish=lambda value: jax.device_put(value, may_alias=True),
        consume=True,
        reuse=True,
    )
    nnx.replace_by_pure_dict(state, values)
    del values
    return nnx.merge(graphdef, state), report


DESCRIPTION = (
    "Convert an official MAE .pth checkpoint, or a Hugging Face ViTMAE directory, into a mae-jax "
    "checkpoint directory."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``pth_to_orbax.py`` and of ``mae-jax convert``."""
    p.add_argument(
        "src",
        help="the .pth file (official layout: {'model': state_dict}, a training checkpoint, or a "
        "bare state_dict), or a Hugging Face ViTMAE directory (config.json + model.safetensors)",
    )
    p.add_argument("out", help="output checkpoint directory (must not exist unless --force)")
    p.add_argument(
        "--arch",
        help="expected preset name (e.g. mae_vit_large_patch16); checked against the shapes",
    )
    p.add_argument(
        "--encoder-only",
        action="store_true",
        help="keep the MAE encoder only (drops an MAE's decoder, or a classifier's head and fc_norm)",
    )
    targets = p.add_mutually_exclusive_group()
    targets.add_argument(
        "--norm-pix-loss",
        dest="norm_pix_loss",
        action="store_true",
        default=None,
        help="the model was trained on per-patch normalized pixels",
    )
    targets.add_argument(
        "--pixel-targets",
        dest="norm_pix_loss",
        action="store_false",
        help="the model was trained on plain (normalized-image) pixels",
    )
    p.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config field the shapes cannot tell, e.g. --set num_heads=3 --set "
        "decoder_num_heads=4 (repeatable; fields the shapes tell are checked)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse weights with NaN or inf values (by default: converted, with a warning)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _head_flags(family: str) -> str:
    if family == mapping.FAMILY_MAE:
        return "--set num_heads=N --set decoder_num_heads=N"
    return "--set num_heads=N"


def run(args: argparse.Namespace) -> int:
    """Convert as ``add_arguments``' options say; the exit status (errors: one line on stderr)."""
    code, result = run_script(
        lambda: convert_pth(
            args.src,
            args.out,
            arch=args.arch,
            encoder_only=args.encoder_only,
            norm_pix_loss=args.norm_pix_loss,
            force=args.force,
            progress=not args.quiet,
            settings=args.settings,
            strict=args.strict,
        ),
        args.out,
        (ConversionError, PthError, CheckpointError, OSError),
    )
    if code:
        return code
    out, meta = result
    kind = mapping.FAMILY_HELP[meta["family"]]
    if meta["source"].get("format") == "huggingface":
        source = meta["source"]
        kind = f"a Hugging Face {source['architecture'] or 'ViTMAE'} ({source['key_names']} keys)"
    saved = read_metadata(out)
    if saved["model_type"] == "vit_classifier":
        config = saved["config"]
        pooling = "global pool + fc_norm" if config["global_pool"] else "cls token + norm"
        kind = f"classifier ({pooling}, {config['num_classes']} classes)"
    config = saved["config"]
    sizes = f"width {config['embed_dim']}, depth {config['depth']}, {config['num_heads']} heads"
    if "decoder_embed_dim" in config and meta["family"] == mapping.FAMILY_MAE:
        sizes += (
            f"; decoder width {config['decoder_embed_dim']}, depth {config['decoder_depth']}, "
            f"{config['decoder_num_heads']} heads"
        )
    name = meta["preset"] or "custom size"
    print(
        f"wrote {out}: {name}, {kind}; image {config['img_size']}, patch {config['patch_size']}, "
        f"{sizes}"
    )
    if meta["head_counts"] not in ("given", "from config.json"):
        print(
            f"  note: head counts {meta['head_counts']} (the shapes cannot show them); "
            f"if the model had others, convert again with {_head_flags(meta['family'])}"
        )
    eps = config["layer_norm_eps"]
    if meta["source"].get("format") == "huggingface" and eps != 1e-6:
        print(
            f"  note: LayerNorm eps {eps:g}, as config.json gives it; the official MAE used 1e-6 "
            "(convert again with --set layer_norm_eps=1e-6 for that)"
        )
    if meta["ignored_keys"]:
        print(f"  ignored {len(meta['ignored_keys'])} keys: {', '.join(meta['ignored_keys'][:6])}")
    if meta["family"] == mapping.FAMILY_ENCODER:
        print(
            "  note: no decoder in this file; it cannot reconstruct images (use mae_visualize_* or *_full)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pth_to_orbax.py", description=DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
