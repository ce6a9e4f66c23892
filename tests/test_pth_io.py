"""convert.pth_io against torch itself: reading torch.save files, writing files torch.load accepts,
and refusing files that are broken or that try to run code."""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from convert import pth_io
from convert.pth_io import PthError, read_pth, write_pth

torch = pytest.importorskip("torch")

GOLDEN = Path(__file__).parent / "golden"
GOLDEN_FILES = sorted(GOLDEN.glob("*.pth"))

TORCH_TO_NUMPY = {
    torch.bool: np.dtype(np.bool_),
    torch.uint8: np.dtype(np.uint8),
    torch.int8: np.dtype(np.int8),
    torch.int16: np.dtype(np.int16),
    torch.int32: np.dtype(np.int32),
    torch.int64: np.dtype(np.int64),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.complex64: np.dtype(np.complex64),
    torch.complex128: np.dtype(np.complex128),
}


def torch_load(path: Path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True, map_location="cpu")


def tensor_bytes(tensor) -> bytes:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def array_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).tobytes()


def assert_same(ours, theirs, where: str = "obj") -> None:
    """ours (from pth_io) equals theirs (torch objects) exactly: types, keys, dtypes, shapes, bits."""
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, np.ndarray), where
        assert ours.dtype == TORCH_TO_NUMPY[theirs.dtype], where
        assert ours.shape == tuple(theirs.shape), where
        assert array_bytes(ours) == tensor_bytes(theirs), where
    elif isinstance(theirs, dict):
        assert type(ours) is type(theirs), where
        assert list(ours) == list(theirs), where
        for key in theirs:
            assert_same(ours[key], theirs[key], f"{where}[{key!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(theirs, argparse.Namespace):
        assert type(ours) is argparse.Namespace, where
        assert_same(vars(ours), vars(theirs), where)
    else:
        assert type(ours) is type(theirs) and ours == theirs, where


def every_dtype_tensors() -> dict:
    """One tensor per supported dtype, with awkward values (extremes, NaN, inf, -0.0)."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for dtype in TORCH_TO_NUMPY:
        if dtype == torch.bool:
            t = torch.rand(3, 5, generator=g) > 0.5
        elif dtype.is_floating_point or dtype.is_complex:
            t = torch.randn(3, 5, generator=g, dtype=torch.float64).to(dtype)
            t[0, :3] = torch.tensor([float("nan"), float("inf"), -0.0]).to(dtype)
        else:
            info = torch.iinfo(dtype)
            t = torch.randint(info.min, info.max, (3, 5), generator=g, dtype=dtype)
            t[0, 0], t[0, 1] = info.min, info.max
        tensors[str(dtype)] = t
    return tensors


def assert_one_line_error(excinfo, path: Path, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message, message


# ------------------------------------------------------------------------------------------------
# Reading what torch wrote
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.name)
def test_golden_files_match_torch_load(path):
    ours, theirs = read_pth(path), torch_load(path)
    assert_same(ours, theirs)
    assert len(theirs["model"]) >= 30


def test_training_checkpoint_args_and_epoch():
    path = GOLDEN / "tiny_shared_trainckpt.pth"
    assert zipfile.ZipFile(path).namelist()[0].startswith("checkpoint-3/")
    ours = read_pth(path)
    assert ours["epoch"] == 3 and ours["optimizer"] == {} and ours["scaler"] == {}
    assert type(ours["args"]) is argparse.Namespace
    assert vars(ours["args"]) == vars(torch_load(path)["args"])
    # The loader's stand-in class must not leak, and the real class must be untouched.
    assert argparse.Namespace.__new__ is object.__new__


def test_every_dtype_written_by_torch(tmp_path):
    tensors = every_dtype_tensors()
    path = tmp_path / "dtypes.pth"
    torch.save(tensors, path)
    ours = read_pth(path)
    assert_same(ours, torch.load(path, weights_only=True))
    assert {str(a.dtype) for a in ours.values()} >= {"bfloat16", "bool", "float16", "complex64"}


def test_views_strides_zero_dim_and_empty(tmp_path):
    base = torch.arange(60, dtype=torch.float32)
    matrix = torch.randn(6, 7, generator=torch.Generator().manual_seed(1))
    obj = {
        "slice": base[5:17],
        "grid": base.view(6, 10)[1:5, 2:9:3],
        "transposed": matrix.t(),
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "empty_view": base[60:],
        "base": base,
    }
    path = tmp_path / "views.pth"
    torch.save(obj, path)
    ours = read_pth(path)
    assert_same(ours, torch.load(path, weights_only=True))
    assert not ours["transposed"].flags.c_contiguous
    assert ours["grid"].shape == (4, 3) and ours["scalar"].shape == ()
    # Views of one storage share memory, as torch's do.
    assert np.shares_memory(ours["slice"], ours["base"])
    assert np.shares_memory(ours["grid"], ours["base"])
    ours["base"][6] = -1.0
    assert ours["slice"][1] == -1.0


def test_nested_containers_parameters_and_plain_values(tmp_path):
    t = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    obj = {
        "list": [t, (t[0], {"deep": [torch.ones(1, dtype=torch.int64)]})],
        "values": (None, True, False, -7, 2**40, -(2**70), 1.5, "text é", ""),
        "param": torch.nn.Parameter(torch.full((2,), 3.0)),
        7: "int key",
    }
    path = tmp_path / "nested.pth"
    torch.save(obj, path)
    ours = read_pth(path)
    assert_same(ours, torch.load(path, weights_only=True))


def test_bare_state_dict_and_ddp_prefix(tmp_path):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    ours = read_pth(bare)
    assert type(ours) is collections.OrderedDict
    assert ours._metadata[""] == {"version": 1}  # kept, as torch keeps it
    assert_same(ours, torch.load(bare, weights_only=True))

    ddp = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, ddp)
    ours = read_pth(ddp)
    assert list(ours["model"]) == [f"module.{k}" for k in model.state_dict()]
    assert_same(ours, torch.load(ddp, weights_only=True))


def rewrite_zip(src: Path, dst: Path, change) -> None:
    """Copy a zip record by record; change(name, data) returns new bytes or None to drop it."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            data = change(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data)


def test_big_endian_file(tmp_path):
    tensors = every_dtype_tensors()
    little = tmp_path / "little.pth"
    torch.save(tensors, little)
    dtypes = {str(i): t.dtype for i, t in enumerate(tensors.values())}  # storage keys in save order

    def to_big_endian(name: str, data: bytes) -> bytes:
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:
            dtype = TORCH_TO_NUMPY[dtypes[name.rsplit("/", 1)[1]]]
            return np.frombuffer(data, dtype).astype(dtype.newbyteorder(">")).tobytes()
        return data

    big = tmp_path / "big.pth"
    rewrite_zip(little, big, to_big_endian)
    ours = read_pth(big)
    assert_same(ours, torch.load(big, weights_only=True))
    assert_same(ours, tensors)


def test_progress_bar(tmp_path, capsys):
    ours = read_pth(GOLDEN / "tiny_shared.pth", progress=True)
    assert "tiny_shared.pth" in capsys.readouterr().err
    write_pth(ours, tmp_path / "p.pth", progress=True)
    assert "p.pth" in capsys.readouterr().err


def test_digest_of_the_whole_file_while_reading(tmp_path):
    import hashlib

    def check(path: Path) -> None:
        digest = hashlib.sha256()
        assert_same(read_pth(path, digest=digest), torch_load(path))
        assert digest.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest(), path

    for path in GOLDEN_FILES:
        check(path)
    # Storages out of file order (the pickle asks for key 1 before key 0), a shared storage read
    # once, a big-endian file (swapped in place after hashing) and a storage over 1 MiB.
    big = torch.arange(300_000, dtype=torch.float32)
    a, b = torch.ones(5), torch.zeros(7)
    torch.save({"b": b, "a": a, "again": a[1:], "big": big}, tmp_path / "order.pth")
    with zipfile.ZipFile(tmp_path / "order.pth") as z:
        reordered = tmp_path / "reordered.pth"
        with zipfile.ZipFile(reordered, "w", zipfile.ZIP_STORED) as out:
            for name in sorted(z.namelist(), key=lambda n: n.endswith("/data/1")):
                out.writestr(name, z.read(name))
    check(tmp_path / "order.pth")
    check(reordered)
    little = tmp_path / "little.pth"
    torch.save({"x": torch.arange(6, dtype=torch.float32)}, little)

    def to_big_endian(name: str, data: bytes) -> bytes:
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:
            return np.frombuffer(data, "<f4").astype(">f4").tobytes()
        return data

    rewrite_zip(little, tmp_path / "big.pth", to_big_endian)
    digest = hashlib.sha256()
    np.testing.assert_array_equal(read_pth(tmp_path / "big.pth", digest=digest)["x"], np.arange(6))
    assert digest.hexdigest() == hashlib.sha256((tmp_path / "big.pth").read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Writing for torch
# ------------------------------------------------------------------------------------------------


def numpy_arrays() -> dict:
    rng = np.random.default_rng(4)
    arrays = {
        k: t.numpy() if t.dtype != torch.bfloat16 else None
        for k, t in every_dtype_tensors().items()
    }
    arrays["torch.bfloat16"] = rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16)
    arrays["torch.bfloat16"][0, 0] = np.nan
    matrix = rng.standard_normal((5, 6)).astype(np.float32)
    arrays |= {
        "transposed": matrix.T,
        "strided": matrix[::2, 1::3],
        "big_endian": matrix.astype(">f4"),
        "scalar": np.array(7, np.int64),
        "empty": np.zeros((0, 3), np.float16),
        "empty_3d": np.zeros((2, 0, 5), np.float32),
    }
    return arrays


def assert_numpy_equals_torch(arrays: dict, loaded: dict) -> None:
    for key, array in arrays.items():
        tensor = loaded[key]
        assert TORCH_TO_NUMPY[tensor.dtype] == array.dtype.newbyteorder("="), key
        assert tuple(tensor.shape) == array.shape, key
        native = array.astype(array.dtype.newbyteorder("="))
        assert tensor_bytes(tensor) == array_bytes(native), key


def test_write_every_dtype_loads_in_torch(tmp_path):
    arrays = numpy_arrays()
    path = tmp_path / "ours.pth"
    write_pth({"model": arrays}, path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    loaded = torch.load(path, weights_only=True)
    assert list(loaded["model"]) == list(arrays)
    assert_numpy_equals_torch(arrays, loaded["model"])
    # Writing copies the arrays into tensors of their own: a transposed input becomes contiguous.
    assert loaded["model"]["transposed"].is_contiguous()


def test_write_then_read_is_identity(tmp_path):
    arrays = numpy_arrays()
    shared = np.arange(6, dtype=np.int32)
    obj = {
        "model": collections.OrderedDict(arrays),
        "args": argparse.Namespace(model="mae_vit_base_patch16", lr=1.5e-4, input_size=224),
        "epoch": 399,
        "nested": [shared, (shared, None, True), {"x": -(2**40), "y": 2**70, "z": "é"}],
        "numpy_scalars": [np.int64(5), np.float32(0.25), np.bool_(True)],
    }
    path = tmp_path / "ours.pth"
    write_pth(obj, path)
    ours = read_pth(path)
    assert type(ours["model"]) is collections.OrderedDict
    assert list(ours["model"]) == list(arrays)
    for key, array in arrays.items():
        assert ours["model"][key].dtype == array.dtype.newbyteorder("=")
        assert array_bytes(ours["model"][key]) == array_bytes(
            array.astype(ours["model"][key].dtype)
        )
    assert type(ours["args"]) is argparse.Namespace and vars(ours["args"]) == vars(obj["args"])
    assert ours["epoch"] == 399
    assert ours["nested"][2] == {"x": -(2**40), "y": 2**70, "z": "é"}
    assert ours["nested"][1][1:] == (None, True)
    assert np.shares_memory(ours["nested"][0], ours["nested"][1][0])  # one array, one storage
    assert ours["numpy_scalars"] == [5, 0.25, True]
    assert [type(v) for v in ours["numpy_scalars"]] == [int, float, bool]
    # torch reads the same file, Namespace included.
    loaded = torch_load(path)
    assert vars(loaded["args"]) == vars(obj["args"]) and loaded["nested"][2]["y"] == 2**70
    assert_numpy_equals_torch(arrays, loaded["model"])


def test_written_layout_matches_torch_save(tmp_path):
    path = tmp_path / "layout_check.pth"
    write_pth({"a": np.ones(3, np.float32), "b": np.ones((7, 5), np.float64)}, path)
    mine = zipfile.ZipFile(path)
    torch_path = tmp_path / "layout_check_torch.pth"
    torch.save({"a": torch.ones(3), "b": torch.ones(7, 5, dtype=torch.float64)}, torch_path)
    theirs = zipfile.ZipFile(torch_path)
    strip = lambda z: [n.split("/", 1)[1] for n in z.namelist()]  # noqa: E731
    assert strip(mine) == strip(theirs)
    assert mine.namelist()[0] == "layout_check/data.pkl"
    for name in ("version", ".format_version", ".storage_alignment", "byteorder"):
        assert mine.read(f"layout_check/{name}") == theirs.read(f"layout_check_torch/{name}")
    raw = path.read_bytes()
    for info in mine.infolist():
        assert info.compress_type == zipfile.ZIP_STORED
        name_length, extra_length = struct.unpack(
            "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
        )
        assert (info.header_offset + 30 + name_length + extra_length) % 64 == 0, info.filename
    assert mine.testzip() is None  # every CRC right


def test_zip64_records_stay_aligned_and_load_in_torch(tmp_path, monkeypatch):
    # Records over 1 GB carry a zip64 extra field; shrink the threshold to exercise that path.
    monkeypatch.setattr(pth_io, "_ZIP64_FROM", 0)
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.int64)}
    path = tmp_path / "zip64.pth"
    write_pth(arrays, path)
    assert b"\x01\x00\x10\x00" in path.read_bytes()[:200]  # zip64 extra: id 1, 16 bytes
    assert_numpy_equals_torch(arrays, torch.load(path, weights_only=True))
    assert all(np.array_equal(read_pth(path)[k], a) for k, a in arrays.items())


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "keep.pth"
    path.write_bytes(b"old contents")

    def failing_record(archive, file, name, data):
        if "/data/" in name:
            raise OSError(28, "No space left on device")
        return real_record(archive, file, name, data)

    real_record = pth_io._write_record
    monkeypatch.setattr(pth_io, "_write_record", failing_record)
    with pytest.raises(PthError) as excinfo:
        write_pth({"a": np.ones(3, np.float32)}, path)
    assert_one_line_error(excinfo, path, "No space left on device")
    assert path.read_bytes() == b"old contents"
    assert sorted(os.listdir(tmp_path)) == ["keep.pth"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        ({"model": {"w": np.ones(2, np.uint32)}}, "dtype uint32 at the object['model']['w']"),
        ({"s": {1, 2}}, "cannot write set at the object['s']"),
        ({"b": b"bytes"}, "cannot write bytes"),
        ({"o": np.array([object()])}, "dtype object"),
        ({"t": torch.ones(2, dtype=torch.bfloat16)}, "cannot turn the Tensor at the object['t']"),
    ],
)
def test_write_refuses_unsupported_values(tmp_path, obj, fragment):
    path = tmp_path / "bad.pth"
    with pytest.raises(PthError) as excinfo:
        write_pth(obj, path)
    assert_one_line_error(excinfo, path, fragment)
    assert os.listdir(tmp_path) == []


def test_write_accepts_array_likes(tmp_path):
    path = tmp_path / "like.pth"
    write_pth({"t": torch.arange(4, dtype=torch.int16)}, path)  # anything with __array__
    assert_same(read_pth(path), {"t": torch.arange(4, dtype=torch.int16)})


def test_write_refuses_cycles(tmp_path):
    loop: list = [1]
    loop.append(loop)
    with pytest.raises(PthError) as excinfo:
        write_pth({"loop": loop}, tmp_path / "cycle.pth")
    assert_one_line_error(
        excinfo, tmp_path / "cycle.pth", "reference cycle at the object['loop'][1]"
    )


# ------------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------------


class RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


class Evals:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_refuses_os_system_and_runs_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "x": RunsShell(marker)}, path)
    with pytest.raises(PthError) as excinfo:
        read_pth(path)
    assert_one_line_error(excinfo, path, f"refuses to load global '{os.system.__module__}.system'")
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # torch refuses it too: the file really is evil
        torch.load(path, weights_only=True)
    assert not marker.exists()


def test_refuses_python2_builtin_eval(tmp_path):
    path = tmp_path / "eval.pth"
    torch.save({"x": Evals()}, path)  # protocol 2 names builtins.eval the Python 2 way
    assert b"__builtin__\neval" in zipfile.ZipFile(path).read("eval/data.pkl")
    with pytest.raises(PthError) as excinfo:
        read_pth(path)
    assert_one_line_error(excinfo, path, "refuses to load global '__builtin__.eval'")


def test_refuses_stack_global_in_protocol_4_pickle(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "p4.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("anything/data.pkl", pickle.dumps(RunsShell(marker), protocol=4))
    with pytest.raises(PthError) as excinfo:
        read_pth(path)
    assert_one_line_error(excinfo, path, "refuses to load global", "system")
    assert not marker.exists()


def test_refuses_tensor_reaching_past_its_storage(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(4)}, good)
    # Same pickle with size (4,) made (40,): torch would also refuse to build this view.
    bad = tmp_path / "oob.pth"

    def enlarge(name: str, data: bytes) -> bytes:
        if name.endswith("data.pkl"):
            assert data.count(b"K\x04\x85") == 1  # BININT1 4, TUPLE1: the size tuple
            return data.replace(b"K\x04\x85", b"K\x28\x85")
        return data

    rewrite_zip(good, bad, enlarge)
    with pytest.raises(PthError) as excinfo:
        read_pth(bad)
    assert_one_line_error(excinfo, bad, "reaches past its storage")


def test_refuses_truncated_file(tmp_path):
    raw = (GOLDEN / "tiny_shared.pth").read_bytes()
    path = tmp_path / "half.pth"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(PthError) as excinfo:
        read_pth(path)
    assert_one_line_error(excinfo, path, "truncated or corrupt zip archive")


def test_refuses_corrupt_storage_bytes(tmp_path):
    path = tmp_path / "flipped.pth"
    raw = bytearray((GOLDEN / "tiny_shared.pth").read_bytes())
    info = zipfile.ZipFile(GOLDEN / "tiny_shared.pth").getinfo("tiny_shared/data/1")
    name_length, extra_length = struct.unpack(
        "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
    )
    raw[info.header_offset + 30 + name_length + extra_length + 100] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(PthError) as excinfo:
        read_pth(path)
    assert_one_line_error(excinfo, path, "'tiny_shared/data/1' fails its CRC check")


def test_refuses_missing_storage_and_short_storage(tmp_path):
    missing = tmp_path / "missing.pth"
    rewrite_zip(
        GOLDEN / "tiny_shared.pth", missing, lambda n, d: None if n.endswith("/data/3") else d
    )
    with pytest.raises(PthError) as excinfo:
        read_pth(missing)
    assert_one_line_error(excinfo, missing, "storage 'tiny_shared/data/3' missing")

    short = tmp_path / "short.pth"
    rewrite_zip(
        GOLDEN / "tiny_shared.pth", short, lambda n, d: d[:-4] if n.endswith("/data/3") else d
    )
    with pytest.raises(PthError) as excinfo:
        read_pth(short)
    assert_one_line_error(
        excinfo, short, "storage 'tiny_shared/data/3' holds 12476 bytes", "needs 12480"
    )


def test_refuses_malformed_pickle(tmp_path):
    path = tmp_path / "cut_pickle.pth"
    rewrite_zip(
        GOLDEN / "tiny_shared.pth",
        path,
        lambda n, d: d[: len(d) // 2] if n.endswith("data.pkl") else d,
    )
    with pytest.raises(PthError) as excinfo:
        read_pth(path)
    assert_one_line_error(excinfo, path, "malformed data.pkl")


def test_refuses_files_that_are_not_torch_zips(tmp_path):
    cases = {
        "random.pth": np.random.default_rng(5).bytes(4096),
        "plain_pickle.pth": pickle.dumps({"model": {"w": [1.0, 2.0]}}, protocol=2),
        "empty.pth": b"",
    }
    legacy = io.BytesIO()
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    cases["legacy.pth"] = legacy.getvalue()
    no_pickle = io.BytesIO()
    with zipfile.ZipFile(no_pickle, "w") as archive:
        archive.writestr("top/data/0", b"\0" * 16)
    cases["no_data_pkl.pth"] = no_pickle.getvalue()
    expected = {
        "random.pth": "not a zip archive",
        "plain_pickle.pth": "legacy (non-zip) torch format is not supported",
        "legacy.pth": "legacy (non-zip) torch format is not supported",
        "empty.pth": "empty file",
        "no_data_pkl.pth": "without <folder>/data.pkl",
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(PthError) as excinfo:
            read_pth(path)
        assert_one_line_error(excinfo, path, expected[name])


def test_refuses_missing_file_and_directory(tmp_path):
    with pytest.raises(PthError) as excinfo:
        read_pth(tmp_path / "nope.pth")
    assert_one_line_error(excinfo, tmp_path / "nope.pth", "no such file")
    with pytest.raises(PthError) as excinfo:
        read_pth(tmp_path)
    assert_one_line_error(excinfo, tmp_path, "is a directory")
