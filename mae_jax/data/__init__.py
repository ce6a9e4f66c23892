"""Image data for MAE, on the host: image sets, decoding, the official transforms, the loaders,
record directories and fine-tuning augmentation.

One module per concern, from the bottom up (each imports only those above it):

- ``images``: image folders (``ImageFolder``), opening and decoding bytes (``open_image``,
  ``decode_bytes``, ``decode_rgb``), ``DataError``.
- ``transforms``: the official pretraining crop and eval transform, normalisation (host and
  device).
- ``records``: image sets as sharded ArrayRecord files (``write_records``, ``RecordFolder``).
- ``loaders``: ``open_dataset`` and the grain loaders (``pretrain_batches``, ``eval_batches``).
- ``augment``: fine-tuning augmentation, Mixup/CutMix and the classification losses.

This face re-exports the names ``mae_jax.data`` has always offered (``data.ImageFolder``,
``data.pretrain_batches``, ...) for users and tests. Modules of the package import the module
that defines a name (``mae_jax.data.loaders``), never this face.
"""

from mae_jax.data.images import (
    CHANNEL_MODES,
    IMAGE_EXTENSIONS,
    DataError,
    ImageFolder,
    cannot_decode,
    decode_bytes,
    decode_rgb,
    open_image,
    pixel_array,
    to_channels,
    to_rgb,
)
from mae_jax.data.loaders import (
    Pixels,
    PretrainBatches,
    auto_worker_count,
    epoch_order,
    eval_batches,
    open_dataset,
    pretrain_batches,
    steps_per_epoch,
    usable_cores,
)
from mae_jax.data.transforms import (
    EVAL_CROP_PCT,
    JPEG_DRAFT_SCALES,
    PRETRAIN_RATIO,
    PRETRAIN_SCALE,
    Transform,
    crop_center,
    crop_resize,
    decode_for_crop,
    denormalize,
    draft_scale,
    eval_resize_size,
    eval_transform,
    load_image,
    normalize,
    normalize_on_device,
    pretrain_crop,
    pretrain_pixels,
    pretrain_transform,
    random_resized_crop_box,
    resize_shorter_side,
    square_image,
)
from mae_jax.normalization import (
    IMAGENET,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalization,
    check_channels,
)

__all__ = [
    "CHANNEL_MODES",
    "EVAL_CROP_PCT",
    "IMAGE_EXTENSIONS",
    "IMAGENET",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "JPEG_DRAFT_SCALES",
    "PRETRAIN_RATIO",
    "PRETRAIN_SCALE",
    "DataError",
    "ImageFolder",
    "Normalization",
    "Pixels",
    "PretrainBatches",
    "Transform",
    "auto_worker_count",
    "cannot_decode",
    "check_channels",
    "crop_center",
    "crop_resize",
    "decode_bytes",
    "decode_for_crop",
    "decode_rgb",
    "denormalize",
    "draft_scale",
    "epoch_order",
    "eval_batches",
    "eval_resize_size",
    "eval_transform",
    "load_image",
    "normalize",
    "normalize_on_device",
    "open_dataset",
    "open_image",
    "pixel_array",
    "pretrain_batches",
    "pretrain_crop",
    "pretrain_pixels",
    "pretrain_transform",
    "random_resized_crop_box",
    "resize_shorter_side",
    "square_image",
    "steps_per_epoch",
    "to_channels",
    "to_rgb",
    "usable_cores",
]
