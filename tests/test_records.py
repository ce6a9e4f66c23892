"""Tests of mae_jax.data.records and ``mae-jax prepare-data``: the record directory, and batches from it
that equal the batches from the image folder it was made from."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from mae_jax import cli, data
from mae_jax.data import records


def _photo(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Smooth colour ramps plus noise: crops and flips show up in every pixel."""
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 / width, ys * 255 / height, (xs + ys) * 127 / (width + height)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


@pytest.fixture
def folder(tmp_path):
    """Two classes of JPEGs and PNGs of several sizes, and one file that is not an image."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for i in range(9):
        sub = root / ("cat" if i % 2 else "dog")
        sub.mkdir(parents=True, exist_ok=True)
        img = _photo(rng, 30 + 7 * i, 40 + 5 * i)
        if i % 3:
            img.save(sub / f"p{i}.jpg", quality=90)
        else:
            img.save(sub / f"p{i}.png")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def _prepare(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert err.startswith("mae-jax: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


def test_prepare_data_writes_shards_index_and_labels(folder, tmp_path, capsys):
    out = tmp_path / "recs"
    code, stdout, err = _prepare(capsys, "prepare-data", folder, out, "--shards", "3", "--quiet")
    assert code == 0, err
    assert "10 images, 2 classes, 3 shards" in stdout
    assert "warning: 1 file(s) are not readable images" in stdout
    assert sorted(os.listdir(tmp_path)) == ["images", "recs"]  # no temporary left behind
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == records.FORMAT_NAME and index["version"] == records.FORMAT_VERSION
    assert index["classes"] == ["cat", "dog"] and index["count"] == 10
    assert [s["count"] for s in index["shards"]] == [3, 3, 4]  # 10 * s // 3 boundaries
    assert [s["file"] for s in index["shards"]] == [records.shard_name(s, 3) for s in range(3)]

    source = data.ImageFolder(folder)
    recs = data.open_dataset(out)
    assert isinstance(recs, records.RecordFolder) and isinstance(
        data.open_dataset(folder), type(source)
    )
    assert len(recs) == 10 and recs.classes == source.classes
    np.testing.assert_array_equal(recs.labels, source.labels)
    for i, path in enumerate(source.paths):
        encoded, name = recs.read(i)
        with open(path, "rb") as f:
            assert encoded == f.read()  # the file's bytes, not re-encoded
        shard = 0 if i < 3 else 1 if i < 6 else 2
        position = i - (0, 3, 6)[shard]
        expected = f"{out / records.shard_name(shard, 3)} record {position} "
        assert name == expected + f"({os.path.relpath(path, folder)})"


def test_same_seed_same_batches_from_folder_and_records(folder, tmp_path):
    out = tmp_path / "recs"
    records.write_records(folder, out, shards=2, progress=False)
    runs = []
    for images in (data.ImageFolder(folder), records.RecordFolder(out)):
        kwargs = dict(batch_size=3, img_size=16, seed=4, end_epoch=3, worker_count=0)
        with data.pretrain_batches(images, pixels="uint8", read_threads=2, **kwargs) as loader:
            runs.append((list(loader), loader.num_skipped))
    (from_folder, skipped_folder), (from_records, skipped_records) = runs
    assert len(from_folder) == 9 and skipped_folder == skipped_records > 0  # broken.jpg met
    for (e1, b1), (e2, b2) in zip(from_folder, from_records, strict=True):
        assert e1 == e2 and b1["image"].dtype == np.uint8
        np.testing.assert_array_equal(b1["image"], b2["image"])
        np.testing.assert_array_equal(b1["label"], b2["label"])
    evals = [
        list(data.eval_batches(images, batch_size=4, img_size=16, read_threads=2))
        for images in (data.ImageFolder(folder), records.RecordFolder(out))
    ]
    for b1, b2 in zip(*evals, strict=True):
        for key in ("image", "label", "valid"):
            np.testing.assert_array_equal(b1[key], b2[key])
    assert sum(int(b["valid"].sum()) for b in evals[0]) == 9


def test_records_in_worker_processes(folder, tmp_path):
    out = tmp_path / "recs"
    records.write_records(folder, out, shards=2, progress=False)
    recs = records.RecordFolder(out)
    kwargs = dict(batch_size=2, img_size=8, seed=1, end_epoch=1, pixels="uint8")
    with data.pretrain_batches(recs, worker_count=0, **kwargs) as threads:
        expected = list(threads)
    with data.pretrain_batches(recs, worker_count=1, **kwargs) as workers:
        got = list(workers)
    assert len(got) == len(expected) == 5
    for (_, b_ref), (_, b) in zip(expected, got, strict=True):
        np.testing.assert_array_equal(b["image"], b_ref["image"])


def test_existing_output_is_refused_unless_forced(folder, tmp_path, capsys):
    out = tmp_path / "recs"
    assert _prepare(capsys, "prepare-data", folder, out, "--quiet")[0] == 0
    code, _, err = _prepare(capsys, "prepare-data", folder, out, "--quiet")
    _assert_one_line_error(code, err, f"{out}: already exists", "--force")
    (folder / "cat" / "p1.jpg").unlink()
    code, stdout, err = _prepare(capsys, "prepare-data", folder, out, "--force", "--quiet")
    assert code == 0, err
    assert len(records.RecordFolder(out)) == 9
    assert sorted(os.listdir(tmp_path)) == ["images", "recs"]  # the old copy is gone too


def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _prepare(capsys, "prepare-data", empty, tmp_path / "out", "--quiet")
    _assert_one_line_error(code, err, f"{empty}: no images found")
    code, _, err = _prepare(capsys, "prepare-data", tmp_path / "nope", tmp_path / "out")
    _assert_one_line_error(code, err, f"{tmp_path / 'nope'}: folder does not exist")
    Image.new("RGB", (4, 4)).save(empty / "a.png")
    code, _, err = _prepare(capsys, "prepare-data", empty, tmp_path / "no" / "out")
    _assert_one_line_error(code, err, f"{tmp_path / 'no'}: folder does not exist")
    code, _, err = _prepare(capsys, "prepare-data", empty, tmp_path / "out", "--shards", "2")
    _assert_one_line_error(code, err, "cannot split 1 images into 2 shards")
    code, _, err = _prepare(capsys, "prepare-data", empty, tmp_path / "out", "--shards", "0")
    _assert_one_line_error(code, err, "--shards must be positive")
    assert sorted(os.listdir(tmp_path)) == ["empty"]


def test_damaged_record_directory_is_refused_naming_the_file(folder, tmp_path):
    out = tmp_path / "recs"
    records.write_records(folder, out, shards=2, progress=False)
    index_path = out / "index.json"
    index = json.loads(index_path.read_text())

    index_path.write_text(json.dumps(dict(index, version=99)))
    with pytest.raises(data.DataError, match=f"^{index_path}: format version 99 is not supported"):
        records.RecordFolder(out)
    index_path.write_text("{not json")
    with pytest.raises(data.DataError, match=f"^{index_path}: is not valid JSON"):
        data.open_dataset(out)
    index_path.write_text(json.dumps(index))
    shard = out / records.shard_name(1, 2)
    shard.unlink()
    with pytest.raises(data.DataError, match=f"^{shard}: shard is missing"):
        records.RecordFolder(out)


def test_record_roundtrip_and_short_record():
    record = records.encode_record(7, "dir/ä.jpg", b"\xff\xd8payload")
    assert records.decode_record(record) == (7, "dir/ä.jpg", b"\xff\xd8payload")
    assert record[:4] == (7).to_bytes(4, "little")  # the documented layout
    with pytest.raises(ValueError, match="shorter than its header"):
        records.decode_record(record[:8])
