"""The mae-jax command: the demo offline, reconstruct, export, and one-line errors for user mistakes."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mae_jax
from convert.pth_to_orbax import convert_pth
from mae_jax import assets, cli

GOLDEN = Path(__file__).parent / "golden"


def _run(args, capsys):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code, err, *needles):
    assert code == 2
    assert err.startswith("mae-jax: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out, _ = convert_pth(GOLDEN / "tiny_shared.pth", tmp_path_factory.mktemp("c") / "tiny")
    return out


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (50, 70, 4), dtype=np.uint8), "RGBA").save(path)
    return path


def test_every_subcommand_has_help(capsys):
    """`python -m mae_jax.cli --help` once as a command (the module runs as one); each
    subcommand's help in this process, which spares a start of jax each."""
    p = subprocess.run(
        [sys.executable, "-m", "mae_jax.cli", "--help"], capture_output=True, text=True
    )
    assert p.returncode == 0 and "usage: mae-jax" in p.stdout
    for sub in ("pretrain", "reconstruct", "demo", "export", "eval", "finetune", "linprobe"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([sub, "--help"])
        assert exit_info.value.code == 0 and "usage: mae-jax " + sub in capsys.readouterr().out


def test_demo_runs_offline_and_writes_a_png(tmp_path, capsys):
    assert assets.demo_checkpoint_dir().is_dir(), "the demo model ships with the package"
    out = tmp_path / "demo.png"
    code, stdout, err = _run(["demo", "--out", out], capsys)
    assert code == 0, err
    img = Image.open(out)
    assert img.format == "PNG" and img.mode == "RGB"
    n = len(assets.demo_image_paths())
    assert n == 7 and img.height > img.width  # one row per bundled photograph, four columns
    model = mae_jax.load_pretrained(assets.demo_checkpoint_dir())
    assert model.config == mae_jax.get_config("mae_demo_patch8")


def test_reconstruct_writes_one_row_per_image(tiny_ckpt, photo, tmp_path, capsys):
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    assert _run(["reconstruct", photo, "--checkpoint", tiny_ckpt, "--out", one], capsys)[0] == 0
    assert (
        _run(
            ["reconstruct", photo, photo, "--checkpoint", tiny_ckpt, "--out", two, "--center-crop"],
            capsys,
        )[0]
        == 0
    )
    a, b = Image.open(one), Image.open(two)
    assert a.width == b.width and b.height > 1.6 * a.height


def test_reconstruct_refuses_an_encoder_only_checkpoint(photo, tmp_path, capsys):
    enc, _ = convert_pth(GOLDEN / "tiny_shared_encoder_only.pth", tmp_path / "enc")
    code, _, err = _run(
        ["reconstruct", photo, "--checkpoint", enc, "--out", tmp_path / "x.png"], capsys
    )
    _assert_one_line_error(code, err, "no decoder weights", "mae_visualize_vit")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "args, needles",
    [
        (
            ["reconstruct", "{missing}", "--checkpoint", "{ckpt}", "--out", "{out}"],
            ["nope.jpg", "no such image file"],
        ),
        (
            ["reconstruct", "{photo}", "--checkpoint", "{tmp}/none", "--out", "{out}"],
            ["none", "no such checkpoint directory"],
        ),
        (
            [
                "reconstruct",
                "{photo}",
                "--checkpoint",
                "{ckpt}",
                "--out",
                "{out}",
                "--mask-ratio",
                "1.5",
            ],
            ["--mask-ratio"],
        ),
        (
            ["reconstruct", "{notimg}", "--checkpoint", "{ckpt}", "--out", "{out}"],
            ["notes.jpg", "cannot decode"],
        ),
        (
            ["pretrain", "--data", "{tmp}/empty", "--workdir", "{tmp}/run"],
            ["empty", "no images found"],
        ),
        (
            ["pretrain", "--data", "{tmp}/missing_dir", "--workdir", "{tmp}/run"],
            ["missing_dir", "does not exist"],
        ),
        (["pretrain", "--workdir", "{tmp}/run", "--set", "epochz=3"], ["epochz", "key one of"]),
        (
            ["pretrain", "--workdir", "{tmp}/run", "--set", "epochs=many"],
            ["epochs=many", "not a valid int"],
        ),
        (
            ["pretrain", "--workdir", "{tmp}/run", "--config", "{tmp}/nope.json"],
            ["nope.json", "cannot read settings"],
        ),
        (["export", "{tmp}", "{tmp}/out"], ["not a pretraining run directory"]),
        (
            ["finetune", "--data", "{tmp}/empty", "--workdir", "{tmp}/ft"],
            ["empty", "no images found"],
        ),
        (
            ["linprobe", "--data", "{tmp}/missing_dir", "--workdir", "{tmp}/lp"],
            ["missing_dir", "does not exist"],
        ),
        (
            ["finetune", "--data", "{tmp}/empty", "--set", "mode=distill", "--workdir", "{tmp}/ft"],
            ["mode must be finetune or linprobe"],
        ),
    ],
    ids=[
        "missing-image",
        "missing-checkpoint",
        "bad-ratio",
        "undecodable-image",
        "empty-folder",
        "missing-folder",
        "unknown-setting",
        "bad-value",
        "missing-config",
        "export-not-a-run",
        "finetune-empty",
        "linprobe-missing",
        "finetune-bad-mode",
    ],
)
def test_user_mistakes_give_one_line_errors(args, needles, tiny_ckpt, photo, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.jpg").write_text("not an image")
    fill = dict(
        missing=tmp_path / "nope.jpg",
        ckpt=tiny_ckpt,
        out=tmp_path / "out.png",
        photo=photo,
        tmp=tmp_path,
        notimg=tmp_path / "notes.jpg",
    )
    code, _, err = _run([a.format(**fill) for a in args], capsys)
    _assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "out.png").exists()


def test_pretrain_default_runs_on_the_bundled_photos(tmp_path):
    """`mae-jax pretrain` without --data: the embedded default, cut short."""
    run = tmp_path / "run"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "mae_jax.cli",
            "pretrain",
            "--workdir",
            str(run),
            "--set",
            "max_steps=3",
            "--set",
            "log_every=1",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert "mae_demo_patch8 on the bundled sample photographs" in p.stdout
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    code = cli.main(["export", str(run), str(tmp_path / "exported")])
    assert code == 0
    assert mae_jax.load_pretrained(tmp_path / "exported").config.img_size == 64
