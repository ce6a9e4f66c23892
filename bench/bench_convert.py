"""Peak memory and time of conversion both ways, against reading the same .pth alone.

Run from the repository root: `python bench/bench_convert.py [--presets mae_vit_large_patch16,...]`.
For each preset it writes random float32 weights in the official layout (``{'model': state_dict}``,
with convert.pth_io.write_pth, in a child process) to a temporary directory, then runs each step
in a fresh child process:

- read:    ``convert.pth_io.read_pth`` of the file (the reference for time);
- convert: ``convert/pth_to_orbax.py``'s ``convert_pth`` (.pth -> Orbax checkpoint directory);
- load:    ``mae_jax.load_pretrained`` of the converted checkpoint;
- export:  ``convert/orbax_to_pth.py``'s ``export_pth`` (Orbax -> .pth).

Peak memory is what the step added: the child's peak RSS (VmHWM, reset after the imports) minus
its RSS just before the step. Issue 10's bounds: every step's peak at most 1.5x the file, and
conversion at most 2x the time of read_pth on the same file in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEAK_BOUND = 1.5  # x the file
TIME_BOUND = 2.0  # x read_pth

# argv: step, then its paths. Prints one JSON line.
CHILD = r"""
import json, sys, time
def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))
step, args = sys.argv[1], sys.argv[2:]
import jax, jax.numpy as jnp, numpy as np
import mae_jax
from convert.pth_io import read_pth
from convert.pth_to_orbax import convert_pth
from convert.orbax_to_pth import export_pth
jnp.ones(4).block_until_ready()  # start the backend before measuring
if step == "write":
    from bench.bench_convert import official_state
    from convert.pth_io import write_pth
    write_pth({"model": official_state(args[0])}, args[1])
    print(json.dumps({}))
    sys.exit(0)
run = {
    "read": lambda: read_pth(args[0]),
    "convert": lambda: convert_pth(args[0], args[1], force=True),
    "load": lambda: mae_jax.load_pretrained(args[0]),
    "export": lambda: export_pth(args[0], args[1], force=True),
}[step]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := current RSS
before = status_kib("VmRSS")
start = time.perf_counter()
result = run()
seconds = time.perf_counter() - start
peak = status_kib("VmHWM")
print(json.dumps({"seconds": seconds, "added_bytes": (peak - before) * 1024}))
"""


def official_state(preset: str, seed: int = 0) -> dict:
    """Random float32 weights of ``preset`` (an MAE with its decoder) in the official layout."""
    import numpy as np
    from flax import nnx
    from flax.traverse_util import flatten_dict

    from convert import mapping
    from mae_jax.checkpoint import build_model
    from mae_jax.config import get_config

    abstract = nnx.eval_shape(lambda: build_model("mae", get_config(preset)))
    rng = np.random.default_rng(seed)
    state = {}
    for path, leaf in flatten_dict(nnx.to_pure_dict(nnx.state(abstract))).items():
        shape = mapping.official_shape(path, tuple(leaf.shape))
        state[mapping.official_key(path)] = rng.standard_normal(shape, np.float32) * 0.02
    return mapping.in_official_order(state)


def run_child(step: str, *paths: str | os.PathLike) -> dict:
    """One step in a fresh interpreter; its JSON report (seconds, added_bytes)."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, step, *map(str, paths)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        tail = proc.stderr.strip().splitlines()[-3:]
        raise RuntimeError(f"bench_convert child {step!r} failed: {' | '.join(tail)}")
    return json.loads(lines[-1])


def bench(preset: str, folder: Path) -> dict:
    src = folder / f"{preset}.pth"
    run_child("write", preset, src)
    size = src.stat().st_size
    ckpt, back = folder / f"{preset}_ckpt", folder / f"{preset}_back.pth"
    results = {
        "read": run_child("read", src),
        "convert": run_child("convert", src, ckpt),
        "load": run_child("load", ckpt),
        "export": run_child("export", ckpt, back),
    }
    return {"file_bytes": size, **results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="mae_vit_large_patch16,mae_vit_huge_patch14")
    args = p.parse_args(argv)
    worst_peak = worst_time = 0.0
    for preset in args.presets.split(","):
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
            r = bench(preset, Path(tmp))
        size = r["file_bytes"]
        print(f"{preset}: file {size / 1e9:.2f} GB")
        for step in ("read", "convert", "load", "export"):
            added = r[step]["added_bytes"]
            ratio = r[step]["seconds"] / r["read"]["seconds"]
            worst_peak = max(worst_peak, added / size)
            print(
                f"  {step:<8} {r[step]['seconds']:6.2f} s ({ratio:4.2f}x read_pth)   "
                f"peak +{added / 1e9:5.2f} GB = {added / size:4.2f}x the file"
            )
        worst_time = max(worst_time, r["convert"]["seconds"] / r["read"]["seconds"])
    print(
        f"worst peak {worst_peak:.2f}x the file (bound {PEAK_BOUND}x); conversion "
        f"{worst_time:.2f}x read_pth's time (bound {TIME_BOUND}x)"
    )
    # The context of the figures: this machine's speed and load in this run (needs torch).
    sys.path.insert(0, str(REPO / "bench"))
    import _common

    try:
        print(f"machine: {_common.machine_line()}")
        print(_common.calibration_line())
    except ImportError as e:
        print(f"(no machine/calibration line: {e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
