"""The grain loaders: pretraining batches that resume exactly, evaluation batches, and
``open_dataset``, which opens an image folder or a record directory.

Everything here runs on the host and returns NumPy arrays in NHWC layout; there is no torch.

- ``open_dataset`` gives an ``ImageFolder`` (``mae_jax.data.images``: an ImageNet-style folder,
  one sub-folder per class, or a flat folder whose images all get label 0) or a
  ``RecordFolder`` (``mae_jax.data.records``: the same images in sharded ArrayRecord files,
  ``mae-jax prepare-data``). Both give ``len``, ``root``, ``classes``, ``labels`` and
  ``read(i) -> (encoded bytes, name)``.
- ``pretrain_batches`` is the training loader: a grain pipeline whose every batch is a pure
  function of (seed, epoch, position), so a run resumed from ``get_state()`` sees exactly the batches
  an uninterrupted run would have seen, whatever the thread or worker count.
- ``eval_batches`` gives every image once, in order, through the eval transform.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import grain
import numpy as np

from mae_jax.data.images import DataError, ImageFolder, decode_bytes, open_image
from mae_jax.data.transforms import Transform, eval_transform, pretrain_crop
from mae_jax.loader_workers import remove_dead_runs_segments, worker_start_hook
from mae_jax.normalization import IMAGENET, Normalization

if TYPE_CHECKING:
    from mae_jax.data.records import RecordFolder

# First word of every SeedSequence entropy list, so that the shuffle and the augmentation streams
# never coincide (SeedSequence pads short entropy with zeros: [a, b] and [a, b, 0] are the same).
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1
_LOG = logging.getLogger(__name__)

Pixels = Literal["float32", "uint8"]


# ----------------------------------------------------------------------------------------------
# Image sets
# ----------------------------------------------------------------------------------------------


def open_dataset(root: str | os.PathLike) -> ImageFolder | RecordFolder:
    """The image set at ``root``: a record directory (``mae-jax prepare-data``) or an image folder."""
    from mae_jax._files import is_url
    from mae_jax.data import records

    if is_url(root) or records.is_record_dir(root):  # in a bucket: record directories only
        return records.RecordFolder(root)
    return ImageFolder(root)


# ----------------------------------------------------------------------------------------------
# Pretraining loader
# ----------------------------------------------------------------------------------------------


def steps_per_epoch(num_examples: int, batch_size: int, shard_count: int = 1) -> int:
    """Batches per epoch and host: each host gets num_examples // shard_count, drop-last."""
    return (num_examples // shard_count) // batch_size


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """(num_examples,) int64 permutation of the dataset for ``epoch``; the same on every host."""
    return np.random.default_rng([_SHUFFLE_STREAM, seed, epoch]).permutation(num_examples)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def auto_worker_count() -> int:
    """Loader worker processes for ``worker_count=-1``: every usable core but one, at least 1.

    The core left over runs the training process, which feeds the accelerators and collects the
    batches from shared memory.
    """
    return max(1, usable_cores() - 1)


class _PretrainExample:
    """Maps a global example position to one augmented example (picklable, for grain workers).

    Position g belongs to epoch g // per_epoch and slot g % per_epoch of this host's shard of that
    epoch's permutation. A slot whose file cannot be decoded takes the next decodable file of the
    shard instead, so every epoch has the same number of batches on every host.
    """

    def __init__(
        self,
        images: ImageFolder | RecordFolder,
        img_size: int,
        seed: int,
        shard_index: int,
        shard_count: int,
        per_epoch: int,
        transform: Transform | None,
        pixels: Pixels,
        norm: Normalization = IMAGENET,
    ):
        self.images = images
        self.transform = transform
        self.pixels = pixels
        self.norm = norm
        self.img_size = img_size
        self.seed = seed
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.per_epoch = per_epoch
        self._init_cache()

    def _init_cache(self) -> None:
        self._lock = threading.Lock()
        self._shards: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"], state["_shards"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_cache()

    def shard(self, epoch: int) -> np.ndarray:
        """This host's image indices for ``epoch``, in order: (len(images) // shard_count,)."""
        with self._lock:
            order = self._shards.get(epoch)
            if order is None:
                per_shard = len(self.images) // self.shard_count
                perm = epoch_order(len(self.images), self.seed, epoch)
                order = perm[self.shard_index :: self.shard_count][:per_shard]
                if len(self._shards) >= 2:  # keep the current and the next epoch only
                    self._shards.pop(min(self._shards))
                self._shards[epoch] = order
            return order

    def _augment(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """Image ``index`` through the transform; DataError if it cannot be read or decoded."""
        encoded, name = self.images.read(index)
        channels = self.norm.channels
        if self.transform is not None:
            return self.transform(decode_bytes(encoded, name, channels), rng, self.img_size)
        # Only opened, not decoded: pretrain_crop can then decode a JPEG in draft mode.
        pixels = pretrain_crop(open_image(encoded, name), rng, self.img_size, name, channels)[0]
        return pixels if self.pixels == "uint8" else self.norm.normalize(pixels)

    def __call__(self, position: int) -> dict[str, np.ndarray]:
        epoch, slot = divmod(int(position), self.per_epoch)
        order = self.shard(epoch)
        for skipped in range(len(order)):
            index = int(order[(slot + skipped) % len(order)])
            # The slot's own file index keys the augmentation, so a file gets the same crop in an
            # epoch whatever the number of hosts. A fresh generator per try: a file that fails to
            # decode after its box was drawn must not shift the draws of the file replacing it.
            rng = np.random.default_rng([_AUGMENT_STREAM, self.seed, epoch, int(order[slot])])
            try:
                pixels = self._augment(index, rng)
            except DataError as err:
                _LOG.warning("skipping unreadable image: %s", err)
                continue
            return dict(image=pixels, label=self.images.labels[index], skipped=np.int32(skipped))
        raise DataError(
            f"{self.images.root}: none of the {len(order)} images of shard {self.shard_index} "
            f"of epoch {epoch} could be decoded"
        )


class _PretrainBatch:
    """Maps a global batch index to a whole stacked batch (picklable): one unit of worker work.

    grain hands each worker process every worker_count-th element of the dataset before the
    ``to_iter_dataset`` step and interleaves their outputs in order; with whole batches as
    elements, batch k is the same whatever the number of workers.
    """

    def __init__(self, example: _PretrainExample, batch_size: int):
        self.example = example
        self.batch_size = batch_size

    def __call__(self, batch_index: int) -> dict[str, np.ndarray]:
        first = int(batch_index) * self.batch_size
        rows = [self.example(first + i) for i in range(self.batch_size)]
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


class PretrainBatches(Iterator[tuple[int, dict[str, np.ndarray]]]):
    """Iterator of (epoch, dict(image=(B, H, W, 3), label=(B,) int32)) pretraining batches.

    ``image`` is uint8 or float32 as ``pretrain_batches`` says. Position, skipped-file count and
    resume: ``epoch`` and ``step`` name the next batch, ``num_skipped`` counts unreadable files met
    so far (each one replaced by the next file of the shard), and ``get_state()`` /
    ``set_state()`` save and restore all three as a JSON-able dict. Call ``close()`` (or use
    ``with``) when done, to stop the reading threads or worker processes.
    """

    def __init__(
        self,
        images: ImageFolder | RecordFolder,
        *,
        batch_size: int,
        img_size: int,
        seed: int,
        shard_index: int,
        shard_count: int,
        start_epoch: int,
        end_epoch: int | None,
        read_threads: int,
        prefetch_batches: int,
        worker_count: int,
        transform: Transform | None = None,
        pixels: Pixels = "float32",
        norm: Normalization = IMAGENET,
    ):
        if batch_size < 1 or img_size < 1:
            raise ValueError(f"batch_size {batch_size} and img_size {img_size} must be positive")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
        if seed < 0 or start_epoch < 0:
            raise ValueError(f"seed {seed} and start_epoch {start_epoch} must be >= 0")
        if pixels not in ("float32", "uint8"):
            raise ValueError(f"pixels must be 'float32' or 'uint8', got {pixels!r}")
        if transform is not None and pixels != "float32":
            raise ValueError(
                "pixels='uint8' is for the default pretraining transform; "
                "a custom transform returns its own pixels"
            )
        if prefetch_batches < 1 or read_threads < 0 or worker_count < -1:
            raise ValueError(
                f"prefetch_batches {prefetch_batches} must be >= 1, read_threads {read_threads} "
                f">= 0 and worker_count {worker_count} >= -1 (-1: one per core but one)"
            )
        self.steps_per_epoch = steps_per_epoch(len(images), batch_size, shard_count)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{images.root}: {len(images)} images over {shard_count} host(s) "
                f"are fewer than one batch of {batch_size} per host"
            )
        self.images = images
        self.batch_size = batch_size
        self.img_size = img_size
        self.seed = seed
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.end_epoch = end_epoch
        self.read_threads = read_threads
        self.prefetch_batches = prefetch_batches
        self.worker_count = auto_worker_count() if worker_count == -1 else worker_count
        self._example = _PretrainExample(
            images,
            img_size,
            seed,
            shard_index,
            shard_count,
            self.steps_per_epoch * batch_size,
            transform,
            pixels,
            norm,
        )
        self._iterator: Iterator[dict[str, np.ndarray]] | None = None
        self.num_skipped = 0
        self._seek(start_epoch * self.steps_per_epoch)

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self._next_batch // self.steps_per_epoch

    @property
    def step(self) -> int:
        """Index of the next batch within its epoch."""
        return self._next_batch % self.steps_per_epoch

    def _seek(self, batch_index: int) -> None:
        """Move to global batch ``batch_index``; the pipeline restarts there on the next batch."""
        self.close()
        self._next_batch = batch_index

    def _open(self) -> Iterator[dict[str, np.ndarray]]:
        """A grain pipeline from the next batch to ``end_epoch`` (or practically forever)."""
        stop = None if self.end_epoch is None else self.end_epoch * self.steps_per_epoch
        if stop is not None and self._next_batch >= stop:
            raise StopIteration
        per_batch = self.batch_size
        if self.worker_count == 0:
            # Threads of this process decode examples; the buffer holds prefetch_batches batches.
            stop_position = 2**62 if stop is None else stop * per_batch
            read = grain.ReadOptions(
                num_threads=self.read_threads,
                prefetch_buffer_size=self.prefetch_batches * per_batch,
            )
            dataset = (
                grain.MapDataset.range(self._next_batch * per_batch, stop_position)
                .map(self._example)
                .to_iter_dataset(read)
                .batch(per_batch, drop_remainder=True)
            )
            return iter(dataset)
        # Each worker process builds whole batches on one core (no reading threads, which would
        # only contend for that core) and keeps its share of the read-ahead in shared memory.
        # Workers exit with this process, however it dies; segments of dead runs are unlinked.
        _allow_grain_workers()
        remove_dead_runs_segments()
        per_worker = -(-self.prefetch_batches // self.worker_count)
        dataset = (
            grain.MapDataset.range(self._next_batch, 2**62 if stop is None else stop)
            .map(_PretrainBatch(self._example, per_batch))
            .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
            .mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self.worker_count, per_worker_buffer_size=per_worker
                ),
                worker_init_fn=worker_start_hook(),
            )
        )
        return iter(dataset)

    def __next__(self) -> tuple[int, dict[str, np.ndarray]]:
        if self._iterator is None:
            # Started lazily, so that set_state() right after construction wastes no reading.
            self._iterator = self._open()
        batch = next(self._iterator)
        epoch = self.epoch
        self._next_batch += 1
        self.num_skipped += int(batch.pop("skipped").sum())
        return epoch, batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: the next batch, the skip count and what they depend on."""
        return dict(
            epoch=self.epoch, step=self.step, num_skipped=self.num_skipped, **self._fingerprint()
        )

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a ``get_state()`` result of an identically configured loader."""
        expected = self._fingerprint()
        saved = {k: state.get(k) for k in expected}
        if saved != expected:
            raise DataError(
                f"data loader state was saved with {saved}, but this loader has {expected}"
            )
        self.num_skipped = int(state["num_skipped"])
        self._seek(int(state["epoch"]) * self.steps_per_epoch + int(state["step"]))

    def _fingerprint(self) -> dict[str, int]:
        return dict(
            num_images=len(self.images),
            batch_size=self.batch_size,
            img_size=self.img_size,
            seed=self.seed,
            shard_index=self.shard_index,
            shard_count=self.shard_count,
        )

    def close(self) -> None:
        """Stop the background threads or worker processes of the current pipeline."""
        iterator, self._iterator = getattr(self, "_iterator", None), None
        if iterator is not None and hasattr(iterator, "close"):
            iterator.close()

    def __enter__(self) -> PretrainBatches:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _allow_grain_workers() -> None:
    """Work around google/grain#1355: worker processes die on absl's unparsed-flags check."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def pretrain_batches(
    images: ImageFolder | RecordFolder,
    *,
    batch_size: int,
    img_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    start_epoch: int = 0,
    end_epoch: int | None = None,
    pixels: Pixels = "float32",
    worker_count: int = -1,
    prefetch_batches: int = 2,
    read_threads: int = 16,
    transform: Transform | None = None,
    norm: Normalization = IMAGENET,
) -> PretrainBatches:
    """Shuffled, sharded, drop-last pretraining batches from ``start_epoch`` to ``end_epoch``.

    Yields (epoch, dict(image=(batch_size, img_size, img_size, C), label=(batch_size,) int32));
    ``end_epoch=None`` never stops. ``images``: an ``ImageFolder`` or a record directory's
    ``RecordFolder`` (``open_dataset``); both give the same batches. Each epoch shuffles all images
    with its own seed, identically on every host; host ``shard_index`` of ``shard_count`` (pass
    ``jax.process_index()`` / ``jax.process_count()``) takes every shard_count-th image of that
    order, so hosts are disjoint.

    ``pixels``: "uint8" yields the augmented pixels as uint8, for ``Normalization.on_device`` in
    the train step (a quarter of the bytes); "float32" yields them normalised on the host, the
    same values bit for bit. ``norm``: the channel count (3: RGB, 1: grayscale, each image
    converted after decoding) and the statistics of that normalisation (default ImageNet's).

    Parallelism: ``worker_count`` worker processes each build whole batches on one core;
    -1 (the default) is ``auto_worker_count()``, every usable core but one; 0 decodes in
    ``read_threads`` threads of this process instead (no process start-up, 1.5-3 s per worker).
    On Linux, worker processes exit when this process dies, however it dies (SIGKILL included),
    and a loader that starts workers first unlinks the shared memory of runs whose process is dead
    (``mae_jax.loader_workers``).
    ``prefetch_batches``: how many finished batches may wait ahead of the consumer (rounded up to
    a multiple of the worker count, each worker keeping its share). Host memory for them is about
    (prefetch_batches + workers) x batch_size x img_size² x 3 bytes for uint8, 4x that for
    float32. Batches are identical whatever the workers, threads and read-ahead.

    ``transform(img, rng, size) -> pixels`` replaces the pretraining augmentation and gets a
    decoded image of ``norm``'s channel count (fine-tuning and linear probing pass theirs;
    their pixels are yielded as
    they are). With worker processes it must be picklable: a module-level function or a
    functools.partial of one.
    """
    return PretrainBatches(
        images,
        batch_size=batch_size,
        img_size=img_size,
        seed=seed,
        shard_index=shard_index,
        shard_count=shard_count,
        start_epoch=start_epoch,
        end_epoch=end_epoch,
        read_threads=read_threads,
        prefetch_batches=prefetch_batches,
        worker_count=worker_count,
        transform=transform,
        pixels=pixels,
        norm=norm,
    )


# ----------------------------------------------------------------------------------------------
# Evaluation loader
# ----------------------------------------------------------------------------------------------


class _EvalExample:
    """Maps a padded position of this host's shard to one eval-transformed example (picklable)."""

    def __init__(
        self,
        images: ImageFolder | RecordFolder,
        indices: np.ndarray,
        img_size: int,
        norm: Normalization = IMAGENET,
    ):
        self.images = images
        self.indices = indices
        self.img_size = img_size
        self.norm = norm

    def __call__(self, position: int) -> dict[str, np.ndarray]:
        empty = np.zeros((self.img_size, self.img_size, self.norm.channels), np.float32)
        if position >= len(self.indices):  # padding that keeps every host's batch count equal
            return dict(image=empty, label=np.int32(0), valid=np.bool_(False))
        index = int(self.indices[position])
        label = self.images.labels[index]
        try:
            img = decode_bytes(*self.images.read(index), channels=self.norm.channels)
        except DataError as err:
            _LOG.warning("skipping unreadable image: %s", err)
            return dict(image=empty, label=label, valid=np.bool_(False))
        pixels = eval_transform(img, self.img_size, norm=self.norm)
        return dict(image=pixels, label=label, valid=np.bool_(True))


def eval_batches(
    images: ImageFolder | RecordFolder,
    *,
    batch_size: int,
    img_size: int,
    shard_index: int = 0,
    shard_count: int = 1,
    read_threads: int = 16,
    norm: Normalization = IMAGENET,
) -> Iterator[dict[str, np.ndarray]]:
    """Every image once, in order, with the eval transform and fixed-size batches.

    Yields dict(image=(B, S, S, C) float32, label=(B,) int32, valid=(B,) bool), C and the
    statistics from ``norm`` (default: RGB, ImageNet's). Host
    ``shard_index`` takes every shard_count-th image; all hosts yield the same number of batches,
    the last ones padded with ``valid=False`` rows, as are unreadable files (logged).
    """
    if batch_size < 1 or img_size < 1:
        raise ValueError(f"batch_size {batch_size} and img_size {img_size} must be positive")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
    indices = np.arange(shard_index, len(images), shard_count)
    per_host = -(-len(images) // shard_count)
    num_batches = -(-per_host // batch_size)
    dataset = (
        grain.MapDataset.range(num_batches * batch_size)
        .map(_EvalExample(images, indices, img_size, norm))
        .to_iter_dataset(grain.ReadOptions(num_threads=read_threads))
        .batch(batch_size)
    )
    return iter(dataset)
