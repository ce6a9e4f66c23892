"""Test set-up: eight fake CPU devices for the data-parallel tests, full float32 matmuls."""

import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
