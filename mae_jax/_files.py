"""Run paths that may be local or in a bucket, and the one atomic-write helper.

Every path a user gives (workdir, data, checkpoints, converter input and output) may be a URL
that etils.epath understands (``gs://bucket/run``) as well as a local path. ``pathlib`` would
quietly turn ``gs://b/run`` into the local relative path ``gs:/b/run``, so run paths go through
``run_path`` instead.

``atomic_write`` is how every small file of a run is written: a reader never sees half a file.
On a local disk the bytes go to a temporary name in the same folder, are flushed to the disk
(fsync) and renamed over the target. In an object store (gs://, s3://) an object becomes
visible only once its upload is complete, and a "rename" is a copy plus a delete, so the
object is written in place.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

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
    return "://" in os.fspath(path) if not isinstance(path, epath.Path) else "://" in str(path)


def is_local(path: PathLike | epath.Path) -> bool:
    return not is_url(path)


def _check_backend(url: str) -> None:
    scheme = url.split("://", 1)[0]
    if scheme == "gs":
        try:
            import gcsfs  # noqa: F401  etils reads gs:// through it
        except ImportError as err:
            raise PathError(
                f"{url}: reading and writing gs:// paths needs gcsfs "
                "(pip install 'mae-jax[gcs]')"
            ) from err


def atomic_write(path: PathLike | epath.Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` so that it holds either its old content or all of ``data``."""
    path = run_path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if is_url(path):
        path.write_bytes(raw)  # an object appears only when its upload completes
        return
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
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

    def __init__(self, path: PathLike | epath.Path, *, new: bool = False, upload_secs: float = 30.0):
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
