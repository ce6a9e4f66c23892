"""Test set-up: eight fake CPU devices for the data-parallel tests, full float32 matmuls, and one
XLA compilation cache for the session."""

import importlib.util
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the session, made by the first process that loads this
# file (pytest-xdist's controller) and inherited through the environment by the workers and by
# every `mae-jax` process the tests start: a program that another test or process already
# compiled (the tiny model's step, its initialisers, eager ops) is read back instead of compiled
# again, about 8 s of CPU per process a two-host launch starts. The key is the whole lowered
# module and its compile options, so a hit runs the executable that compiling would give;
# jax.log_compiles still logs "Compiling" for it (the log comes before the cache is asked).
# A size limit turns on jax's file lock around reads and writes (no entry is read half written);
# that lock needs filelock, without which there is no cache. `JAX_COMPILATION_CACHE_DIR= pytest`
# runs without it.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and importlib.util.find_spec("filelock"):
    _OWN_CACHE = tempfile.mkdtemp(prefix="mae-jax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(4 << 30)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# gcsfs's zonal-bucket probe would wait ~60 s on the emulator's missing gRPC (tests/gcs_emulator.py).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import secrets  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gcs_env():
    """The environment of a GCS emulator on 127.0.0.1 (one per test worker), set in os.environ
    for the session: epath, gcsfs, tensorstore and subprocesses all reach the emulated bucket."""
    from tests.gcs_emulator import running_emulator

    with running_emulator() as env:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture
def gcs_dir(gcs_env, request):
    """A fresh ``gs://`` folder in the emulated bucket for one test."""
    from tests.gcs_emulator import BUCKET

    return f"gs://{BUCKET}/{request.node.name.replace('[', '_').replace(']', '')}-{secrets.token_hex(3)}"


def pytest_sessionfinish(session):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
