"""A small TensorBoard event-file writer for scalars, without TensorFlow, tensorboard or protobuf.

An event file is a sequence of TFRecords, each holding one serialized ``tensorflow.Event`` message:

    record  = uint64 length (little-endian) | uint32 masked_crc32c(length bytes)
              | data | uint32 masked_crc32c(data)
    Event   = { 1: double wall_time, 2: int64 step, 3: string file_version, 5: Summary summary }
    Summary = { 1: repeated Value value }
    Value   = { 1: string tag, 2: float simple_value }

The first record carries ``file_version = "brain.Event:2"``, which is how TensorBoard recognizes the file.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from collections.abc import Callable

from mae_jax._files import AppendLog, run_path

FILE_VERSION = "brain.Event:2"
_SESSION_START = 1  # SessionLog.SessionStatus.START
_CASTAGNOLI_REVERSED = 0x82F63B78
_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


# --------------------------------------------------------------------------- CRC32C


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CASTAGNOLI_REVERSED if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def crc32c_python(data: bytes) -> int:
    """CRC32C (Castagnoli) of ``data``, table-driven, in plain Python."""
    crc = _U32
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ _U32


def _fast_crc32c() -> Callable[[bytes], int] | None:
    """A compiled CRC32C if one of the optional packages is installed; they give the same values."""
    try:
        import google_crc32c

        return google_crc32c.value
    except ImportError:
        pass
    try:
        import crc32c as crc32c_package

        return crc32c_package.crc32c
    except ImportError:
        return None


crc32c: Callable[[bytes], int] = _fast_crc32c() or crc32c_python


def masked_crc32c(data: bytes) -> int:
    """The TFRecord checksum: CRC32C of ``data``, rotated right by 15 bits, plus a constant (mod 2^32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _U32


def frame_record(data: bytes) -> bytes:
    """``data`` wrapped as one TFRecord (length, length checksum, data, data checksum)."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


# --------------------------------------------------------------------------- protobuf encoding

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 values are sent as their 64-bit two's complement
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _key(field, _LENGTH_DELIMITED) + _varint(len(payload)) + payload


def _float32_bytes(value: float) -> bytes:
    try:
        return struct.pack("<f", value)
    except OverflowError:  # beyond float32 range: what a float32 cast gives
        return struct.pack("<f", math.copysign(math.inf, value))


def encode_event(
    wall_time: float,
    step: int = 0,
    *,
    file_version: str | None = None,
    scalars: dict[str, float] | None = None,
    session_start: bool = False,
) -> bytes:
    """A serialized ``Event`` with a file version, a summary of simple scalar values, or a
    ``SessionLog`` START (TensorBoard then drops the events it read earlier at ``step`` and
    after: how a restarted run replaces what it logs again)."""
    out = _key(1, _FIXED64) + struct.pack("<d", wall_time) + _key(2, _VARINT) + _varint(step)
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if session_start:
        out += _length_delimited(7, _key(1, _VARINT) + _varint(_SESSION_START))
    if scalars:
        summary = b"".join(
            _length_delimited(
                1,
                _length_delimited(1, tag.encode()) + _key(2, _FIXED32) + _float32_bytes(value),
            )
            for tag, value in scalars.items()
        )
        out += _length_delimited(5, summary)
    return out


# --------------------------------------------------------------------------- writer


class SummaryWriter:
    """Appends scalar summaries to ``logdir/events.out.tfevents.<unix time>.<hostname>``.

    Records are buffered and reach the disk on ``flush``, on ``close``, and when a write comes more
    than ``flush_secs`` after the last flush. An event file is an append-only log that TensorBoard
    reads while it grows, so it is written in place rather than through a temporary file.
    """

    def __init__(
        self,
        logdir: str | os.PathLike,
        *,
        flush_secs: float = 10.0,
        purge_step: int | None = None,
    ):
        logdir = run_path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        base = logdir / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path, self._file = _open_new(base)
        self._flush_secs = flush_secs
        self._last_flush = time.monotonic()
        self._file.write(frame_record(encode_event(time.time(), 0, file_version=FILE_VERSION)))
        if purge_step is not None:  # a resumed run: events from purge_step on are logged again
            event = encode_event(time.time(), int(purge_step), session_start=True)
            self._file.write(frame_record(event))
        self.flush()

    def scalar(self, tag: str, value: float, step: int, wall_time: float | None = None) -> None:
        """Record ``value`` (stored as float32) under ``tag`` at training ``step``."""
        if self._file is None:
            raise ValueError(f"SummaryWriter for {self.path} is closed")
        if not isinstance(tag, str) or not tag:
            raise ValueError(f"scalar tag must be a non-empty string, got {tag!r}")
        event = encode_event(
            time.time() if wall_time is None else float(wall_time),
            int(step),
            scalars={tag: float(value)},
        )
        self._file.write(frame_record(event))
        if time.monotonic() - self._last_flush > self._flush_secs:
            self.flush()

    def flush(self) -> None:
        """Push buffered records to the operating system, so TensorBoard can read them."""
        if self._file is not None:
            self._file.flush(force=True)
            self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush and close the file; closing twice is harmless."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _open_new(base):
    """An AppendLog on ``base``, or ``base.1``, ``base.2``, ... if a writer in the same second took it."""
    for attempt in range(1000):
        path = base if attempt == 0 else base.parent / f"{base.name}.{attempt}"
        try:
            return path, AppendLog(path, new=True)
        except FileExistsError:
            continue
    raise FileExistsError(f"{base}: could not find a free event file name")
