"""Accuracy of a classifier on an image set: ``evaluate`` (``mae-jax eval``, fine-tuning's
validation), the official eval transform's batches (``mae_jax.data``) through the classifier's
jitted forward (``mae_jax.classifier.make_eval_logits``)."""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from mae_jax.classifier import classification_counts, make_eval_logits
from mae_jax.data.images import DataError
from mae_jax.data.loaders import eval_batches
from mae_jax.normalization import Normalization


def evaluate(model, folder, *, batch_size: int, progress: bool = False, norm=None) -> dict:
    """Accuracy of ``model`` on an ``ImageFolder`` with the official eval transform (one pass,
    jitted): dict(top1, top5 [%], k, loss (mean cross-entropy), count, skipped).

    ``norm`` (a ``Normalization``): the pixel statistics; default the model's channel count's
    (ImageNet's for RGB).

    With several processes (``jax.distributed``) each one evaluates its own share of the images
    and the sums are added up across processes, so every process returns the whole folder's
    figures; all processes must call it together.
    """
    hosts, host = jax.process_count(), jax.process_index()

    _, state = nnx.split(model)
    eval_logits = make_eval_logits(model, batch_size)

    @jax.jit
    def counts(state, images, labels, valid):
        return classification_counts(eval_logits(state, images), labels, valid)

    totals = dict.fromkeys(("top1", "top5", "loss", "count"), 0.0)
    batches = eval_batches(
        folder,
        batch_size=batch_size,
        img_size=model.config.img_size,
        shard_index=host,
        shard_count=hosts,
        norm=norm or Normalization.for_channels(model.config.in_chans),
    )
    bar = tqdm(
        batches,
        total=math.ceil(math.ceil(len(folder) / hosts) / batch_size),
        unit="batch",
        disable=None if progress else True,
    )
    for batch in bar:
        out = counts(state, batch["image"], batch["label"], batch["valid"])
        for key in totals:
            totals[key] += float(out[key])
    if hosts > 1:
        from jax.experimental import multihost_utils

        sums = multihost_utils.process_allgather(np.array(list(totals.values()))).sum(axis=0)
        totals = dict(zip(totals, sums.tolist(), strict=True))
    count = int(totals["count"])
    if count == 0:
        raise DataError(f"{folder.root}: none of its {len(folder)} images could be read")
    return {
        "top1": 100.0 * totals["top1"] / count,
        "top5": 100.0 * totals["top5"] / count,
        "k": min(5, model.config.num_classes),
        "loss": totals["loss"] / count,
        "count": count,
        "skipped": len(folder) - count,
    }
