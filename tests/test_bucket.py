"""Checkpoints, converter files, figures and record directories in a bucket (``gs://``), against an
emulated GCS bucket (tests/gcs_emulator.py): the same numbers and bytes as the local paths, and
one-line errors naming the path for a missing object or bucket."""

from __future__ import annotations

import io
import json
import os
import secrets
import threading
from pathlib import Path

import numpy as np
import pytest
from etils import epath

import mae_jax
from convert import orbax_to_pth, pth_to_orbax
from convert.pth_io import PthError, read_pth
from mae_jax import _files, cli, data, run_checkpoints
from mae_jax.checkpoint import read_metadata, state_as_numpy
from mae_jax.data import records
from tests.test_records import folder  # noqa: F401  the image-folder fixture

torch = pytest.importorskip("torch")

GOLDEN = Path(__file__).parent / "golden"
TINY_PTH = GOLDEN / "tiny_shared.pth"


def _run(args, capsys):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code, err, *needles, prefix="mae-jax: error: "):
    assert code == 2
    assert err.startswith(prefix) and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


def _same_state(a, b) -> None:
    """Two models' states: the same tree, dtypes and values, bit for bit."""
    import jax

    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(state_as_numpy(a))
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(state_as_numpy(b))
    assert tree_a == tree_b and len(flat_a) > 10
    for (key, x), (_, y) in zip(flat_a, flat_b, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y), jax.tree_util.keystr(key)


def _golden_state_dict() -> dict:
    return torch.load(TINY_PTH, weights_only=True)["model"]


@pytest.fixture(scope="module")
def checkpoints(gcs_env, tmp_path_factory):
    """The tiny golden MAE converted twice: from a copy of the .pth in the bucket into the bucket,
    and from the local file into a local folder; (bucket URL, local path)."""
    remote = f"gs://mae-test/ckpts-{secrets.token_hex(3)}"
    _files.copy_file(TINY_PTH, f"{remote}/{TINY_PTH.name}")
    pth_to_orbax.convert_pth(f"{remote}/{TINY_PTH.name}", f"{remote}/mae")
    local, _ = pth_to_orbax.convert_pth(TINY_PTH, tmp_path_factory.mktemp("ckpt") / "mae")
    return f"{remote}/mae", local


# ------------------------------------------------------------------ checkpoints and .pth files


def test_converted_checkpoint_in_the_bucket_equals_the_local_one(checkpoints):
    remote, local = checkpoints
    # written in place: no temporary directory beside or inside it
    assert sorted(p.name for p in epath.Path(remote).iterdir()) == ["mae_jax.json", "params"]
    assert sorted(p.name for p in epath.Path(remote).parent.iterdir()) == [
        "mae",
        TINY_PTH.name,
    ]
    # the same metadata, the source's hash and size included (read from the bucket's copy)
    assert read_metadata(remote) == read_metadata(local)
    assert read_metadata(remote)["source"]["bytes"] == TINY_PTH.stat().st_size
    _same_state(mae_jax.load_pretrained(remote), mae_jax.load_pretrained(local))
    assert mae_jax.checkpoint_dir(remote) == epath.Path(remote)


def test_pth_export_to_and_from_the_bucket_is_bit_exact(checkpoints, gcs_dir, capsys):
    remote, _ = checkpoints
    back = f"{gcs_dir}/back.pth"
    assert orbax_to_pth.main([remote, back]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {back}"
    loaded = torch.load(io.BytesIO(epath.Path(back).read_bytes()), weights_only=True)
    original = _golden_state_dict()
    assert list(loaded) == ["model"] and list(loaded["model"]) == list(original)
    for k, v in original.items():
        assert loaded["model"][k].dtype == v.dtype and torch.equal(loaded["model"][k], v), k
    # read back from the bucket by our own reader, and refused when it exists
    ours = read_pth(back)["model"]
    assert all(np.array_equal(ours[k], v.numpy()) for k, v in original.items())
    assert orbax_to_pth.main([remote, back]) == 2
    _assert_one_line_error(2, capsys.readouterr().err, f"{back}: already exists", prefix="error: ")
    # ... and converted again from the bucket: the same parameters
    again, _ = pth_to_orbax.convert_pth(back, f"{gcs_dir}/again")
    _same_state(mae_jax.load_pretrained(again), mae_jax.load_pretrained(remote))


def test_save_model_in_the_bucket_refuses_then_replaces(checkpoints, gcs_dir):
    from mae_jax.checkpoint import save_model

    remote, _ = checkpoints
    model = mae_jax.load_pretrained(remote)
    out = f"{gcs_dir}/copy"
    assert str(save_model(model, out, metadata={"n": 1})) == out
    with pytest.raises(FileExistsError, match="already exists"):
        save_model(model, out)
    encoder = mae_jax.create_model("mae_vit_tiny_patch4", with_decoder=False)
    save_model(encoder, out, metadata={"n": 2}, force=True)
    assert read_metadata(out)["n"] == 2 and read_metadata(out)["model_type"] == "mae_encoder"
    _same_state(mae_jax.load_pretrained(out), encoder)


def test_finetune_init_from_the_bucket(checkpoints):
    """``mae-jax finetune --init gs://...``: the classifier it starts from, and the statistics."""
    import jax.numpy as jnp

    from mae_jax import finetune, run_config

    remote, local = checkpoints
    built = []
    for init in (remote, local):
        config = finetune.FinetuneConfig(preset="vit_tiny_patch4", init=init).resolved()
        built.append(finetune.build_model(config, 3, jnp.float32))
        norm = run_config.normalization_for(3, None, None, init)
        assert norm == run_config.normalization_for(3, None, None, local)
    _same_state(*built)


@pytest.fixture
def photo(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(path)
    return path


def test_reconstruct_from_and_to_the_bucket(checkpoints, gcs_dir, photo, tmp_path, capsys):
    remote, local = checkpoints
    local_png, remote_png = tmp_path / "fig.png", f"{gcs_dir}/figs/fig.png"
    assert _run(["reconstruct", photo, "--checkpoint", local, "--out", local_png], capsys)[0] == 0
    code, out, err = _run(
        ["reconstruct", photo, "--checkpoint", remote, "--out", remote_png], capsys
    )
    assert code == 0, err
    assert f"wrote {remote_png}" in out
    assert epath.Path(remote_png).read_bytes() == local_png.read_bytes()


def _pretraining_run(run: epath.Path):
    """A pretraining run directory as ``mae-jax pretrain`` leaves it (config.json and an Orbax
    step), made without training: one step costs about 25 s of compiling on this CPU."""
    from flax import nnx

    from mae_jax import pretrain_step, run_config

    config = run_config.PretrainConfig(preset="mae_vit_tiny_patch4", data="unused")
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    model = mae_jax.create_model("mae_vit_tiny_patch4", rngs=nnx.Rngs(3))
    _, params, fixed = pretrain_step.split_model(model)
    ckpts = run_checkpoints.Checkpoints(run, keep=1)
    ckpts.save(1, {"params": params, "fixed": fixed}, {"count": np.zeros(1)}, {"step": 1})
    ckpts.wait()
    ckpts.close()
    return model


@pytest.mark.parametrize("run_in", ["local", "bucket"])
def test_export_of_a_run_into_the_bucket(run_in, gcs_dir, tmp_path, capsys):
    run = epath.Path(tmp_path / "run" if run_in == "local" else f"{gcs_dir}/run")
    model = _pretraining_run(run)
    _same_state(mae_jax.load_pretrained(run), model)
    out = f"{gcs_dir}/exported"
    code, stdout, err = _run(["export", run, out], capsys)
    assert code == 0, err
    assert f"wrote {out}" in stdout
    _same_state(mae_jax.load_pretrained(out), model)
    assert read_metadata(out)["source"] == {"pretrain_run": str(run)}
    code, _, err = _run(["export", run, out], capsys)
    _assert_one_line_error(code, err, f"{out}: already exists")
    assert _run(["export", run, out, "--force"], capsys)[0] == 0


# ------------------------------------------------------------------ record directories


def test_records_prepared_into_the_bucket_read_as_the_folder(
    folder,  # noqa: F811
    gcs_dir,
    tmp_path,
    monkeypatch,
    capsys,
):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MAE_JAX_CACHE", str(cache))
    recs = f"{gcs_dir}/recs"
    code, stdout, err = _run(["prepare-data", folder, recs, "--shards", "3", "--quiet"], capsys)
    assert code == 0, err
    assert f"wrote {recs}: 10 images, 2 classes, 3 shards" in stdout
    assert records.is_record_dir(recs) and not records.is_record_dir(f"{gcs_dir}/nothing")
    names = sorted(p.name for p in epath.Path(recs).iterdir())
    assert names == sorted(
        ["index.json", "labels.npy", *(records.shard_name(s, 3) for s in range(3))]
    )

    source = data.ImageFolder(folder)
    got = data.open_dataset(recs)
    staged_note = capsys.readouterr().err
    assert staged_note.count("\n") == 1 and "copying 3 of 3 shard(s)" in staged_note
    assert isinstance(got, records.RecordFolder) and got.root == recs
    assert got.classes == source.classes and len(got) == len(source) == 10
    np.testing.assert_array_equal(got.labels, source.labels)
    for i, path in enumerate(source.paths):
        encoded, name = got.read(i)
        assert encoded == Path(path).read_bytes(), name
        assert name.endswith(f"({os.path.relpath(path, folder)})")
    staged = sorted(cache.glob("records/*/*"))
    assert [p.name for p in staged] == [records.shard_name(s, 3) for s in range(3)]
    for p in staged:  # the bucket's bytes exactly, no temporary left
        assert p.read_bytes() == epath.Path(recs, p.name).read_bytes()

    # a second open reuses the staged copies; a damaged copy (wrong size) is copied again
    staged[1].unlink()  # `got` keeps reading the copy it opened
    staged[1].write_bytes(b"short")
    again = records.RecordFolder(recs)
    assert "copying 1 of 3 shard(s)" in capsys.readouterr().err
    assert [again.read(i)[0] for i in range(10)] == [Path(p).read_bytes() for p in source.paths]
    records.RecordFolder(recs)
    assert capsys.readouterr().err == ""

    # the same batches as from the folder
    kwargs = dict(batch_size=4, img_size=16, read_threads=2)
    ours = list(data.eval_batches(got, **kwargs))
    theirs = list(data.eval_batches(source, **kwargs))
    for a, b in zip(ours, theirs, strict=True):
        for key in ("image", "label", "valid"):
            np.testing.assert_array_equal(a[key], b[key])

    # an existing output is refused, replaced with --force
    code, _, err = _run(["prepare-data", folder, recs, "--quiet"], capsys)
    _assert_one_line_error(code, err, f"{recs}: already exists")
    (folder / "cat" / "p1.jpg").unlink()
    assert _run(["prepare-data", folder, recs, "--force", "--quiet"], capsys)[0] == 0
    assert len(records.RecordFolder(recs)) == 9


def test_shards_staged_by_several_at_once(folder, gcs_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MAE_JAX_CACHE", str(tmp_path / "cache"))
    recs = f"{gcs_dir}/recs"
    records.write_records(folder, recs, shards=2, progress=False)
    names = [records.shard_name(s, 2) for s in range(2)]
    results, errors = [], []

    def stage():
        try:
            results.append(records.stage_shards(recs, names))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=stage) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 3 and results[0] == results[1] == results[2]
    for local, name in zip(results[0], names, strict=True):
        assert Path(local).read_bytes() == epath.Path(recs, name).read_bytes()
    assert sorted(os.listdir(Path(results[0][0]).parent)) == names  # no temporaries left


# ------------------------------------------------------------------ atomic writes and errors


def test_failed_upload_commits_nothing(gcs_dir):
    target = f"{gcs_dir}/x.bin"

    class Broken(io.RawIOBase):
        def __init__(self):
            self.calls = 0

        def readable(self):
            return True

        def read(self, n=-1):
            self.calls += 1
            if self.calls > 1:
                raise OSError("connection reset")
            return b"partial bytes"

    with pytest.raises(OSError, match="connection reset"):
        _files.atomic_write(target, Broken())
    assert not epath.Path(target).exists()
    with pytest.raises(_files.PathError, match="got 3 bytes, expected 4"):
        _files.atomic_write(target, io.BytesIO(b"abc"), size=4)
    assert not epath.Path(target).exists()
    _files.atomic_write(target, io.BytesIO(b"abcd"), size=4)
    assert epath.Path(target).read_bytes() == b"abcd"


def test_missing_objects_and_buckets_give_one_line_errors(
    checkpoints,
    folder,  # noqa: F811
    gcs_dir,
    photo,
    tmp_path,
    capsys,
):
    remote, _ = checkpoints
    missing, nobucket = f"{gcs_dir}/missing", f"gs://no-such-bucket-{secrets.token_hex(3)}/x"
    for ckpt in (missing, nobucket):
        code, _, err = _run(
            ["reconstruct", photo, "--checkpoint", ckpt, "--out", f"{gcs_dir}/f.png"], capsys
        )
        _assert_one_line_error(code, err, f"{ckpt}: no such checkpoint directory")
    classifier, _ = pth_to_orbax.convert_pth(GOLDEN / "vit_tiny_shared_gp.pth", tmp_path / "vit")
    for where in (missing, nobucket):
        code, _, err = _run(["eval", "--data", where, "--checkpoint", classifier], capsys)
        _assert_one_line_error(code, err, f"{where}: is not a record directory")
    code, _, err = _run(["export", nobucket, f"{gcs_dir}/out"], capsys)
    _assert_one_line_error(code, err, f"{nobucket}: not a pretraining run directory")
    code, _, err = _run(
        ["reconstruct", photo, "--checkpoint", remote, "--out", f"{nobucket}/f.png"], capsys
    )
    _assert_one_line_error(code, err, f"{nobucket}/f.png: ")
    with pytest.raises(data.DataError, match=f"{missing}: is not a record directory"):
        data.open_dataset(missing)
    with pytest.raises(_files.PathError, match=f"{nobucket}/recs: "):
        records.write_records(folder, f"{nobucket}/recs", progress=False)

    # the converter scripts: their own one-line "error: ..."
    assert pth_to_orbax.main([f"{missing}.pth", f"{gcs_dir}/c", "--quiet"]) == 2
    _assert_one_line_error(2, capsys.readouterr().err, f"{missing}.pth: ", prefix="error: ")
    assert orbax_to_pth.main([missing, f"{gcs_dir}/b.pth"]) == 2
    _assert_one_line_error(
        2, capsys.readouterr().err, f"{missing}: no such checkpoint", prefix="error: "
    )
    with pytest.raises(PthError, match=f"^{nobucket}.pth: "):
        read_pth(f"{nobucket}.pth")


def test_bucket_client_errors_become_one_line_path_errors():
    gcsfs_retry = pytest.importorskip("gcsfs.retry")
    url = "gs://b/run"
    with pytest.raises(_files.PathError) as excinfo:
        with _files.naming(url):
            raise gcsfs_retry.HttpError({"code": 503, "message": "Service\nUnavailable"})
    assert str(excinfo.value).startswith(f"{url}: HttpError: ") and "\n" not in str(excinfo.value)
    with pytest.raises(_files.PathError, match=f"^{url}: no such object, or no such bucket$"):
        with _files.naming(url):
            raise FileNotFoundError("b/b/o/run")
    with pytest.raises(FileNotFoundError, match="local"):  # local errors pass unchanged
        with _files.naming("/tmp/local"):
            raise FileNotFoundError("local")
