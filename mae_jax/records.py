"""Image sets as sharded ArrayRecord files: ``write_records`` (``mae-jax prepare-data``) and
``RecordFolder``, which the loaders read like an ``ImageFolder``.

A record directory holds:

- ``index.json``: format name and version, classes, image count, and the shards in order with
  their record counts;
- ``labels.npy``: (N,) int32, the labels in record order (read without touching the shards);
- ``images-SSSSS-of-TTTTT.array_record``: the images in the folder's order (sorted by class, then
  path), split into consecutive runs. Each record is a little-endian int32 label, a uint16 length
  and that many bytes of the image's path relative to the folder (UTF-8), then the image file's
  bytes exactly as they were (no re-encoding). ``group_size:1`` and no compression: every record
  can be read on its own, and JPEG bytes do not compress anyway.

Example i is the folder's image i, so the same seed gives the same batches from either.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import numpy as np

from mae_jax.data import DataError, ImageFolder, open_image

INDEX_NAME = "index.json"
LABELS_NAME = "labels.npy"
FORMAT_NAME = "mae-jax image records"
FORMAT_VERSION = 1
# Default shard size: large enough that even ImageNet-21k makes a few thousand files, small
# enough that a shard copies quickly and that hosts reading a bucket spread over many files.
TARGET_SHARD_BYTES = 512 * 2**20
_WRITER_OPTIONS = "group_size:1,uncompressed"
_HEADER = struct.Struct("<iH")  # label, length of the relative path


def is_record_dir(root: str | os.PathLike) -> bool:
    """Whether ``root`` is a record directory (it holds ``index.json``)."""
    return os.path.isfile(os.path.join(os.fspath(root), INDEX_NAME))


def encode_record(label: int, name: str, encoded: bytes) -> bytes:
    """One record: label, relative path and the image file's bytes."""
    name_bytes = name.encode("utf-8")
    return _HEADER.pack(label, len(name_bytes)) + name_bytes + encoded


def decode_record(record: bytes) -> tuple[int, str, bytes]:
    """A record's (label, relative path, image file bytes); ValueError if it is too short."""
    if len(record) < _HEADER.size:
        raise ValueError(f"record of {len(record)} bytes is shorter than its header")
    label, name_length = _HEADER.unpack_from(record)
    start = _HEADER.size + name_length
    if len(record) < start:
        raise ValueError(f"record of {len(record)} bytes is shorter than its header")
    return label, record[_HEADER.size : start].decode("utf-8", "replace"), record[start:]


def shard_name(index: int, count: int) -> str:
    """File name of shard ``index`` of ``count``."""
    return f"images-{index:05d}-of-{count:05d}.array_record"


class RecordFolder:
    """A record directory read like an ``ImageFolder``: ``root``, ``classes``, ``labels``, ``len``.

    ``read(i)`` gives image i's encoded bytes and a name for messages (shard file, record number
    and the image's original relative path). Picklable, for grain worker processes: each process
    opens the shards itself on first use.
    """

    def __init__(self, root: str | os.PathLike):
        import grain

        self.root = os.fspath(root)
        index_path = os.path.join(self.root, INDEX_NAME)
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
        except OSError as err:
            raise DataError(f"{index_path}: cannot read ({err.strerror or err})") from err
        except ValueError as err:
            raise DataError(f"{index_path}: is not valid JSON ({err})") from err
        if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
            raise DataError(f"{index_path}: is not a mae-jax record index")
        if index.get("version") != FORMAT_VERSION:
            raise DataError(
                f"{index_path}: format version {index.get('version')} is not supported "
                f"(this mae-jax reads version {FORMAT_VERSION}); run mae-jax prepare-data again"
            )
        self.classes = tuple(index["classes"])
        self.shards = tuple(os.path.join(self.root, s["file"]) for s in index["shards"])
        counts = [int(s["count"]) for s in index["shards"]]
        count = int(index["count"])
        if sum(counts) != count:
            raise DataError(f"{index_path}: shard counts add up to {sum(counts)}, not {count}")
        labels_path = os.path.join(self.root, LABELS_NAME)
        try:
            self.labels = np.load(labels_path).astype(np.int32)
        except (OSError, ValueError) as err:
            raise DataError(f"{labels_path}: cannot read labels ({err})") from err
        if self.labels.shape != (count,):
            raise DataError(f"{labels_path}: holds {self.labels.shape} labels, expected ({count},)")
        for path in self.shards:
            if not os.path.isfile(path):
                raise DataError(f"{path}: shard is missing")
        try:
            self._source = grain.sources.ArrayRecordDataSource(list(self.shards))
        except Exception as err:  # the C++ reader reports corrupt files with various types
            raise DataError(f"{self.root}: cannot open its shards ({err})") from err
        if len(self._source) != count:
            raise DataError(f"{self.root}: shards hold {len(self._source)} records, index {count}")
        self._starts = np.cumsum([0, *counts[:-1]])

    def __len__(self) -> int:
        return len(self.labels)

    def _where(self, index: int) -> str:
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return f"{self.shards[shard]} record {index - int(self._starts[shard])}"

    def read(self, index: int) -> tuple[bytes, str]:
        """Image ``index``'s encoded bytes and a name for messages; DataError if unreadable."""
        try:
            record = self._source[index]
            _, name, encoded = decode_record(record)
        except Exception as err:  # a damaged shard surfaces as the reader's own exception types
            raise DataError(f"{self._where(index)}: cannot read record ({err})") from err
        return encoded, f"{self._where(index)} ({name})"

    def __repr__(self) -> str:
        return f"RecordFolder({self.root!r}: {len(self)} images, {len(self.classes)} classes)"


def _default_shard_count(total_bytes: int, count: int) -> int:
    return max(1, min(count, math.ceil(total_bytes / TARGET_SHARD_BYTES)))


def write_records(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    shards: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Writes the images of ``folder`` (an ImageFolder layout) as a record directory ``out``.

    ``shards``: number of shard files (default: about 512 MiB each). The directory is written
    under a temporary name beside ``out`` and renamed when complete; an existing ``out`` is
    refused unless ``force``. Files are stored as they are, readable or not (the loaders skip and
    count unreadable ones, exactly as from the folder). Returns the index as a dict, plus
    ``unreadable``: how many files Pillow could not even open.
    """
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    images = ImageFolder(folder)
    out = Path(out)
    if os.path.lexists(out) and not force:
        raise DataError(f"{out}: already exists (pass --force to replace it)")
    if not out.parent.is_dir():
        raise DataError(f"{out.parent}: folder does not exist")
    try:
        sizes = [os.path.getsize(p) for p in images.paths]
    except OSError as err:
        raise DataError(f"{err.filename}: cannot read file ({err.strerror})") from err
    count = len(images)
    num_shards = _default_shard_count(sum(sizes), count) if shards is None else shards
    if not 1 <= num_shards <= count:
        raise DataError(f"{folder}: cannot split {count} images into {num_shards} shards")
    bounds = [count * s // num_shards for s in range(num_shards + 1)]

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    unreadable = 0
    try:
        bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, disable=not progress, leave=False)
        shard_entries = []
        for s in range(num_shards):
            name = shard_name(s, num_shards)
            writer = ArrayRecordWriter(str(tmp / name), _WRITER_OPTIONS)
            try:
                for i in range(bounds[s], bounds[s + 1]):
                    encoded, path = images.read(i)
                    try:  # the header only: cheap, and worth a warning before a long run
                        open_image(encoded, path).close()
                    except DataError:
                        unreadable += 1
                    relative = os.path.relpath(path, images.root)
                    writer.write(encode_record(int(images.labels[i]), relative, encoded))
                    bar.update(sizes[i])
            finally:
                writer.close()
            shard_entries.append(dict(file=name, count=bounds[s + 1] - bounds[s]))
        bar.close()
        np.save(tmp / LABELS_NAME, images.labels)
        index = dict(
            format=FORMAT_NAME,
            version=FORMAT_VERSION,
            count=count,
            classes=list(images.classes),
            shards=shard_entries,
            source=os.path.abspath(images.root),
        )
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
        if os.path.lexists(out):  # force: move the old one aside first, delete it after
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dict(index, unreadable=unreadable, bytes=sum(sizes))
