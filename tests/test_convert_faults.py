"""The converter is bounded by the file, not by what the file declares (issue 15, item 11).

Records larger than their storages and zip bombs are refused before they are inflated, tensors
whose strides alias or reach outside their storage are refused by name, NaN and inf weights are
named (and refused with --strict), and SIGINT or SIGTERM while the output is written leave
nothing behind. The sources are the golden tiny MAE re-saved in the official layout.
"""

import json
import math
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest

from convert import orbax_to_pth, pth_to_orbax
from convert.pth_io import PthError, read_pth
from tests.test_convert import ROOT, _assert_clean_failure, _golden_sd, _save
from tests.test_pth_io import assert_one_line_error, rewrite_zip

torch = pytest.importorskip("torch")

MIB = 1 << 20


def _official(path: Path, replace: dict | None = None) -> Path:
    """The golden tiny MAE as {'model': state_dict}, written by torch.save, some tensors replaced."""
    sd = {k: torch.from_numpy(v) for k, v in _golden_sd().items()}
    sd.update(replace or {})
    return _save({"model": sd}, path)


def _first_key() -> str:
    """The tensor whose storage torch.save names '0' (storages are keyed in the order met)."""
    return next(iter(_golden_sd()))


def _recompress(
    src: Path, dst: Path, suffix: str, chunks: Iterable[bytes], method=zipfile.ZIP_DEFLATED
) -> Path:
    """A re-zip of ``src`` whose record ending in ``suffix`` holds ``chunks``, compressed with
    ``method`` (64 MiB of zeros deflate to 64 KiB); the other records are copied stored."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith(suffix):
                zout.writestr(info.filename, zin.read(info))
                continue
            record = zipfile.ZipInfo(info.filename)
            record.compress_type = method
            with zout.open(record, "w") as out:
                for chunk in chunks:
                    out.write(chunk)
    return dst


def _zeros(nbytes: int) -> Iterable[bytes]:
    chunk = bytes(MIB)
    for start in range(0, nbytes, MIB):
        yield chunk[: min(MIB, nbytes - start)]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _added_peak(run) -> int:
    """Bytes by which this process's peak resident memory rose while ``run()`` ran."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - before) * 1024


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc"
)


def _one_line(text: str, *fragments: object) -> None:
    assert text.count("\n") == 1 and "Traceback" not in text, text
    for fragment in fragments:
        assert str(fragment) in text, text


# ------------------------------------------------------------------ records and their sizes


@needs_proc
def test_record_larger_than_its_storage_is_refused_before_it_is_inflated(tmp_path, capsys):
    key = _first_key()  # storage '0': a (1, 1, 64) float32 table, 256 bytes
    plain = _official(tmp_path / "plain.pth")
    src = _recompress(plain, tmp_path / "bomb.pth", "/data/0", _zeros(64 * MIB))
    assert src.stat().st_size < plain.stat().st_size + 100_000  # the 64 MiB take 64 KiB
    out = tmp_path / "out"
    codes = []
    added = _added_peak(lambda: codes.append(pth_to_orbax.main([str(src), str(out), "--quiet"])))
    assert codes == [2]
    _one_line(
        capsys.readouterr().err,
        f"error: {src}: tensor ['model'][{key!r}]: storage 'plain/data/0' holds 67108864 bytes",
        "needs 256",
    )
    assert added < 16 * MIB, added  # inflating the record would take 64-128 MiB
    _assert_clean_failure(out)


@needs_proc
def test_honest_zip_bomb_is_refused_before_it_is_inflated(tmp_path):
    stored = _save({"model": {"w": torch.zeros(64 * MIB // 4)}}, tmp_path / "zeros.pth")
    src = _recompress(stored, tmp_path / "bomb.pth", "/data/0", _zeros(64 * MIB))
    stored.unlink()
    raised = []

    def read() -> None:
        with pytest.raises(PthError) as excinfo:
            read_pth(src)
        raised.append(excinfo)

    added = _added_peak(read)
    assert_one_line_error(raised[0], src, "tensor ['model']['w']", "refused as a zip bomb")
    assert added < 16 * MIB, added


def _lie_about_size(path: Path, suffix: str, size: int, crc: int) -> None:
    """Make the local and central headers of the record ending in ``suffix`` claim ``size``
    bytes with CRC ``crc``, whatever its compressed stream holds."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    struct.pack_into("<I", raw, info.header_offset + 14, crc)
    struct.pack_into("<I", raw, info.header_offset + 22, size)
    central = raw.rindex(info.filename.encode()) - 46
    assert raw[central : central + 4] == b"PK\x01\x02"
    struct.pack_into("<I", raw, central + 16, crc)
    struct.pack_into("<I", raw, central + 24, size)
    path.write_bytes(bytes(raw))


def test_records_that_disagree_with_their_headers_or_need_unbounded_inflating(tmp_path):
    key = _first_key()
    plain = _official(tmp_path / "plain.pth")
    # Headers that agree with the storage (256 bytes, CRC of 256 zeros) over a 1 MiB stream:
    # zipfile would stop at 256 bytes and accept it.
    lying = _recompress(plain, tmp_path / "lying.pth", "/data/0", _zeros(MIB))
    _lie_about_size(lying, "/data/0", 256, zlib.crc32(bytes(256)))
    with pytest.raises(PthError) as excinfo:
        read_pth(lying)
    assert_one_line_error(
        excinfo, lying, f"tensor ['model'][{key!r}]", "inflates to more than the 256 bytes"
    )
    # bzip2 and lzma are inflated by zipfile without a bound on what one call gives
    bz2 = _recompress(plain, tmp_path / "bz2.pth", "/data/0", [bytes(256)], zipfile.ZIP_BZIP2)
    with pytest.raises(PthError) as excinfo:
        read_pth(bz2)
    assert_one_line_error(excinfo, bz2, "'plain/data/0' is compressed with zip method 12")
    # a deflated record of the right size is still read (a re-zipped file)
    deflated = _recompress(plain, tmp_path / "deflated.pth", "/data/0", [bytes(256)])
    assert not read_pth(deflated)["model"][key].any()


# ------------------------------------------------------------------ strides


def _stride_three_becomes_four(name: str, data: bytes) -> bytes:
    if name.endswith("data.pkl"):
        assert data.count(b"K\x03\x85") == 1  # BININT1 3, TUPLE1: the one stride (3,)
        return data.replace(b"K\x03\x85", b"K\x04\x85")
    return data


def _refused(capsys, main, args: list, out: Path, *fragments: object) -> None:
    """``main(args)`` exits 2 with one line on stderr holding ``fragments``; nothing at ``out``."""
    assert main([str(a) for a in args]) == 2
    _one_line(capsys.readouterr().err, "error: ", *fragments)
    _assert_clean_failure(out)


def test_aliasing_and_out_of_bounds_strides_are_refused_naming_the_tensor(tmp_path, capsys):
    key = "blocks.0.norm1.weight"  # (64,)
    src = _official(tmp_path / "expand.pth", {key: torch.ones(1).expand(64)})
    out = tmp_path / "out"
    named = f"tensor ['model'][{key!r}]"
    overlap = f"error: {src}: {named}: has elements that overlap"
    _refused(capsys, pth_to_orbax.main, [src, out, "--quiet"], out, overlap, "stride (0,)")
    # every third element of 192: then the pickle's stride made 4, which reaches element 252
    strided = _official(tmp_path / "strided.pth", {key: torch.zeros(192)[::3]})
    src = tmp_path / "outside.pth"
    rewrite_zip(strided, src, _stride_three_becomes_four)
    outside = f"error: {src}: {named}: reaches past its storage"
    _refused(capsys, pth_to_orbax.main, [src, out, "--quiet"], out, outside, "stride (4,)")


def test_views_without_overlap_are_kept(tmp_path):
    base = torch.arange(24, dtype=torch.float32)
    views = {
        "transposed": base.view(4, 6).t(),
        "every_other": base[1::2],
        "row": base.view(4, 6)[2],
        "interleaved": base.as_strided((3, 2), (2, 3)),  # places 0 3 2 5 4 7: all distinct
        "size_one_dims": base.as_strided((1, 4, 1), (0, 5, 0)),
    }
    path = _save(views, tmp_path / "views.pth")
    ours = read_pth(path, allow_overlap=False)
    for name, view in views.items():
        np.testing.assert_array_equal(ours[name], view.numpy(), err_msg=name)
    aliased = _save({"overlapping": base.as_strided((3, 2), (1, 1))}, tmp_path / "aliased.pth")
    assert read_pth(aliased)["overlapping"].shape == (3, 2)  # torch.load's behaviour by default
    with pytest.raises(PthError) as excinfo:
        read_pth(aliased, allow_overlap=False)
    assert_one_line_error(excinfo, aliased, "tensor ['overlapping']: has elements that overlap")


# ------------------------------------------------------------------ NaN and inf


def test_non_finite_weights_are_named_and_refused_with_strict(tmp_path, capsys):
    sd = _golden_sd()
    floats = [k for k, v in sd.items() if v.dtype == np.float32 and v.size > 2][:6]
    poisoned = {k: torch.from_numpy(sd[k].copy()) for k in floats}
    for i, k in enumerate(floats):
        poisoned[k].view(-1)[: i + 1] = math.nan if i % 2 else math.inf
    src = _official(tmp_path / "nan.pth", poisoned)
    listed = ", ".join(f"{k} ({i + 1} of {sd[k].size})" for i, k in enumerate(floats[:4]))

    out = tmp_path / "ckpt"
    assert pth_to_orbax.main([str(src), str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    _one_line(err, f"warning: {src}: 6 tensor(s) hold NaN or inf values: {listed}, and 2 more")
    saved = json.loads((out / "mae_jax.json").read_text())
    assert saved["non_finite_values"] == {k: i + 1 for i, k in enumerate(floats)}

    strict_out = tmp_path / "strict"
    args = [src, strict_out, "--quiet", "--strict"]
    _refused(capsys, pth_to_orbax.main, args, strict_out, f"{src}: 6 tensor(s)", "(--strict)")

    # Exporting such a checkpoint back to .pth says so too, and refuses it with --strict.
    back = tmp_path / "back.pth"
    assert orbax_to_pth.main([str(out), str(back)]) == 0
    _one_line(capsys.readouterr().err, f"warning: {out}: 6 tensor(s)", listed)
    assert np.isnan(read_pth(back)["model"][floats[1]]).sum() == 2
    strict_back = tmp_path / "strict.pth"
    args = [out, strict_back, "--strict"]
    _refused(capsys, orbax_to_pth.main, args, strict_back, f"{out}: 6 tensor(s)", "(--strict)")


# ------------------------------------------------------------------ signals while writing

# Runs each converter's main() in this process and sends the process a signal from inside the
# write, at a point the test chooses: SIGTERM as Orbax begins to write the parameters into the
# temporary directory, SIGINT as the exported .pth's first tensor record is begun. Prints what
# each main() returned and printed, and the handlers left in place, as JSON.
SIGNAL_RUN = r"""
import contextlib, io, json, os, signal, sys

import orbax.checkpoint as ocp

from convert import orbax_to_pth, pth_io, pth_to_orbax

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever started us

def signal_once(function, signum, when):
    def wrapped(*args, **kwargs):
        if when(*args, **kwargs) and not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)
        return function(*args, **kwargs)
    sent = []
    return wrapped

def run(main, args):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(args)
    return {"code": code, "err": err.getvalue()}

src, out, checkpoint, back = sys.argv[1:]
results = {}
ocp.Checkpointer.save = signal_once(ocp.Checkpointer.save, signal.SIGTERM, lambda *a, **k: True)
results["convert"] = run(pth_to_orbax.main, [src, out, "--quiet", "--force"])
pth_io._write_record = signal_once(
    pth_io._write_record, signal.SIGINT, lambda archive, file, name, data: "/data/" in name
)
results["export"] = run(orbax_to_pth.main, [checkpoint, back, "--force"])
results["handlers"] = [
    signal.getsignal(signal.SIGTERM) is signal.SIG_DFL,
    signal.getsignal(signal.SIGINT) is signal.default_int_handler,
]
print(json.dumps(results))
"""


def test_signal_while_writing_leaves_the_previous_output_and_no_temporary(tmp_path):
    src = _official(tmp_path / "src.pth")
    checkpoint, _ = pth_to_orbax.convert_pth(src, tmp_path / "checkpoint")
    out, back = tmp_path / "out", tmp_path / "back.pth"
    out.mkdir()
    (out / "keep.txt").write_text("the previous output")
    back.write_bytes(b"the previous file")
    before = sorted(p.name for p in tmp_path.iterdir())

    p = subprocess.run(
        [sys.executable, "-c", SIGNAL_RUN, src, out, checkpoint, back],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(p.stdout.splitlines()[-1])
    assert results["convert"]["code"] == 128 + 15
    _one_line(results["convert"]["err"], f"error: {out}: interrupted by SIGTERM; nothing written")
    assert results["export"]["code"] == 128 + 2
    _one_line(results["export"]["err"], f"error: {back}: interrupted by SIGINT; nothing written")
    assert results["handlers"] == [True, True]  # restored after each write
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary left beside them
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "the previous output"
    assert back.read_bytes() == b"the previous file"
