"""The event-file writer: CRC32C check values, and files read back by independent decoders."""

import os
import socket
import struct

import numpy as np
import pytest

from mae_jax import tbwriter

SCALARS = [  # tag, value, step
    ("train/loss", 0.123456789, 1),
    ("train/lr", 1.5e-4, 1),
    ("train/loss", -2.75, 20),
    ("train/loss", 3.0e38, 2**40),
    ("eval/big", 1e40, 7),  # beyond float32: stored as inf
]


def _as_float32(value: float) -> float:
    with np.errstate(over="ignore"):  # 1e40 -> inf is the point
        return float(np.float32(value))


def _crc32c_bitwise(data: bytes) -> int:
    """CRC32C one bit at a time (reflected Castagnoli polynomial), without a table."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
    return (rotated + 0xA282EAD8) % 2**32


def _read_records(path):
    """Every record's data, after checking both masked CRCs."""
    with open(path, "rb") as f:
        blob = f.read()
    records, pos = [], 0
    while pos < len(blob):
        header = blob[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", blob[pos + 8 : pos + 12])
        assert length_crc == _masked(_crc32c_bitwise(header))
        data = blob[pos + 12 : pos + 12 + length]
        (data_crc,) = struct.unpack("<I", blob[pos + 12 + length : pos + 16 + length])
        assert data_crc == _masked(_crc32c_bitwise(data))
        records.append(data)
        pos += 16 + length
    assert pos == len(blob)
    return records


def _fields(msg: bytes) -> dict[int, list]:
    """A protobuf message as {field number: [raw values]} (varint, fixed64/32 bytes, or bytes)."""
    out, pos = {}, 0

    def varint():
        nonlocal pos
        value = shift = 0
        while True:
            byte = msg[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < len(msg):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 1:
            value, pos = msg[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = msg[pos : pos + 4], pos + 4
        elif wire == 2:
            n = varint()
            value, pos = msg[pos : pos + n], pos + n
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        out.setdefault(field, []).append(value)
    return out


def _decode_event(data: bytes) -> dict:
    f = _fields(data)
    step = f.get(2, [0])[0]
    event = {
        "wall_time": struct.unpack("<d", f[1][0])[0],
        "step": step - 2**64 if step >= 2**63 else step,
    }
    if 3 in f:
        event["file_version"] = f[3][0].decode()
    if 5 in f:
        values = [_fields(v) for v in _fields(f[5][0])[1]]
        event["scalars"] = [(v[1][0].decode(), struct.unpack("<f", v[2][0])[0]) for v in values]
    return event


def test_crc32c_check_values():
    assert _crc32c_bitwise(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    for crc in (tbwriter.crc32c_python, tbwriter.crc32c):
        assert crc(b"123456789") == 0xE3069283
        assert crc(bytes(32)) == 0x8A9136AA
        assert crc(b"") == 0
    data = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    assert tbwriter.crc32c_python(data) == _crc32c_bitwise(data)
    assert tbwriter.masked_crc32c(data) == _masked(_crc32c_bitwise(data))


def test_event_bytes_match_the_protobuf_wire_format_by_hand():
    got = tbwriter.encode_event(1.5, 3, scalars={"a": 2.0})
    value = b"\x0a\x01a" + b"\x15" + struct.pack("<f", 2.0)  # tag = "a", simple_value = 2.0
    summary = b"\x0a" + bytes([len(value)]) + value
    expected = b"\x09" + struct.pack("<d", 1.5) + b"\x10\x03" + b"\x2a" + bytes([len(summary)])
    assert got == expected + summary
    # negative int64 steps are ten-byte varints of the two's complement
    assert tbwriter.encode_event(0.0, -1)[9:] == b"\x10" + b"\xff" * 9 + b"\x01"


def _write(logdir):
    with tbwriter.SummaryWriter(logdir) as writer:
        for i, (tag, value, step) in enumerate(SCALARS):
            writer.scalar(tag, value, step, wall_time=1000.0 + i)
    return writer.path


def test_scalars_read_back(tmp_path):
    path = _write(tmp_path / "logs")
    name = os.path.basename(path)
    assert name.startswith("events.out.tfevents.") and name.endswith("." + socket.gethostname())
    events = [_decode_event(r) for r in _read_records(path)]
    assert events[0]["file_version"] == "brain.Event:2" and "scalars" not in events[0]
    assert len(events) == 1 + len(SCALARS)
    for i, (event, (tag, value, step)) in enumerate(zip(events[1:], SCALARS, strict=True)):
        assert event["wall_time"] == 1000.0 + i and event["step"] == step
        [(got_tag, got_value)] = event["scalars"]
        assert got_tag == tag
        assert got_value == _as_float32(value), (tag, got_value, value)
    assert events[-1]["scalars"][0][1] == float("inf")


def test_read_back_with_protobuf(tmp_path):
    pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    proto = descriptor_pb2.FileDescriptorProto(name="tb_test.proto", package="tbt", syntax="proto3")
    f = descriptor_pb2.FieldDescriptorProto
    fields = {
        "Value": [
            ("tag", 1, f.TYPE_STRING, None, False),
            ("simple_value", 2, f.TYPE_FLOAT, None, False),
        ],
        "Summary": [("value", 1, f.TYPE_MESSAGE, ".tbt.Value", True)],
        "Event": [
            ("wall_time", 1, f.TYPE_DOUBLE, None, False),
            ("step", 2, f.TYPE_INT64, None, False),
            ("file_version", 3, f.TYPE_STRING, None, False),
            ("summary", 5, f.TYPE_MESSAGE, ".tbt.Summary", False),
        ],
    }
    for message_name, specs in fields.items():
        message = proto.message_type.add(name=message_name)
        for name, number, kind, type_name, repeated in specs:
            field = message.field.add(name=name, number=number, type=kind)
            field.label = f.LABEL_REPEATED if repeated else f.LABEL_OPTIONAL
            if type_name:
                field.type_name = type_name
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    event_class = message_factory.GetMessageClass(pool.FindMessageTypeByName("tbt.Event"))

    path = _write(tmp_path)
    events = [event_class.FromString(r) for r in _read_records(path)]
    assert events[0].file_version == "brain.Event:2"
    for event, (tag, value, step) in zip(events[1:], SCALARS, strict=True):
        assert event.step == step and event.summary.value[0].tag == tag
        assert event.summary.value[0].simple_value == _as_float32(value)


def test_tensorboard_reads_the_file(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _write(tmp_path)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    want = [(s, _as_float32(v)) for t, v, s in SCALARS if t == "train/loss"]
    assert got == want


def test_writer_errors_and_file_names(tmp_path):
    first = tbwriter.SummaryWriter(tmp_path)
    second = tbwriter.SummaryWriter(tmp_path)  # same second, same host: a distinct file
    assert first.path != second.path and os.path.exists(first.path) and os.path.exists(second.path)
    with pytest.raises(ValueError, match="non-empty string"):
        first.scalar("", 1.0, 0)
    first.close()
    first.close()
    second.close()
    with pytest.raises(ValueError, match="is closed"):
        first.scalar("loss", 1.0, 0)
    # the header record reached the disk before any scalar
    assert _decode_event(_read_records(second.path)[0])["file_version"] == "brain.Event:2"
