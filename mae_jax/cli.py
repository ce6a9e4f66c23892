"""The ``mae-jax`` command: pretrain, reconstruct, demo, export, prepare-data, eval, and the
converter's convert, to-pth, to-hf and parity (``mae_jax.convert``, the scripts of a clone's
``convert/``).

User mistakes end in one line on stderr (``mae-jax: error: ...``) and exit status 2; no tracebacks.
A run stopped by a signal after saving exits with 75 (``multihost.EXIT_INTERRUPTED``), one stopped
at once by a second signal with 130 (``EXIT_STOPPED``); done is 0.
Every checkpoint, run, data and output path may be a bucket URL (``gs://bucket/...``) as well as a
local path (``mae_jax._files.run_path``); an unreachable bucket or a missing object is one such line
naming the path (``mae_jax._files.PathError``, an OSError).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from mae_jax._files import naming, run_path

EXIT_STOPPED = 130  # a second Ctrl-C: stopped without saving (128 + SIGINT, as shells report it)


class UsageError(ValueError):
    """A bad command-line value; the message says which and why."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that mean 'bad input', not 'bug' (imported lazily: jax is slow)."""
    from mae_jax.checkpoint import CheckpointError
    from mae_jax.classifier import EncoderMismatchError, HeadMismatchError, NotAClassifierError
    from mae_jax.data.images import DataError
    from mae_jax.model import AttentionError, MissingDecoderError
    from mae_jax.multihost import HostMismatchError
    from mae_jax.run_config import TrainingError
    from mae_jax.run_settings import SettingsError
    from mae_jax.visualize import PanelInputError

    return (
        UsageError,
        CheckpointError,
        DataError,
        MissingDecoderError,
        AttentionError,
        NotAClassifierError,
        EncoderMismatchError,
        HeadMismatchError,
        TrainingError,
        PanelInputError,
        HostMismatchError,
        SettingsError,
        OSError,
    )


# --------------------------------------------------------------------------- pretrain


def _add_run_arguments(p) -> None:
    """Settings, precision, multi-host and progress options shared by the training commands."""
    p.add_argument("--config", help="a JSON file of settings (keys as in --set)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set epochs=400 --set batch_size=32 (repeatable)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        help="compute dtype (auto, the default: bfloat16 on GPU and TPU, float32 on CPU); the "
        "attention kernel is the setting attention: auto (cuDNN's fused attention on a CUDA GPU "
        "in bfloat16, else XLA's), cudnn (that or an error), xla (never cuDNN: --set "
        "attention=xla is the way around a card or driver where cuDNN's attention fails)",
    )
    p.add_argument(
        "--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)"
    )
    p.add_argument("--coordinator", help="coordinator address host:port for --distributed")
    p.add_argument("--num-processes", type=int, help="number of hosts for --distributed")
    p.add_argument("--process-id", type=int, help="this host's index for --distributed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _start_distributed(args) -> None:
    import jax

    if not args.distributed:
        return
    kwargs = {
        k: v
        for k, v in (
            ("coordinator_address", args.coordinator),
            ("num_processes", args.num_processes),
            ("process_id", args.process_id),
        )
        if v is not None
    }
    # CPU-only hosts need gloo for cross-process collectives; GPU/TPU backends ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


def _settings(config_cls, base, args, changes: dict, error_cls):
    """``base`` updated by --config, then the named options, then --set."""
    config = base
    if args.config:
        try:
            loaded = json.loads(run_path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise error_cls(f"{args.config}: cannot read settings ({e})") from None
        config = config_cls.from_dict({**config.to_dict(), **loaded})
    given = {k: v for k, v in changes.items() if v is not None}
    config = config_cls.from_dict({**config.to_dict(), **given})
    return config.with_overrides(args.overrides)


def _add_pretrain(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain an MAE on an image folder (default: the bundled sample photographs)",
        description=(
            "Pretrain an MAE with the official recipe (AdamW 0.9/0.95, wd 0.05, lr = blr x batch / "
            "256, warmup + cosine, norm-pix loss, mask ratio 0.75) on every local device. Rerun "
            "the same command to resume after an interruption."
        ),
    )
    p.add_argument(
        "--data", help="image folder (class sub-folders or flat); default: bundled photos"
    )
    p.add_argument("--preset", help="model preset, e.g. mae_vit_large_patch16")
    p.add_argument("--workdir", default=None, help="run directory (checkpoints, metrics, figures)")
    _add_run_arguments(p)
    p.set_defaults(run=_run_pretrain)


def _run_pretrain(args) -> int:
    import jax

    from mae_jax import run_config, train

    _start_distributed(args)
    base = run_config.PretrainConfig()
    if args.data is None and args.preset is None and args.config is None:
        base = run_config.PretrainConfig(**_embedded_default())
    changes = {"data": args.data, "preset": args.preset, "dtype": args.dtype}
    config = _settings(run_config.PretrainConfig, base, args, changes, run_config.TrainingError)
    workdir = args.workdir or ("runs/demo" if config.data is None else "runs/pretrain")
    print(
        f"pretraining {config.preset} on {config.data or 'the bundled sample photographs'} "
        f"over {jax.local_device_count()} local device(s) x {jax.process_count()} host(s); "
        f"workdir {workdir}"
    )
    summary = train.pretrain(config, workdir, progress=not args.quiet)
    if summary["skipped_images"]:
        print(f"skipped {summary['skipped_images']} unreadable image(s)")
    if summary["interrupted"]:
        return _interrupted(summary)
    print(f"done: {summary['end_step']} steps; load it with mae_jax.load_pretrained({workdir!r})")
    return 0


def _interrupted(summary: dict) -> int:
    """Say where an interrupted run stopped; its exit status tells scripts it is not done."""
    from mae_jax.multihost import EXIT_INTERRUPTED

    print(
        f"interrupted by {summary['interrupted']} at step {summary['end_step']}; checkpoint "
        f"saved. Run the same command again to resume (exit status {EXIT_INTERRUPTED})."
    )
    return EXIT_INTERRUPTED


def _embedded_default() -> dict:
    """The short run on the bundled photographs (the recipe that made the shipped demo model)."""
    from mae_jax import assets

    return assets.demo_pretrain_settings()


# --------------------------------------------------------------------------- finetune, linprobe


def _add_finetune(sub, mode: str) -> None:
    what = {
        "finetune": (
            "fine-tune an MAE encoder as a classifier (the official recipe)",
            "AdamW with layer-wise lr decay, drop path, RandAugment, random erasing, mixup and "
            "cutmix with label smoothing, warmup + cosine; the recipe's values follow --preset",
        ),
        "linprobe": (
            "train a linear classifier on a frozen MAE encoder (the official probe)",
            "frozen encoder (cls token), BatchNorm without affine before the head, LARS, the "
            "weak augmentation",
        ),
    }[mode]
    p = sub.add_parser(
        mode,
        help=what[0],
        description=f"{what[0][0].upper()}{what[0][1:]}: {what[1]}. "
        "Validates after every epoch; rerun the same command to resume.",
    )
    p.add_argument("--data", required=True, help="training folder (one sub-folder per class)")
    p.add_argument("--val", help="validation folder (same classes)")
    p.add_argument(
        "--init",
        help="checkpoint to start from: an MAE (pretrained here or converted), a pretraining run, "
        "or a classifier to continue from",
    )
    p.add_argument(
        "--reset-head",
        action="store_true",
        help="with a classifier --init: train a new head (needed when its classes differ)",
    )
    p.add_argument("--preset", help="classifier preset, e.g. vit_base_patch16 (default)")
    p.add_argument("--workdir", default=f"runs/{mode}", help=f"run directory (default runs/{mode})")
    _add_run_arguments(p)
    p.set_defaults(run=_run_finetune, mode=mode)


def _run_finetune(args) -> int:
    import jax

    from mae_jax import finetune, run_config

    _start_distributed(args)
    changes = {
        "mode": args.mode,
        "data": args.data,
        "val": args.val,
        "init": args.init,
        "reset_head": args.reset_head or None,
        "preset": args.preset,
        "dtype": args.dtype,
    }
    config = _settings(
        run_config.FinetuneConfig,
        run_config.FinetuneConfig(),
        args,
        changes,
        run_config.TrainingError,
    )
    print(
        f"{args.mode}: {config.preset} on {config.data} from {config.init or 'scratch'} over "
        f"{jax.local_device_count()} local device(s) x {jax.process_count()} host(s); "
        f"workdir {args.workdir}"
    )
    summary = finetune.finetune(config, args.workdir, progress=not args.quiet)
    if summary["interrupted"]:
        return _interrupted(summary)
    if summary["val"]:
        last = summary["val"][-1]
        print(
            f"validation after epoch {last['epoch']}: Acc@1 {last['val_top1']:.3f} "
            f"Acc@5 {last['val_top5']:.3f}"
        )
    where = summary.get("model") or f"{args.workdir}/model, written by the first host"
    print(f"done: {summary['end_step']} steps; the classifier is in {where}")
    return 0


# --------------------------------------------------------------------------- reconstruct


def _add_reconstruct(sub) -> None:
    p = sub.add_parser(
        "reconstruct",
        help="draw the four-panel MAE reconstruction figure of images",
        description=(
            "Mask random patches of each image, reconstruct them with an MAE checkpoint and write "
            "a PNG: original, masked, reconstruction, reconstruction with the visible patches "
            "pasted back (one row per image)."
        ),
    )
    p.add_argument("images", nargs="+", help="image files (any size and mode)")
    p.add_argument(
        "--checkpoint", required=True, help="mae-jax checkpoint directory or pretraining workdir"
    )
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument(
        "--mask-ratio", type=float, default=0.75, help="fraction of patches removed (default 0.75)"
    )
    p.add_argument("--seed", type=int, default=2, help="masking seed (default 2)")
    p.add_argument(
        "--mean",
        help="pixel mean per channel, comma-separated (default: the run's or checkpoint's "
        "setting, else ImageNet's for RGB and 0.449 for grayscale models)",
    )
    p.add_argument("--std", help="pixel std per channel, comma-separated (default: as --mean)")
    p.add_argument(
        "--center-crop",
        action="store_true",
        help="resize the shorter side and crop the center (default: squash to a square, as the official demo)",
    )
    p.set_defaults(run=_run_reconstruct)


def reconstruct_figure(
    model,
    image_paths,
    *,
    mask_ratio: float,
    seed: int,
    center_crop: bool,
    note_extra: str = "",
    norm=None,
):
    """The reconstruction figure (a PIL image) of the given image files, read with ``norm``'s
    channel count and statistics (default: ImageNet's RGB)."""
    import numpy as np

    from mae_jax import visualize
    from mae_jax.data.transforms import load_image
    from mae_jax.normalization import IMAGENET

    norm = norm or IMAGENET
    size = model.config.img_size
    imgs = np.stack([load_image(p, size, center_crop=center_crop, norm=norm) for p in image_paths])
    return visualize.reconstruction_figure(
        model,
        imgs,
        seed=seed,
        mask_ratio=mask_ratio,
        note=note_extra or None,
        scale=max(1, 224 // size),
        norm=norm,
    )


def checkpoint_normalization(checkpoint: str, in_chans: int, mean=None, std=None):
    """``checkpoint.recorded_normalization`` with a mistake as one UsageError naming the
    checkpoint."""
    from mae_jax.checkpoint import recorded_normalization

    try:
        return recorded_normalization(checkpoint, in_chans, mean, std)
    except ValueError as err:
        raise UsageError(f"{checkpoint}: a model of in_chans={in_chans}: {err}") from None


def _numbers(flag: str, text: str | None) -> tuple[float, ...] | None:
    from mae_jax.config import parse_setting

    if text is None:
        return None
    try:
        return parse_setting(flag, text, "tuple[float, ...]")
    except ValueError as err:
        raise UsageError(str(err).replace("--set ", "--", 1)) from None


def _model_type(checkpoint: str) -> str:
    """The model type a checkpoint directory records ('mae' for a pretraining run directory)."""
    from mae_jax.checkpoint import checkpoint_dir, read_metadata

    directory = checkpoint_dir(checkpoint)
    return "mae" if directory is None else read_metadata(directory)["model_type"]


def _run_reconstruct(args) -> int:
    from mae_jax import visualize
    from mae_jax.loading import load_pretrained
    from mae_jax.model import MissingDecoderError

    if not 0.0 <= args.mask_ratio < 1.0:
        raise UsageError(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
    mean, std = _numbers("mean", args.mean), _numbers("std", args.std)
    for path in args.images:
        if not Path(path).is_file():
            raise UsageError(f"{path}: no such image file")
    if _model_type(args.checkpoint) == "vit_classifier":
        raise MissingDecoderError(
            f"{args.checkpoint}: is a classifier, it has no decoder; reconstruction needs an MAE "
            "checkpoint with its decoder"
        )
    model = load_pretrained(args.checkpoint)
    model._require_decoder()
    norm = checkpoint_normalization(args.checkpoint, model.config.in_chans, mean, std)
    figure = reconstruct_figure(
        model,
        args.images,
        mask_ratio=args.mask_ratio,
        seed=args.seed,
        center_crop=args.center_crop,
        norm=norm,
    )
    visualize.save_png(figure, args.out)
    print(f"wrote {args.out} ({len(args.images)} image(s), mask ratio {args.mask_ratio})")
    return 0


# --------------------------------------------------------------------------- demo


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="reconstruct the bundled photographs with the bundled small MAE (offline)",
        description=(
            "Runs offline: reconstructs the sample photographs that ship with mae-jax using the "
            "small MAE that ships with it (trained by `mae-jax pretrain` on those photographs)."
        ),
    )
    p.add_argument("--out", default="mae_demo.png", help="the PNG to write (default mae_demo.png)")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=2)
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from mae_jax import assets, visualize
    from mae_jax.loading import load_pretrained

    model = load_pretrained(str(assets.demo_checkpoint_dir()))
    figure = reconstruct_figure(
        model,
        assets.demo_image_paths(),
        mask_ratio=args.mask_ratio,
        seed=args.seed,
        center_crop=True,
        note_extra="a small MAE trained on these few photos only: expect blurry reconstructions",
    )
    visualize.save_png(figure, args.out)
    print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------- export


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write the latest model of a pretraining run as a mae-jax checkpoint directory",
        description=(
            "Copy the model of the latest checkpoint of a `mae-jax pretrain` workdir into a "
            "stand-alone mae-jax checkpoint directory (parameters + JSON metadata). Turn it into an "
            "official .pth with: mae-jax to-pth OUT model.pth"
        ),
    )
    p.add_argument("workdir", help="the pretraining run directory")
    p.add_argument("out", help="the checkpoint directory to write")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from mae_jax.checkpoint import save_model
    from mae_jax.loading import load_trained_model
    from mae_jax.normalization import as_metadata
    from mae_jax.run_config import TrainingError

    workdir = run_path(args.workdir)
    with naming(workdir):
        if not (workdir / "config.json").is_file():
            raise TrainingError(f"{workdir}: not a pretraining run directory (no config.json)")
        meta = json.loads((workdir / "config.json").read_text())
        model = load_trained_model(workdir)
    norm = checkpoint_normalization(str(workdir), model.config.in_chans)
    out = save_model(
        model,
        args.out,
        metadata={
            "preset": meta["preset"],
            "family": "mae",
            "source": {"pretrain_run": str(workdir)},
            # the statistics the model was trained with, for reconstruct and fine-tuning
            "normalization": as_metadata(norm),
        },
        force=args.force,
    )
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------- prepare-data


def _add_prepare_data(sub) -> None:
    p = sub.add_parser(
        "prepare-data",
        help="pack an image folder into sharded ArrayRecord files for fast reading",
        description=(
            "Write the images of FOLDER (one sub-folder per class, or a flat folder) into OUT as "
            "ArrayRecord shards: each image's file bytes as they are (no re-encoding) with its "
            "label, plus index.json and labels.npy. Any --data option accepts OUT in place of "
            "FOLDER and gives the same batches for the same seed. OUT is written under a temporary "
            "name and renamed when complete."
        ),
    )
    p.add_argument("folder", help="the image folder to pack")
    p.add_argument("out", help="the record directory to write")
    p.add_argument("--shards", type=int, help="number of shard files (default: about 512 MiB each)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_prepare_data)


def _run_prepare_data(args) -> int:
    from mae_jax.data.records import write_records

    if args.shards is not None and args.shards < 1:
        raise UsageError(f"--shards must be positive, got {args.shards}")
    index = write_records(
        args.folder, args.out, shards=args.shards, force=args.force, progress=not args.quiet
    )
    print(
        f"wrote {args.out}: {index['count']} images, {len(index['classes'])} classes, "
        f"{len(index['shards'])} shards, {index['bytes'] / 2**20:.1f} MiB of image files"
    )
    if index["unreadable"]:
        print(
            f"warning: {index['unreadable']} file(s) are not readable images; they are stored "
            "all the same, and the loaders skip and count them"
        )
    return 0


# --------------------------------------------------------------------------- eval


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="top-1/top-5 accuracy of a fine-tuned classifier on an image folder",
        description=(
            "Evaluate a classifier checkpoint on an ImageNet-style folder (one sub-folder per "
            "class, in the order of the classifier's labels) with the official eval transform: "
            "shorter side to size/0.875 (256 for 224) bicubic, centre crop, normalize. Prints "
            "Acc@1, Acc@5 and the mean cross-entropy per image."
        ),
    )
    p.add_argument(
        "--data",
        required=True,
        help="validation folder (one sub-folder per class) or its record directory",
    )
    p.add_argument("--checkpoint", required=True, help="mae-jax classifier checkpoint directory")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="compute dtype (default float32: full float32 matmuls on every platform)",
    )
    p.add_argument(
        "--attention",
        choices=["auto", "cudnn", "xla"],
        default="auto",
        help="attention kernel: auto (the default: cuDNN's fused attention on a CUDA GPU with "
        "--dtype bfloat16, else XLA's), cudnn (that or an error), xla (never cuDNN: the way "
        "around a card or driver where cuDNN's attention fails)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_eval)


def _run_eval(args) -> int:
    import jax
    import jax.numpy as jnp

    from mae_jax.classifier import NotAClassifierError
    from mae_jax.data.images import DataError
    from mae_jax.data.loaders import open_dataset
    from mae_jax.evaluate import evaluate
    from mae_jax.loading import load_pretrained
    from mae_jax.model import AttentionError, check_attention

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    dtype = jnp.dtype(args.dtype)
    try:
        check_attention(args.attention, dtype, jax.default_backend())
    except AttentionError as err:
        raise UsageError(str(err).replace("attention=", "--attention ")) from None
    if _model_type(args.checkpoint) != "vit_classifier":
        raise NotAClassifierError(
            f"{args.checkpoint}: is an MAE (pretraining) checkpoint and has no classification "
            "head: fine-tune it first with mae-jax finetune"
        )
    folder = open_dataset(args.data)
    model = load_pretrained(args.checkpoint, dtype=dtype, attention=args.attention)
    num_classes = model.config.num_classes
    if num_classes != len(folder.classes):
        raise DataError(
            f"{args.data}: has {len(folder.classes)} class folder(s) but the classifier "
            f"{args.checkpoint} has {num_classes} classes"
        )
    norm = checkpoint_normalization(args.checkpoint, model.config.in_chans)
    print(f"evaluating {args.checkpoint} on {folder}")
    r = evaluate(model, folder, batch_size=args.batch_size, progress=not args.quiet, norm=norm)
    print(
        f"* Acc@1 {r['top1']:.3f} Acc@{r['k']} {r['top5']:.3f} loss {r['loss']:.3f} "
        f"({r['count']} images)"
    )
    if r["skipped"]:
        print(f"skipped {r['skipped']} unreadable image(s)")
    return 0


# --------------------------------------------------------------------------- convert, to-pth, to-hf, parity

# The converter's scripts, each the one definition of its command's options (add_arguments) and
# of what it does (run), imported only once its command is named (they import Orbax; parity, torch).
_CONVERTER_COMMANDS = {
    "convert": (
        "pth_to_orbax",
        "convert an official .pth checkpoint or a Hugging Face ViTMAE directory into a mae-jax "
        "checkpoint",
    ),
    "to-pth": ("orbax_to_pth", "export a mae-jax checkpoint as an official-layout .pth file"),
    "to-hf": ("orbax_to_hf", "export a mae-jax MAE checkpoint as a Hugging Face ViTMAE directory"),
    "parity": ("parity", "compare mae-jax with PyTorch on the same weights, input and mask"),
}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose options ``fill(parser)`` adds when it first parses (or helps)."""

    def __init__(self, *args, fill=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._fill = fill

    def parse_known_args(self, args=None, namespace=None):
        if self._fill is not None:
            fill, self._fill = self._fill, None
            fill(self)
        return super().parse_known_args(args, namespace)


def _add_converter(sub, command: str) -> None:
    module_name, help_line = _CONVERTER_COMMANDS[command]

    def fill(p: argparse.ArgumentParser) -> None:
        try:
            script = importlib.import_module(f"mae_jax.convert.{module_name}")
        except ModuleNotFoundError as e:
            if e.name != "mae_jax.convert":
                raise
            # an editable install made before the converter was part of the package
            p.exit(
                2,
                "mae-jax: error: mae_jax.convert is not installed; reinstall mae-jax (in a "
                "clone: pip install -e .)\n",
            )
        p.description = script.DESCRIPTION
        script.add_arguments(p)
        p.set_defaults(run=script.run)

    sub.add_parser(command, help=help_line, fill=fill)


# --------------------------------------------------------------------------- entry point


def _fail(message: str) -> int:
    print(f"mae-jax: error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mae-jax",
        description=(
            "Masked Autoencoders in JAX: pretrain, reconstruct, demo, export, prepare-data, eval; "
            "convert official .pth checkpoints and Hugging Face ViTMAE directories, export them "
            "back, check parity with PyTorch."
        ),
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    _add_pretrain(sub)
    _add_reconstruct(sub)
    _add_demo(sub)
    _add_export(sub)
    _add_prepare_data(sub)
    _add_eval(sub)
    _add_finetune(sub, "finetune")
    _add_finetune(sub, "linprobe")
    for command in _CONVERTER_COMMANDS:
        _add_converter(sub, command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except _user_errors() as e:
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        # a second signal during a run: its complete checkpoints are kept
        print("mae-jax: interrupted; stopped without saving", file=sys.stderr)
        return EXIT_STOPPED


if __name__ == "__main__":
    sys.exit(main())
