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

A record directory may be in a bucket (``gs://bucket/recs``): ``write_records`` uploads it, and
``RecordFolder`` copies its shards to a local cache first (the ArrayRecord reader opens local
files only); see ``RecordFolder``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mae_jax._files import atomic_write, copy_file, is_url, naming, replace_dir, run_path
from mae_jax.data.images import DataError, ImageFolder, open_image

INDEX_NAME = "index.json"
LABELS_NAME = "labels.npy"
FORMAT_NAME = "mae-jax image records"
FORMAT_VERSION = 1
# Default shard size: large enough that even ImageNet-21k makes a few thousand files, small
# enough that a shard copies quickly and that hosts reading a bucket spread over many files.
TARGET_SHARD_BYTES = 512 * 2**20
_WRITER_OPTIONS = "group_size:1,uncompressed"
_HEADER = struct.Struct("<iH")  # label, length of the relative path
CACHE_ENV = "MAE_JAX_CACHE"  # the local cache folder (default ~/.cache/mae-jax)
_STAGING_THREADS = 4  # shards copied from a bucket at a time


def is_record_dir(root: str | os.PathLike) -> bool:
    """Whether ``root`` (a local folder or a bucket URL) is a record directory (it holds
    ``index.json``)."""
    if is_url(root):
        index = run_path(root) / INDEX_NAME
        with naming(index):
            return index.is_file()
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

    ``root`` may be a bucket URL (``gs://bucket/recs``). The ArrayRecord reader opens local files
    only, so ``index.json`` and ``labels.npy`` are read from the bucket and the shards are first
    copied into a local cache, ``$MAE_JAX_CACHE/records/<hash of the URL>/`` (default
    ``~/.cache/mae-jax/records/...``); a shard already there with the bucket's size and time is
    reused, so only the first run on a machine copies, and processes staging at the same time
    are safe (each copy is written under a temporary name, checked and renamed). The cache needs
    the data set's size in local disk: for a data set larger than the local disk, mount the
    bucket with gcsfuse (``gcsfuse --implicit-dirs BUCKET /mnt/BUCKET``) and pass the mount path
    (``/mnt/BUCKET/recs``) instead of the URL.
    """

    def __init__(self, root: str | os.PathLike):
        import grain

        self.root = str(root) if is_url(root) else os.fspath(root)
        remote = is_url(self.root)
        index_path = _join(self.root, INDEX_NAME)
        if remote and not is_record_dir(self.root):
            raise DataError(
                f"{self.root}: is not a record directory (no {INDEX_NAME}); data in a bucket must "
                "be packed with mae-jax prepare-data, or the bucket mounted with gcsfuse"
            )
        try:
            index = json.loads(_read_bytes(index_path))
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
        names = [s["file"] for s in index["shards"]]
        counts = [int(s["count"]) for s in index["shards"]]
        count = int(index["count"])
        if sum(counts) != count:
            raise DataError(f"{index_path}: shard counts add up to {sum(counts)}, not {count}")
        labels_path = _join(self.root, LABELS_NAME)
        try:
            self.labels = np.load(io.BytesIO(_read_bytes(labels_path))).astype(np.int32)
        except (OSError, ValueError) as err:
            raise DataError(f"{labels_path}: cannot read labels ({err})") from err
        if self.labels.shape != (count,):
            raise DataError(f"{labels_path}: holds {self.labels.shape} labels, expected ({count},)")
        if remote:
            self.shards = tuple(stage_shards(self.root, names))
        else:
            self.shards = tuple(os.path.join(self.root, name) for name in names)
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


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if is_url(root) else os.path.join(root, name)


def _read_bytes(path: str) -> bytes:
    """A small file's bytes, local or in a bucket (an error names ``path``)."""
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    with naming(path):
        return run_path(path).read_bytes()


def cache_dir() -> str:
    """The local cache folder: ``$MAE_JAX_CACHE``, default ``~/.cache/mae-jax``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mae-jax")


def stage_shards(root: str, names: list[str]) -> list[str]:
    """Local copies of the shards ``names`` of the record directory ``root`` in a bucket, in the
    cache (see ``RecordFolder``): a copy of the bucket object's size and modification time is
    reused, others are copied (a temporary name, the size checked, then renamed)."""
    local_dir = os.path.join(
        cache_dir(), "records", hashlib.sha256(root.rstrip("/").encode()).hexdigest()[:32]
    )
    os.makedirs(local_dir, exist_ok=True)
    remote = run_path(root)
    locals_, todo = [], []
    for name in names:
        src, local = remote / name, os.path.join(local_dir, name)
        with naming(src):
            try:
                info = src.stat()
            except FileNotFoundError:
                raise DataError(f"{src}: shard is missing") from None
        locals_.append(local)
        if not _is_staged(local, info.length, info.mtime):
            todo.append((src, local, info))
    if todo:
        size = sum(info.length for _, _, info in todo)
        print(
            f"mae-jax: copying {len(todo)} of {len(names)} shard(s) of {root} "
            f"({size / 2**20:.1f} MiB) to {local_dir}",
            file=sys.stderr,
            flush=True,
        )

        def stage(job) -> None:
            src, local, info = job
            with naming(src):
                copy_file(src, local, size=info.length)
            if info.mtime:
                os.utime(local, (info.mtime, info.mtime))

        with ThreadPoolExecutor(min(_STAGING_THREADS, len(todo))) as pool:
            list(pool.map(stage, todo))
    return locals_


def _is_staged(local: str, size: int, mtime: float | None) -> bool:
    try:
        st = os.stat(local)
    except OSError:
        return False
    return st.st_size == size and (not mtime or int(st.st_mtime) == int(mtime))


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

    ``shards``: number of shard files (default: about 512 MiB each). A local ``out`` is written
    under a temporary name beside it and renamed when complete. A bucket URL ``out`` is uploaded
    file by file (each shard written to a local temporary file, uploaded, deleted), ``index.json``
    last: until it is there, ``out`` is no record directory. An existing ``out`` is refused unless
    ``force``. Files are stored as they are, readable or not (the loaders skip and count
    unreadable ones, exactly as from the folder). Returns the index as a dict, plus
    ``unreadable``: how many files Pillow could not even open.
    """
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    images = ImageFolder(folder)
    remote = is_url(out)
    if remote:
        out = run_path(out)
        with naming(out):
            if out.exists() and not force:
                raise DataError(f"{out}: already exists (pass --force to replace it)")
    else:
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

    if remote:
        tmp = Path(tempfile.mkdtemp(prefix="mae-jax-records-"))
        with naming(out):
            if out.exists():  # force: no index first, so it is no record directory meanwhile
                (out / INDEX_NAME).unlink(missing_ok=True)
                out.rmtree()
    else:
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()

    def finished(name: str) -> None:
        """The file ``name`` is complete in ``tmp``: a bucket gets it now (then it goes)."""
        if remote:
            with naming(out):
                copy_file(tmp / name, out / name)
            (tmp / name).unlink()

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
            finished(name)
            shard_entries.append(dict(file=name, count=bounds[s + 1] - bounds[s]))
        bar.close()
        np.save(tmp / LABELS_NAME, images.labels)
        finished(LABELS_NAME)
        index = dict(
            format=FORMAT_NAME,
            version=FORMAT_VERSION,
            count=count,
            classes=list(images.classes),
            shards=shard_entries,
            source=os.path.abspath(images.root),
        )
        index_text = json.dumps(index, indent=1) + "\n"
        if remote:  # last: it makes the directory a record directory
            with naming(out):
                atomic_write(out / INDEX_NAME, index_text)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            (tmp / INDEX_NAME).write_text(index_text, encoding="utf-8")
            replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if remote:
            try:
                out.rmtree(missing_ok=True)
            except Exception:  # cleaning up after a failure: the failure is what to report
                pass
        raise
    return dict(index, unreadable=unreadable, bytes=sum(sizes))
