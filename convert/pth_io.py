"""Read and write PyTorch `.pth` files (the torch.save zip format) with NumPy, without torch.

Reading never executes anything from the file: `data.pkl` goes through an unpickler that admits
only an allow-list of globals (tensors, typed storages, OrderedDict, argparse.Namespace), and each
storage is read straight from its place in the archive into one preallocated NumPy buffer.
Reading is bounded by the file, not by what it declares: a storage's record must be exactly the
size its storage declares (refused before anything is read otherwise), a compressed record is
inflated no further than that, and all records read together may take at most 16 times the
file's size (torch.save stores records uncompressed, so a real file takes 1x). A tensor is refused
when its view reaches outside its storage, or (``allow_overlap=False``) when its elements overlap;
the error names where the tensor sits in the object (``['model']['pos_embed']``).
Writing emits the pickle opcodes by hand, so the file names torch's globals without torch installed.
Either path may be a bucket URL (``gs://...``): such a file is copied through a local temporary
file (see ``_open_for_reading``, ``mae_jax._files.atomic_write``).
See shared/reference/PTH_FORMAT.md for the layout.
"""

from __future__ import annotations

import argparse
import collections
import io
import mmap
import os
import pickle
import secrets
import shutil
import struct
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO, NamedTuple

import ml_dtypes
import numpy as np

from mae_jax._files import PathError, atomic_write, is_url, naming, run_path

__all__ = ["PthError", "read_pth", "write_pth"]


class PthError(Exception):
    """A .pth file that cannot be read or written; the message is one line: "<path>: <problem>"."""


# Legacy typed-storage class (a global in torch's module) <-> element dtype.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}
_DTYPE_STORAGES: dict[np.dtype, str] = {dtype: name for name, dtype in _STORAGE_DTYPES.items()}

_ALIGNMENT = 64  # torch.save starts every record's bytes at a multiple of 64 in the archive
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then name and extra-field lengths
_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
_MMAP_FROM = 1 << 20  # storages this large get their own anonymous mapping (see _new_buffer)
_READ_CHUNK = 1 << 28  # bound one read() call; some platforms reject larger single reads
_INFLATE_CHUNK = 1 << 24  # bound what one zlib call may produce
# What the records read may take together: this many times the file's size, plus a little. A file
# written by torch.save takes 1x (its records are stored); only compressed records can take more.
_INFLATION = 16
_INFLATION_SLACK = 1 << 24


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _fail(path: str, problem: object) -> PthError:
    return PthError(f"{path}: {_one_line(problem)}")


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


class _StorageType(NamedTuple):
    """Stands in for a global such as torch.FloatStorage; immutable, so BUILD cannot alter it."""

    name: str
    dtype: np.dtype


class _Storage(NamedTuple):
    """A storage as the pickle sees it; immutable so a crafted BUILD cannot swap its array."""

    key: str
    array: np.ndarray  # 1-D, C-contiguous, owned


class _Refused:
    """Stands in for a tensor (or its storage) the reader refuses. Loading goes on, so that
    read_pth can name where the tensor sits in the object before it raises; no bytes are read
    for it."""

    __slots__ = ("problem",)

    def __init__(self, problem: str):
        self.problem = problem


def read_pth(
    path: str | os.PathLike,
    *,
    progress: bool = False,
    digest: Any = None,
    allow_overlap: bool = True,
) -> Any:
    """Object graph of a torch.save zip file, every tensor a NumPy array of its shape and dtype.

    ``digest``: a hashlib object (e.g. ``hashlib.sha256()``) to be fed the whole file, byte for
    byte in order, while it is read: each storage is hashed from the buffer it was read into, on
    another thread, so the file is not read twice. It is complete when read_pth returns.
    ``allow_overlap=False``: refuse a tensor whose elements overlap in its storage (a zero stride,
    as ``expand`` makes, or other aliasing strides). torch.load accepts them, but weights have
    none, and such a tensor takes more memory, once copied, than the file holds.
    """
    path = str(path) if is_url(path) else os.fspath(path)
    try:
        file = _open_for_reading(path)  # closed by the with below
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except IsADirectoryError:
        raise _fail(path, "is a directory, not a .pth file") from None
    except PathError as e:  # a bucket's error, already "<path>: <problem>"
        raise PthError(_one_line(e)) from None
    except OSError as e:
        raise _fail(path, f"cannot open: {e.strerror or e}") from None
    with file:
        hasher = None if digest is None else _FileHasher(path, file, digest)
        try:
            archive = _Archive(path, file, hasher)
            pickled = archive.read_member(archive.top + "/data.pkl", "data.pkl")
            with archive.progress_bar(progress) as bar:
                unpickler = _SafeUnpickler(io.BytesIO(pickled), archive, bar, allow_overlap)
                try:
                    obj = unpickler.load()
                    unpickler.finish()
                except PthError:
                    raise
                except Exception as e:  # anything else raised while decoding untrusted bytes
                    raise _fail(path, f"malformed data.pkl ({type(e).__name__}: {e})") from None
            if unpickler.refused:
                raise _fail(path, _refusal(obj, unpickler.refused))
            if hasher is not None:
                hasher.finish()
        finally:
            if hasher is not None:
                hasher.close()
    return obj


def _open_for_reading(path: str) -> BinaryIO:
    """``path`` opened for reading. A file in a bucket is first copied into an anonymous local
    temporary file (deleted when closed): the reader below needs a file descriptor (pread,
    fstat) and reads each storage with one large read; a local file is opened as it is."""
    if not is_url(path):
        return open(path, "rb")
    local = tempfile.TemporaryFile()
    try:
        with naming(path), run_path(path).open("rb") as remote:
            shutil.copyfileobj(remote, local, 1 << 24)
        local.seek(0)
    except BaseException:
        local.close()
        raise
    return local


class _FileHasher:
    """Feeds a hashlib object the whole file in order, from the buffers the storages are read into.

    ``add(start, buffer)`` is called with each storage's bytes as read from offset ``start``; the
    bytes between them (zip headers, data.pkl, the directory) are read with pread. The hashing runs
    on one worker thread (hashlib releases the GIL), in the order of the calls, so it overlaps the
    reading of the next storage. Storages read out of file order are covered by the gap reads.
    """

    _GAP_CHUNK = 1 << 24

    def __init__(self, path: str, file: BinaryIO, digest: Any):
        from concurrent.futures import ThreadPoolExecutor

        self._path = path
        self._fd = file.fileno()
        self._digest = digest
        self._done = 0  # bytes [0, _done) are hashed or queued
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pth_io-hash")
        self._jobs: list = []
        self._error: BaseException | None = None

    def add(self, start: int, buffer: np.ndarray, *, wait: bool = False) -> None:
        """Queue ``buffer``, the file's bytes from ``start``; ``wait``: until it is hashed (its
        bytes are about to change)."""
        end = start + buffer.nbytes
        if end <= self._done:
            return
        gap = (self._done, start) if start > self._done else None
        data = memoryview(buffer).cast("B")[max(0, self._done - start) :]
        self._done = end
        self._jobs = [j for j in self._jobs if not j.done()]
        self._jobs.append(self._pool.submit(self._hash, gap, data))
        if wait:
            self._wait()

    def finish(self) -> None:
        size = os.fstat(self._fd).st_size
        if size > self._done:
            self._jobs.append(self._pool.submit(self._hash, (self._done, size), None))
            self._done = size
        self._wait()

    def _wait(self) -> None:
        for job in self._jobs:
            job.result()
        self._jobs = []
        if self._error is not None:
            raise _fail(self._path, f"cannot read it to hash it: {self._error}")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _hash(self, gap: tuple[int, int] | None, data: memoryview | None) -> None:
        if self._error is not None:
            return
        try:
            if gap is not None:
                offset, end = gap
                while offset < end:
                    chunk = os.pread(self._fd, min(self._GAP_CHUNK, end - offset), offset)
                    if not chunk:
                        raise OSError("the file ends early")
                    self._digest.update(chunk)
                    offset += len(chunk)
            if data is not None:
                self._digest.update(data)
        except OSError as e:
            self._error = e


class _Archive:
    """The zip container of a .pth file: its top folder and raw access to its records."""

    def __init__(self, path: str, file: BinaryIO, hasher: _FileHasher | None = None):
        self.path = path
        self.file = file
        self.hasher = hasher
        self.file_size = os.fstat(file.fileno()).st_size
        head = file.read(4)
        file.seek(0)
        if head != _LOCAL_HEADER_SIGNATURE:
            raise _fail(path, _not_a_zip_reason(head))
        try:
            self.zip = zipfile.ZipFile(file)
        except Exception as e:  # zipfile raises BadZipFile, struct.error, OSError... on bad bytes
            raise _fail(path, f"truncated or corrupt zip archive ({e})") from None
        for info in self.zip.infolist():
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                # zipfile would inflate these without bound; torch reads neither
                raise _fail(
                    path,
                    f"record {info.filename[:200]!r} is compressed with zip method "
                    f"{info.compress_type}: only stored or deflated records can be read",
                )
        self._allowance = _INFLATION * self.file_size + _INFLATION_SLACK
        self._taken = 0  # bytes read out of the archive so far
        pickles = [n for n in self.zip.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if not pickles:
            raise _fail(
                path, "zip archive without <folder>/data.pkl: not a file written by torch.save"
            )
        self.top = pickles[0].split("/")[0]
        self.byteorder = "little"  # files written before torch 1.9 have no byteorder record
        if self.top + "/byteorder" in self.zip.NameToInfo:
            self.byteorder = self.read_member(self.top + "/byteorder", "byteorder").decode(
                "ascii", "replace"
            )
            if self.byteorder not in ("little", "big"):
                raise _fail(path, f"unknown byteorder {self.byteorder!r}")

    def storage_bytes(self) -> int:
        prefix = self.top + "/data/"
        return sum(i.file_size for i in self.zip.infolist() if i.filename.startswith(prefix))

    def progress_bar(self, enabled: bool):
        from contextlib import nullcontext

        if not enabled:
            return nullcontext(None)
        from tqdm import tqdm

        return tqdm(
            total=self.storage_bytes(),
            unit="B",
            unit_scale=True,
            desc=os.path.basename(self.path),
        )

    def read_member(self, name: str, what: str) -> bytes:
        """Small record through zipfile, which checks its CRC and inflates no more than the
        record's size."""
        try:
            info = self.zip.getinfo(name)
        except KeyError:
            raise _fail(self.path, f"{what} missing from the zip archive") from None
        self._take(info.file_size, what)
        try:
            return self.zip.read(info)
        except Exception as e:
            raise _fail(self.path, f"cannot read {what}: {e}") from None

    def read_storage(self, key: str, nbytes: int, declared: str) -> np.ndarray:
        """Bytes of `<top>/data/<key>` as a new uint8 array of ``nbytes``, what its storage
        (``declared``) needs: a record of another size is refused before anything is read, a
        compressed one is inflated no further. One read into one buffer, CRC checked."""
        name = f"{self.top}/data/{key}"
        what = f"storage {name!r}"
        try:
            info = self.zip.getinfo(name)
        except KeyError:
            raise _fail(self.path, f"{what} missing from the zip archive") from None
        if info.file_size != nbytes:
            raise _fail(
                self.path,
                f"{what} holds {info.file_size} bytes, {declared} needs {nbytes} "
                "(the sizes must agree)",
            )
        self._take(nbytes, what)
        stored = info.compress_type == zipfile.ZIP_STORED
        start = self._data_offset(info, what)
        if start + (nbytes if stored else info.compress_size) > self.file_size:
            raise _fail(self.path, f"{what} runs past the end of the file (truncated file?)")
        buffer = _new_buffer(nbytes)
        self.file.seek(start)
        if stored:
            view = memoryview(buffer)
            done = 0
            while done < nbytes:
                got = self.file.readinto(view[done : done + _READ_CHUNK])
                if not got:
                    raise _fail(self.path, f"{what} ends early (truncated file?)")
                done += got
        else:  # torch never compresses; a re-zipped file may be deflated
            self._inflate(info.compress_size, buffer, what)
        if zlib.crc32(buffer) != info.CRC:
            raise _fail(self.path, f"{what} fails its CRC check: the file is corrupt")
        if self.hasher is not None and stored:  # its bytes change next if byte-swapped
            self.hasher.add(start, buffer, wait=self.byteorder != sys.byteorder)
        return buffer

    def _inflate(self, compressed: int, buffer: np.ndarray, what: str) -> None:
        """Fill ``buffer`` from the deflate stream of ``compressed`` bytes at the file's position;
        a stream that would give even one byte more, or fewer, is refused."""
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        pending = b""
        done = 0
        while not inflater.eof:
            if not pending:
                if compressed == 0:
                    break
                pending = self.file.read(min(_INFLATE_CHUNK, compressed))
                if not pending:
                    raise _fail(self.path, f"{what} ends early (truncated file?)")
                compressed -= len(pending)
            try:  # at most one byte past the buffer: enough to see the stream is too long
                out = inflater.decompress(pending, min(_INFLATE_CHUNK, buffer.nbytes - done + 1))
            except zlib.error as e:
                raise _fail(self.path, f"{what} is not a valid deflate stream ({e})") from None
            pending = inflater.unconsumed_tail
            if done + len(out) > buffer.nbytes:
                raise _fail(
                    self.path,
                    f"{what} inflates to more than the {buffer.nbytes} bytes its header and its "
                    "storage declare: refused",
                )
            buffer[done : done + len(out)] = np.frombuffer(out, np.uint8)
            done += len(out)
        if done < buffer.nbytes:
            raise _fail(
                self.path,
                f"{what} inflates to {done} bytes, fewer than the {buffer.nbytes} its header "
                "declares (truncated or corrupt file?)",
            )
        if not inflater.eof:
            raise _fail(self.path, f"{what}: its deflate stream has no end (corrupt file?)")

    def _take(self, nbytes: int, what: str) -> None:
        """Count ``nbytes`` more read out of the archive: refused past what the file allows."""
        self._taken += nbytes
        if self._taken > self._allowance:
            raise _fail(
                self.path,
                f"{what} inflates to {nbytes} bytes, which brings what is read out of the archive "
                f"to {self._taken} bytes, more than the {self._allowance} a file of "
                f"{self.file_size} bytes may give ({_INFLATION}x, plus 16 MiB): refused as a "
                "zip bomb (torch.save stores its records uncompressed)",
            )

    def _data_offset(self, info: zipfile.ZipInfo, what: str) -> int:
        # The local header's extra field (torch's alignment padding) may differ from the central one.
        self.file.seek(info.header_offset)
        header = self.file.read(_LOCAL_HEADER.size)
        if len(header) < _LOCAL_HEADER.size:
            raise _fail(
                self.path, f"{what}: local header past the end of the file (truncated file?)"
            )
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        if signature != _LOCAL_HEADER_SIGNATURE:
            raise _fail(self.path, f"{what}: bad local header: corrupt zip archive")
        return info.header_offset + _LOCAL_HEADER.size + name_length + extra_length


def _new_buffer(nbytes: int) -> np.ndarray:
    """Uninitialized owned uint8 array; large ones in plain 4 KiB pages.

    NumPy advises transparent huge pages for large arrays; filling such an array from a file was
    2-4x slower here (the kernel compacts memory to find 2 MiB pages), so large buffers come from a
    private anonymous mmap instead, freed with the array.
    """
    if nbytes < _MMAP_FROM or not hasattr(mmap, "MAP_PRIVATE"):
        return np.empty(nbytes, np.uint8)
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), np.uint8)


def _not_a_zip_reason(head: bytes) -> str:
    if not head:
        return "empty file"
    if head[0] == pickle.PROTO[0]:
        return (
            "not a zip archive but a bare pickle: legacy (non-zip) torch format is not "
            "supported; re-save it with torch>=1.6 (torch.save(torch.load(f), f))"
        )
    return "not a zip archive, so not a file written by torch.save"


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a weights file needs; all others are refused."""

    def __init__(self, file: BinaryIO, archive: _Archive, bar: Any, allow_overlap: bool = True):
        super().__init__(file)
        self._archive = archive
        self._bar = bar
        self._allow_overlap = allow_overlap
        self._storages: dict[str, _Storage | _Refused] = {}
        self._declared: dict[str, tuple[str, int]] = {}  # key -> (storage class, element count)
        self.refused: list[_Refused] = []  # in the order met; read_pth names them, then raises
        self._namespaces: list[argparse.Namespace] = []
        # A fresh subclass per load: a crafted BUILD may set attributes on the class it is given,
        # and must not reach the real argparse.Namespace of this process.
        created = self._namespaces

        class Namespace(argparse.Namespace):
            def __new__(cls, *args: Any, **kwargs: Any):
                namespace = super().__new__(cls)
                created.append(namespace)
                return namespace

        self._namespace_class = Namespace

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor  # bound methods: BUILD cannot set attributes on them
        if module == "torch._utils" and name == "_rebuild_parameter":
            return self._rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "argparse" and name == "Namespace":
            return self._namespace_class
        shown = _one_line(f"{module}.{name}")[:200]
        raise _fail(
            self._archive.path,
            f"refuses to load global {shown!r} "
            "(only tensors, containers and plain values are allowed)",
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (
            type(pid) is tuple
            and len(pid) == 5
            and pid[0] == "storage"
            and type(pid[1]) is _StorageType
            and type(pid[2]) is str
            and type(pid[4]) is int
            and pid[4] >= 0
        ):
            raise _fail(self._archive.path, f"unsupported persistent id in data.pkl: {pid!r:.200}")
        _, storage_type, key, _location, numel = pid
        declared = (storage_type.name, numel)
        first = self._declared.setdefault(key, declared)
        if first != declared:
            return self._refuse(
                f"storage {self._archive.top + '/data/' + key!r} is declared as a {first[0]} of "
                f"{first[1]} elements and as a {declared[0]} of {declared[1]}"
            )
        storage = self._storages.get(key)
        if storage is None:
            try:
                buffer = self._archive.read_storage(
                    key,
                    numel * storage_type.dtype.itemsize,
                    f"its {storage_type.name} of {numel} elements",
                )
            except PthError as e:  # named with the tensor it belongs to (see read_pth)
                problem = str(e).removeprefix(f"{self._archive.path}: ")
                storage = self._storages[key] = self._refuse(problem)
                return storage
            if self._archive.byteorder != sys.byteorder:
                buffer = _swap_bytes(buffer, storage_type.dtype)
            storage = self._storages[key] = _Storage(key, buffer.view(storage_type.dtype))
            if self._bar is not None:
                self._bar.update(buffer.nbytes)
        return storage

    def _refuse(self, problem: str) -> _Refused:
        refused = _Refused(problem)
        self.refused.append(refused)
        return refused

    def _rebuild_tensor(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any = False,
        hooks: Any = None,
        *_metadata: Any,
    ) -> np.ndarray:
        """`torch._utils._rebuild_tensor_v2`: a (possibly strided) view of the storage's array."""
        if type(storage) is _Refused:
            return storage
        if not (
            type(storage) is _Storage
            and _is_index(offset)
            and _is_index_tuple(size)
            and _is_index_tuple(stride)
            and len(size) == len(stride)
        ):
            raise self._bad_tensor(storage, offset, size, stride, "malformed arguments")
        array = storage.array
        if 0 in size:
            return np.empty(size, array.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= array.size:
            where = self._layout(storage, offset, size, stride)
            return self._refuse(f"reaches past its storage ({where})")
        if not self._allow_overlap and _overlaps(size, stride, array.size - offset):
            where = self._layout(storage, offset, size, stride)
            return self._refuse(
                f"has elements that overlap in its storage ({where}), as expand makes; weights "
                "never do"
            )
        if offset == 0 and array.size == _count(size) and tuple(stride) == _contiguous(size):
            return array.reshape(size)
        itemsize = array.dtype.itemsize
        return np.lib.stride_tricks.as_strided(
            array[offset:], shape=size, strides=[s * itemsize for s in stride]
        )

    def _rebuild_parameter(self, data: Any, requires_grad: Any = False, *_hooks: Any) -> np.ndarray:
        """`torch._utils._rebuild_parameter`: an nn.Parameter is just its tensor here."""
        if type(data) is _Refused:
            return data
        if not isinstance(data, np.ndarray):
            raise _fail(self._archive.path, "malformed data.pkl: a parameter that is not a tensor")
        return data

    def _layout(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> str:
        name = f"{self._archive.top}/data/{storage.key}"
        return (
            f"storage {name!r} of {storage.array.size} elements, offset {offset}, "
            f"size {_short(size)}, stride {_short(stride)}"
        )

    def _bad_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, why: str) -> PthError:
        key = storage.key if type(storage) is _Storage else "?"
        return _fail(
            self._archive.path,
            f"malformed tensor in data.pkl ({why}): storage {key!r}, offset {offset!r:.40}, "
            f"size {size!r:.80}, stride {stride!r:.80}",
        )

    def finish(self) -> None:
        """Turn this load's Namespace stand-ins into real argparse.Namespace objects."""
        for namespace in self._namespaces:
            namespace.__class__ = argparse.Namespace


def _refusal(obj: Any, refused: list[_Refused]) -> str:
    """The first refused tensor, named by where it sits in ``obj`` (``['model']['w']``)."""
    first = refused[0]
    where = _locate(obj, first)
    named = f"tensor {where}" if where is not None else "a tensor in data.pkl"
    more = len({id(r) for r in refused}) - 1
    return f"{named}: {first.problem}" + (f" (and {more} more tensors refused)" if more else "")


def _locate(obj: Any, target: object) -> str | None:
    """Where ``target`` sits in the loaded object (containers, Namespaces, attributes), as a
    subscript path; None when it is not reachable (a crafted pickle may drop it)."""
    stack: list[tuple[Any, str]] = [(obj, "")]
    seen: set[int] = set()
    while stack:
        item, where = stack.pop()
        if item is target:
            return where or "(the whole object)"
        if id(item) in seen or isinstance(item, (np.ndarray, str, bytes, int, float)):
            continue
        seen.add(id(item))
        children: list[tuple[Any, str]] = []
        if isinstance(item, dict):
            for key, value in item.items():
                name = _short(key)
                children += [(key, f"{where}[{name}] (the key)"), (value, f"{where}[{name}]")]
        elif isinstance(item, (list, tuple)):
            children += [(value, f"{where}[{i}]") for i, value in enumerate(item)]
        if hasattr(item, "__dict__"):  # a Namespace's fields, an OrderedDict's _metadata
            children += [(value, f"{where}.{name}") for name, value in vars(item).items()]
        stack.extend(reversed(children))
    return None


def _short(value: Any) -> str:
    text = _one_line(repr(value))
    return text if len(text) <= 80 else text[:77] + "..."


def _overlaps(size: tuple[int, ...], stride: tuple[int, ...], room: int) -> bool:
    """Whether two elements of a view (sizes, strides in elements; every index in bounds) share a
    place in a storage with ``room`` elements from the view's offset."""
    reach = 0  # the largest offset the dimensions taken so far reach
    for step, n in sorted((s, n) for n, s in zip(size, stride, strict=True) if n > 1):
        if step <= reach:
            break
        reach += step * (n - 1)
    else:
        return False  # nested like the dimensions of a (sliced, permuted) contiguous array
    if _count(size) > room:
        return True
    # Interleaved strides (as_strided can make them) may still be distinct: count the places.
    places = np.zeros((), np.int64)
    for n, s in zip(size, stride, strict=True):
        places = np.add.outer(places, np.arange(n, dtype=np.int64) * s)
    return np.unique(places).size < places.size


def _is_index(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_index_tuple(value: Any) -> bool:
    return type(value) is tuple and all(_is_index(v) for v in value)


def _count(size: tuple[int, ...]) -> int:
    count = 1
    for n in size:
        count *= n
    return count


def _contiguous(size: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides in elements, as torch computes them (a dimension of 0 counts as 1)."""
    strides = []
    step = 1
    for n in reversed(size):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _swap_bytes(buffer: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Reverse each element's bytes in place (for a file written on a machine of the other order)."""
    unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize  # complex: each half
    if unit > 1:
        usable = buffer.nbytes - buffer.nbytes % unit
        buffer[:usable].view(f"u{unit}").byteswap(inplace=True)
    return buffer


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def write_pth(
    obj: Any,
    path: str | os.PathLike,
    *,
    progress: bool = False,
    check_interrupt: Callable[[], None] | None = None,
) -> None:
    """Write obj (nested dict/list/tuple/str/int/float/bool/None, array leaves) as torch.save would.

    Arrays become tensors of the same shape and dtype (bool, uint8, int8/16/32/64, float16/32/64,
    bfloat16, complex64/128); each array object gets its own storage. argparse.Namespace is kept,
    an OrderedDict stays an OrderedDict. The file is written to a temporary name, then renamed.
    ``check_interrupt`` is called before each storage and once all are written, before the
    rename: what it raises abandons the write and removes the temporary file.
    """
    path = str(path) if is_url(path) else os.fspath(path)
    encoder = _PickleEncoder(path)
    pickled = encoder.encode(obj)
    top = _archive_folder(path)
    filename = run_path(path).name

    def write(file: BinaryIO) -> None:
        _write_archive(file, top, pickled, encoder.arrays, progress, filename, check_interrupt)

    try:
        with naming(path):  # a bucket object is written from a local temporary file
            atomic_write(path, write)
    except PathError as e:  # a bucket's error, already "<path>: <problem>"
        raise PthError(_one_line(e)) from None
    except OSError as e:
        raise _fail(path, f"cannot write: {e.strerror or e}") from None


def _archive_folder(path: str) -> str:
    """The top folder torch.save uses: the file name without its extension."""
    stem = os.path.splitext(os.path.basename(path))[0]
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in stem)
    return safe or "archive"


def _write_archive(
    file: BinaryIO,
    top: str,
    pickled: bytes,
    arrays: list[np.ndarray],
    progress: bool,
    label: str,
    check_interrupt: Callable[[], None] | None = None,
) -> None:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(a.nbytes for a in arrays), unit="B", unit_scale=True, desc=label)
    try:
        with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            # Record order and contents as torch.save (2.x) writes them.
            _write_record(archive, file, f"{top}/data.pkl", pickled)
            _write_record(archive, file, f"{top}/.format_version", b"1")
            _write_record(archive, file, f"{top}/.storage_alignment", str(_ALIGNMENT).encode())
            _write_record(archive, file, f"{top}/byteorder", sys.byteorder.encode())
            for key, array in enumerate(arrays):
                if check_interrupt is not None:
                    check_interrupt()
                contiguous = np.ascontiguousarray(array)
                if not contiguous.dtype.isnative:
                    contiguous = contiguous.astype(contiguous.dtype.newbyteorder("="))
                data = memoryview(contiguous.reshape(-1).view(np.uint8))
                _write_record(archive, file, f"{top}/data/{key}", data)
                if bar is not None:
                    bar.update(array.nbytes)
            _write_record(archive, file, f"{top}/version", b"3\n")
            serialization_id = f"{secrets.randbits(128):040d}".encode()
            _write_record(archive, file, f"{top}/.data/serialization_id", serialization_id)
        if check_interrupt is not None:
            check_interrupt()
    finally:
        if bar is not None:
            bar.close()


# Records from this size on get a zip64 extra field. We decide it (force_zip64) instead of zipfile,
# to know the header's length in advance; half zipfile's own limit, so zipfile never overrides us.
_ZIP64_FROM = zipfile.ZIP64_LIMIT // 2
_ZIP64_EXTRA = 20


def _write_record(
    archive: zipfile.ZipFile, file: BinaryIO, name: str, data: bytes | memoryview
) -> None:
    """Write one stored record whose bytes start at a multiple of 64 in the file."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = len(data)
    zip64 = len(data) >= _ZIP64_FROM
    unpadded = file.tell() + 30 + len(name.encode()) + 4 + (_ZIP64_EXTRA if zip64 else 0)
    padding = -unpadded % _ALIGNMENT
    # Padding goes in an extra field of its own (id "FB", as torch does); zipfile appends zip64's.
    info.extra = struct.pack("<HH", 0x4246, padding) + b"Z" * padding
    with archive.open(info, "w", force_zip64=zip64) as record:
        if file.tell() % _ALIGNMENT:
            raise RuntimeError(f"pth_io: record {name} is not {_ALIGNMENT}-byte aligned (bug)")
        record.write(data)


class _PickleEncoder:
    """Protocol-2 pickle of plain data in which arrays are written as torch tensors."""

    def __init__(self, path: str):
        self.path = path
        self.arrays: list[np.ndarray] = []  # storage key i holds arrays[i]
        self._keys: dict[int, int] = {}  # id(array) -> storage key, so a repeated array is shared
        self._open: set[int] = set()  # containers being written, to catch reference cycles
        self._out = io.BytesIO()

    def encode(self, obj: Any) -> bytes:
        self._out.write(pickle.PROTO + b"\x02")
        self._save(obj, "the object")
        self._out.write(pickle.STOP)
        return self._out.getvalue()

    def _save(self, obj: Any, where: str) -> None:
        write = self._out.write
        if obj is None:
            write(pickle.NONE)
        elif obj is True or obj is False:
            write(pickle.NEWTRUE if obj else pickle.NEWFALSE)
        elif isinstance(obj, int) and not isinstance(obj, bool):
            self._save_int(int(obj))
        elif isinstance(obj, float):
            write(pickle.BINFLOAT + struct.pack(">d", obj))
        elif isinstance(obj, str):
            encoded = obj.encode("utf-8", "surrogatepass")
            write(pickle.BINUNICODE + struct.pack("<I", len(encoded)) + encoded)
        elif isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
            self._save(obj.item(), where)
        elif isinstance(obj, np.ndarray):
            self._save_array(obj, where)
        elif isinstance(obj, (dict, list, tuple, argparse.Namespace)):
            self._save_container(obj, where)
        elif hasattr(obj, "__array__") and hasattr(obj, "dtype") and hasattr(obj, "shape"):
            try:  # a jax.Array or similar
                array = np.asarray(obj)
            except Exception as e:
                raise _fail(
                    self.path,
                    f"cannot turn the {type(obj).__name__} at {where} into a NumPy array ({e})",
                ) from None
            self._save_array(array, where)
        else:
            raise _fail(self.path, f"cannot write {type(obj).__name__} at {where}")

    def _save_container(self, obj: Any, where: str) -> None:
        if id(obj) in self._open:
            raise _fail(self.path, f"reference cycle at {where}")
        self._open.add(id(obj))
        write = self._out.write
        if isinstance(obj, argparse.Namespace):
            write(_global("argparse", "Namespace") + pickle.EMPTY_TUPLE + pickle.NEWOBJ)
            self._save_items(vars(obj), where)
            write(pickle.BUILD)
        elif isinstance(obj, collections.OrderedDict):
            write(_global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE)
            self._save_items(obj, where)
        elif isinstance(obj, dict):
            self._save_items(obj, where)
        elif isinstance(obj, list):
            write(pickle.EMPTY_LIST)
            if obj:
                write(pickle.MARK)
                for i, item in enumerate(obj):
                    self._save(item, f"{where}[{i}]")
                write(pickle.APPENDS)
        else:
            write(pickle.MARK)
            for i, item in enumerate(obj):
                self._save(item, f"{where}[{i}]")
            write(pickle.TUPLE)
        self._open.discard(id(obj))

    def _save_items(self, mapping: dict, where: str) -> None:
        """SETITEMS onto the dict on top of the stack (a new one for a plain dict)."""
        write = self._out.write
        if type(mapping) is not collections.OrderedDict:
            write(pickle.EMPTY_DICT)
        if mapping:
            write(pickle.MARK)
            for key, value in mapping.items():
                self._save(key, f"{where} (a key)")
                self._save(value, f"{where}[{key!r}]")
            write(pickle.SETITEMS)

    def _save_int(self, value: int) -> None:
        write = self._out.write
        if 0 <= value < 1 << 8:
            write(pickle.BININT1 + bytes([value]))
        elif 0 <= value < 1 << 16:
            write(pickle.BININT2 + struct.pack("<H", value))
        elif -(1 << 31) <= value < 1 << 31:
            write(pickle.BININT + struct.pack("<i", value))
        else:
            encoded = value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)
            write(pickle.LONG1 + bytes([len(encoded)]) + encoded)

    def _save_array(self, array: np.ndarray, where: str) -> None:
        dtype = array.dtype if array.dtype.isnative else array.dtype.newbyteorder("=")
        storage_name = _DTYPE_STORAGES.get(dtype)
        if storage_name is None:
            supported = ", ".join(sorted(str(d) for d in _DTYPE_STORAGES))
            raise _fail(
                self.path,
                f"cannot write an array of dtype {dtype} at {where} (supported: {supported})",
            )
        key = self._keys.get(id(array))
        if key is None:
            key = self._keys[id(array)] = len(self.arrays)
            self.arrays.append(array)  # also keeps id(array) from being reused
        write = self._out.write
        write(_global("torch._utils", "_rebuild_tensor_v2") + pickle.MARK)
        write(pickle.MARK)
        self._save("storage", where)
        write(_global("torch", storage_name))
        self._save(str(key), where)
        self._save("cpu", where)
        self._save(array.size, where)
        write(pickle.TUPLE + pickle.BINPERSID)
        self._save(0, where)  # storage offset
        self._save(tuple(array.shape), where)
        self._save(_contiguous(array.shape), where)
        write(pickle.NEWFALSE)  # requires_grad
        write(_global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE)  # hooks
        write(pickle.TUPLE + pickle.REDUCE)


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()
