"""Run paths that may be local or in a bucket, and the one atomic-write helper.

Every path a user gives (workdir, data, checkpoints, converter input and output) may be a URL
that etils.epath understands (``gs://bucket/run``) as well as a local path. ``pathlib`` would
quietly turn ``gs://b/run`` into the local relative path ``gs:/b/run``, so run paths go through
``run_path`` instead.

``atomic_write`` is how every file is written (``copy_file`` too: downloads, uploads): a
reader never sees half a file. On a local disk the bytes go to a temporary name in the same
folder, are flushed to the disk (fsync) and renamed over the target. In an object store
(gs://, s3://) an object becomes visible only once its upload is complete, and a "rename" is a
copy plus a delete, so the object is written in place, and an upload that fails is cancelled,
never committed.

``naming`` turns the errors of a bucket client (a missing object, a missing bucket, no
credentials, no connection) into one PathError line that names the user's path.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from etils import epath

PathLike = str | os.PathLike


class PathError(OSError):
    """A run path that cannot be used (unknown scheme, unreachable bucket, missing library)."""


def run_path(path: PathLike) -> epath.Path:
    """``path`` as an epath.Path: local paths stay local, ``gs://`` URLs stay URLs."""
    if isinstance(path, epath.Path):
        return path
    text = os.fspath(path)
    if is_url(text):
        _check_backend(text)
    return epath.Path(text)


def is_url(path: PathLike | epath.Path) -> bool:
    """Whether ``path`` names an object store (``scheme://...``) rather than a local file."""
    return "://" in str(path)


def is_local(path: PathLike | epath.Path) -> bool:
    return not is_url(path)


def check_bucket(path: PathLike | epath.Path) -> None:
    """PathError naming ``path`` when its bucket does not exist or cannot be reached (a no-op
    for local paths). Object stores have no folders to create, so a run in a bucket that is not
    there would otherwise fail only at its first write."""
    if not is_url(path):
        return
    text = str(path)
    scheme, rest = text.split("://", 1)
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"
    with naming(path):
        found = epath.Path(bucket).exists()
    if not found:
        raise PathError(f"{text}: the bucket {bucket} does not exist or cannot be reached")


def _check_backend(url: str) -> None:
    scheme = url.split("://", 1)[0]
    if scheme == "gs":
        try:
            import gcsfs  # noqa: F401  etils reads gs:// through it
        except ImportError as err:
            raise PathError(
                f"{url}: reading and writing gs:// paths needs gcsfs (pip install 'mae-jax[gcs]')"
            ) from err


def atomic_write(
    path: PathLike | epath.Path,
    data: bytes | str | BinaryIO | Callable[[BinaryIO], None],
    *,
    size: int | None = None,
) -> None:
    """Write ``data`` to ``path`` so that it holds either its old content or all of ``data``.

    ``data``: the bytes (a str is written as UTF-8); a readable binary file, copied in chunks
    (a download, an upload); or a function that writes the content into the seekable binary
    file it is given (for a bucket, a local temporary file that is uploaded once it returns).
    ``size``: how many bytes the content must have; with any other count the write fails
    (OSError) and ``path`` is left as it was, so a truncated copy is never committed.
    """
    path = run_path(path)
    if callable(data) and is_url(path):
        with tempfile.TemporaryFile() as spool:  # the writer may seek; an upload cannot
            data(spool)
            spool.seek(0)
            atomic_write(path, spool, size=size)
        return
    if is_url(path):
        with path.open("wb") as out:
            try:
                _fill(out, data, size, path)
            except BaseException:
                _abandon_upload(out)  # else closing the file would commit what was written
                raise
        return
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            _fill(f, data, size, path)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def copy_file(
    src: PathLike | epath.Path, dst: PathLike | epath.Path, *, size: int | None = None
) -> None:
    """Copy the file ``src`` to ``dst`` with ``atomic_write``; either may be in a bucket (a
    download, an upload). ``size``: the byte count the copy must have (see ``atomic_write``)."""
    with run_path(src).open("rb") as f:
        atomic_write(dst, f, size=size)


_COPY_CHUNK = 16 * 2**20


def _fill(out: BinaryIO, data: Any, size: int | None, path: epath.Path) -> None:
    """Write ``data`` (see ``atomic_write``) into the open file ``out``, checking ``size``."""
    if callable(data):
        data(out)
        written = out.tell() if size is not None else None
    elif isinstance(data, (bytes, bytearray, memoryview, str)):
        raw = data.encode("utf-8") if isinstance(data, str) else data
        out.write(raw)
        written = len(raw)
    else:
        written = 0
        while chunk := data.read(_COPY_CHUNK):
            out.write(chunk)
            written += len(chunk)
    if size is not None and written != size:
        raise PathError(f"{path}: got {written} bytes, expected {size} (the copy was cut short)")


def _abandon_upload(out: Any) -> None:
    """Cancel an unfinished upload (fsspec's ``discard``) and mark the file closed, so that
    leaving its ``with`` block uploads nothing."""
    try:
        discard = getattr(out, "discard", None)
        if discard is not None:
            discard()
    finally:
        out.closed = True


@contextlib.contextmanager
def naming(path: PathLike | epath.Path) -> Iterator[None]:
    """Errors of reading or writing the bucket path ``path`` (a missing object, an unreachable
    bucket, missing credentials) as one PathError that names ``path``. PathError, an error whose
    message names ``path`` already, and the errors of a local path pass unchanged."""
    try:
        yield
    except PathError:
        raise
    except _io_errors() as err:
        text = " ".join(str(err).split())
        if not is_url(path) or str(path) in text:  # a local error says what it is already
            raise
        raise PathError(f"{path}: {_reason(err, text, is_url(path))}") from err


def _reason(err: BaseException, text: str, url: bool) -> str:
    if isinstance(err, FileNotFoundError):  # gcsfs's text is its request path: not worth showing
        return "no such object, or no such bucket" if url else "no such file or directory"
    if isinstance(err, PermissionError):
        return f"permission denied ({text})" if text else "permission denied"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _io_errors() -> tuple[type[BaseException], ...]:
    """OSError and what the bucket clients raise instead (HTTP, authentication, connection)."""
    found: list[type[BaseException]] = [OSError]
    for module, name in (
        ("gcsfs.retry", "HttpError"),
        ("google.auth.exceptions", "GoogleAuthError"),
        ("aiohttp", "ClientError"),
    ):
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def replace_dir(tmp: PathLike, path: PathLike) -> None:
    """Rename the complete local folder ``tmp`` to ``path`` (local); an existing ``path`` (a
    folder or a file) is moved aside first and deleted after."""
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return
    folder, name = os.path.split(os.fspath(path))
    old = os.path.join(folder, f".{name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(tmp, path)
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.unlink(old)


def _fsync_dir(folder: Any) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(os.fspath(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AppendLog:
    """A log file that grows by appends (metrics.jsonl, TensorBoard events), local or in a bucket.

    Local files are opened for appending (or created exclusively, ``new=True``) and flushed to
    the operating system by ``flush``. An object in a bucket cannot be appended to: its bytes
    are kept in memory (starting from the object's current content when resuming) and the whole
    object is uploaded again by ``flush``, at most once every ``upload_secs`` unless forced, and
    by ``close``. Readers of the bucket see the log as it was at the last upload.
    """

    def __init__(
        self, path: PathLike | epath.Path, *, new: bool = False, upload_secs: float = 30.0
    ):
        self.path = run_path(path)
        self._remote = is_url(self.path)
        self._upload_secs = upload_secs
        self._last_upload = float("-inf")
        if self._remote:
            if new and self.path.exists():
                raise FileExistsError(f"{self.path}: already exists")
            self._content = bytearray(
                self.path.read_bytes() if not new and self.path.exists() else b""
            )
            self._dirty = True
            self._file = None
        else:
            self._file = open(os.fspath(self.path), "xb" if new else "ab")
        self.closed = False

    def write(self, data: bytes | str) -> None:
        raw = data.encode("utf-8") if isinstance(data, str) else data
        if self._remote:
            self._content += raw
            self._dirty = True
        else:
            self._file.write(raw)

    def flush(self, force: bool = False) -> None:
        """Local: to the operating system. Bucket: upload, if forced or due."""
        if not self._remote:
            self._file.flush()
            return
        import time

        now = time.monotonic()
        if self._dirty and (force or now - self._last_upload >= self._upload_secs):
            self.path.write_bytes(bytes(self._content))
            self._dirty, self._last_upload = False, now

    def close(self) -> None:
        if self.closed:
            return
        self.flush(force=True)
        if self._file is not None:
            self._file.close()
        self.closed = True
