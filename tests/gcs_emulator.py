"""A real GCS JSON API on 127.0.0.1 for the bucket tests (the gcp-storage-emulator package).

Orbax writes arrays through tensorstore (``TENSORSTORE_GCS_HTTP_URL``) and everything else goes
through etils.epath and gcsfs (``STORAGE_EMULATOR_HOST``). gcsfs's experimental zonal-bucket
support would probe the bucket over gRPC first (about 60 s before it falls back against an
emulator), so it is turned off here; real buckets are unaffected.

The emulator runs through this file (``_serve``), which adds the ``x-goog-generation`` header
GCS sends with an object's bytes: without it, tensorstore cannot tell which generation of an
OCDBT manifest it read, and about one Orbax save in five to the emulator failed with "Malformed
StorageGeneration".
"""

from __future__ import annotations

import contextlib
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
            sys.executable, __file__, "start",
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


def _serve(argv: list[str]) -> None:
    """The emulator's command line, its downloads answering with the object's generation."""
    from gcp_storage_emulator.__main__ import main
    from gcp_storage_emulator.handlers import objects

    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # not found: download answered 404 already
            return
        response["x-goog-generation"] = str(obj.get("generation"))
        response["x-goog-metageneration"] = str(obj.get("metageneration"))

    objects.download = download_with_generation  # objects.get (alt=media) calls it by name
    main(argv)


if __name__ == "__main__":
    _serve(sys.argv[1:])
