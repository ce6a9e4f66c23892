"""A real GCS JSON API on 127.0.0.1 for the bucket tests (the gcp-storage-emulator package).

Orbax writes arrays through tensorstore (``TENSORSTORE_GCS_HTTP_URL``) and everything else goes
through etils.epath and gcsfs (``STORAGE_EMULATOR_HOST``). gcsfs's experimental zonal-bucket
support would probe the bucket over gRPC first (about 60 s before it falls back against an
emulator), so it is turned off here; real buckets are unaffected.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

BUCKET = "mae-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emulator_env(port: int) -> dict[str, str]:
    url = f"http://127.0.0.1:{port}"
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_CLOUD_PROJECT": "mae-jax-test",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


@contextlib.contextmanager
def running_emulator():
    """Start the emulator with an empty in-memory bucket ``BUCKET``; yields its environment."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "gcp_storage_emulator", "start",
            "--host=127.0.0.1", f"--port={port}", f"--default-bucket={BUCKET}", "--in-memory",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the GCS emulator did not start")
            time.sleep(0.1)
        yield emulator_env(port)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
