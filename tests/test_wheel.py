"""The wheel: built from this checkout and installed into a fresh virtual environment, it converts,
loads and exports official weights on its own (the converter ships as ``mae_jax.convert``).

The venv sees the system's site-packages (jax, flax, orbax come from there) but not torch: a
meta-path finder installed by a ``.pth`` file refuses it, as on a machine where mae-jax was
installed without its torch extra. Two processes run in it, from a folder outside the checkout:
``mae-jax convert`` (the console script), then one Python process that loads the checkpoint,
exports it with ``mae-jax to-pth``, runs ``mae-jax parity`` without torch and reports what it saw.
The last tests run the converter's commands in this checkout: the scripts' options, one-line errors.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_convert import ROOT, _golden_sd, _save

torch = pytest.importorskip("torch")

# Installed into the venv's site-packages, loaded by a .pth file at every start: torch is refused.
NO_TORCH = '''
import sys


class RefuseTorch:
    """Makes torch unimportable, as if the torch extra were not installed."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, RefuseTorch)
'''

# Run by the venv's Python; prints what it found as JSON. Arguments: checkpoint, source .pth, the
# .pth to write.
CHECKS = """
import contextlib, io, json, sys

ckpt, src, back = sys.argv[1:]
facts = {}
try:
    import torch  # noqa: F401
    facts["torch"] = "importable"
except ModuleNotFoundError:
    facts["torch"] = "refused"

from mae_jax import cli

cli.build_parser().parse_args(["demo"])
facts["converter_imported_by_parser"] = [m for m in sys.modules if m.startswith("mae_jax.convert")]

import mae_jax
import mae_jax.convert
from mae_jax.checkpoint import state_as_numpy
from mae_jax.convert.mapping import official_from_state
from mae_jax.convert.pth_io import read_pth

facts["files"] = [mae_jax.__file__, mae_jax.convert.__file__, cli.__file__]
loaded = official_from_state(state_as_numpy(mae_jax.load_pretrained(ckpt)))
original = read_pth(src)["model"]
facts["loaded_keys"] = list(loaded) == list(original)
facts["loaded_differ"] = [
    k for k, v in original.items()
    if loaded[k].dtype != v.dtype or loaded[k].tobytes() != v.tobytes()
]

facts["to_pth"] = cli.main(["to-pth", ckpt, back])
err = io.StringIO()
with contextlib.redirect_stderr(err):
    facts["parity"] = cli.main(["parity", ckpt, "--pth", src])
facts["parity_stderr"] = err.getvalue()
print(json.dumps(facts))
"""


def _venv_env() -> dict:
    """This process's environment without the checkout on the import path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(argv, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=_venv_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A venv (system site-packages, torch refused) with the wheel of this checkout installed."""
    base = tmp_path_factory.mktemp("wheel")
    # Built from a copy: a build writes build/ and *.egg-info beside pyproject.toml.
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("mae_jax", "convert"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    build = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "--disable-pip-version-check", "-w", base / "dist", src],
        cwd=base,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = (base / "dist").glob("mae_jax-*.whl")

    venv = base / "venv"
    made = _run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], base
    )
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], base)
    site_packages = Path(site.stdout.strip())
    assert site_packages.is_relative_to(venv), site.stdout + site.stderr
    (site_packages / "_refuse_torch.py").write_text(NO_TORCH)
    (site_packages / "_refuse_torch.pth").write_text("import _refuse_torch\n")
    install = _run(
        [python, "-m", "pip", "install", "--no-deps", "-q", "--disable-pip-version-check", wheel],
        base,
    )
    assert install.returncode == 0, install.stderr
    return venv


def test_wheel_converts_loads_and_exports_without_torch(wheel_venv, tmp_path):
    work = tmp_path / "work"  # outside the checkout: nothing of it on the import path
    work.mkdir()
    original = {k: torch.from_numpy(v) for k, v in _golden_sd().items()}
    src = _save({"model": original}, work / "mae_visualize_vit_tiny.pth")

    convert = _run([wheel_venv / "bin" / "mae-jax", "convert", src.name, "ckpt", "--quiet"], work)
    assert convert.returncode == 0, convert.stderr
    assert convert.stdout.startswith("wrote ") and "mae_vit_tiny_patch4" in convert.stdout

    checks = _run([wheel_venv / "bin" / "python", "-c", CHECKS, "ckpt", src.name, "back.pth"], work)
    assert checks.returncode == 0, checks.stderr
    facts = json.loads(checks.stdout.strip().splitlines()[-1])
    assert facts["torch"] == "refused"
    # The wheel's package, converter and command, not the checkout's (an editable install).
    for path in facts["files"]:
        assert Path(path).is_relative_to(wheel_venv), path
    assert facts["converter_imported_by_parser"] == []  # imported only by its commands
    # load_pretrained gives back the file's weights, bit for bit and in the official order
    assert facts["loaded_keys"] and facts["loaded_differ"] == []

    assert facts["to_pth"] == 0
    back = torch.load(work / "back.pth", weights_only=True)
    assert set(back) == {"model"}
    assert list(back["model"]) == list(original)
    for key, tensor in original.items():
        exported = back["model"][key]
        assert exported.dtype == tensor.dtype and exported.shape == tensor.shape, key
        assert exported.numpy().tobytes() == tensor.numpy().tobytes(), key

    # Without torch, parity names the extra in one line and exits 2.
    assert facts["parity"] == 2
    lines = facts["parity_stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: parity needs PyTorch"), lines
    assert "No module named 'torch'" in lines[0] and 'pip install "mae-jax[torch]"' in lines[0]


# ------------------------------------------------------------------ the commands in this checkout


def test_converter_commands_take_the_scripts_options(capsys):
    from mae_jax import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["convert", "--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: mae-jax convert")
    for option in ("--arch", "--encoder-only", "--pixel-targets", "--set KEY=VALUE", "--strict"):
        assert option in shown


@pytest.mark.parametrize(
    "command, where",
    [
        (["convert", "missing.pth", "out", "--quiet"], "missing.pth"),
        (["to-pth", "missing", "back.pth"], "missing"),
    ],
)
def test_converter_commands_fail_in_one_line(tmp_path, capsys, command, where):
    from mae_jax import cli

    argv = [command[0], *(str(tmp_path / a) if not a.startswith("-") else a for a in command[1:])]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / where}"), err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_an_install_without_the_converter_says_to_reinstall(monkeypatch, capsys):
    from mae_jax import cli

    class NotInstalled:  # mae_jax.convert as an editable install of before finds it: not at all
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "mae_jax.convert":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    for name in [m for m in sys.modules if m.startswith("mae_jax.convert")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [NotInstalled, *sys.meta_path])
    with pytest.raises(SystemExit) as done:
        cli.main(["to-pth", "ckpt", "back.pth"])
    assert done.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "mae-jax: error: mae_jax.convert is not installed; reinstall mae-jax "
        "(in a clone: pip install -e .)"
    ]
