"""Plan a TPU pretraining run without a TPU: compile the train step ahead of time for a TPU slice and
print its per-chip memory, its FLOPs and whether it fits the chip's HBM.

Run from the repository root:

    python bench/plan_tpu.py mae_vit_base_patch16 --tpu v5e-8 --batch 64 [--remat none|block|dots]
                             [--dtype bfloat16|float32]

``--batch`` is per chip and may be a list (``--batch 64,128,256``): each is compiled in turn.
Needs libtpu of the installed jax version (``pip install "jax[tpu]==$(python -c 'import jax;
print(jax.__version__)')"``), no TPU: ``jax.experimental.topologies`` describes the slice and gives
compile-only devices, and the step (``_accel.build_step``: shard_map over the slice, parameters and
optimizer state replicated, images split over the chips) is lowered with abstract arguments only.
Compiling takes minutes (ViT-B: about 5 to 20 on 2 busy cores); a line every 30 s shows it lives.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time

import _accel

REMATS = ("none", "block", "dots")
DTYPES = ("bfloat16", "float32")
HEARTBEAT_S = 30.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from mae_jax.config import PRESETS

    parser = _accel.OneLineParser(prog="plan_tpu.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--tpu", required=True, help="slice: v4-8, v5e-8, v5p-8, v6e-8, ...")
    parser.add_argument("--batch", required=True, help="images per chip; a list: 64,128,256")
    parser.add_argument("--remat", choices=REMATS, default="none")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument(
        "--shard-optimizer",
        action="store_true",
        help="ZeRO-1: each chip keeps 1/n of the AdamW state (the shard_optimizer setting)",
    )
    parser.add_argument(
        "--state",
        choices=["per-param", "packed"],
        default="per-param",
        help="parameters and AdamW state one buffer per parameter (as the loop runs on TPU) or "
        "packed by weight-decay group (as on GPU)",
    )
    args = parser.parse_args(argv)
    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
    try:
        args.batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        parser.error(f"--batch {args.batch!r}: expected positive integers such as 64 or 64,128")
    if not args.batches or min(args.batches) < 1:
        parser.error(f"--batch {args.batch!r}: expected positive integers such as 64 or 64,128")
    try:
        args.slice = _accel.parse_tpu_slice(args.tpu)
    except _accel.AccelError as e:
        parser.error(str(e))
    return args


class _Heartbeat:
    """Prints the elapsed time every HEARTBEAT_S seconds while a long call runs."""

    def __init__(self, what: str):
        self.what = what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(HEARTBEAT_S):
            print(f"    ... {self.what}, {_minutes(time.monotonic() - start)}", flush=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _bytes_text(n: int) -> str:
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n >= _accel.GIB / 10:
        return f"{sign}{n / _accel.GIB:.2f} GiB"
    return f"{sign}{n / 2**20:.1f} MiB"


def _flop_text(flops: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops / 1e6:.3g} MFLOP"


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


# libtpu 0.0.42.1 refuses a program that cannot fit with "RESOURCE_EXHAUSTED: Ran out of memory on
# HBM, the total memory required for HLO temporaries (1.27T) exceeds available HBM (15.75G)."
_OOM = re.compile(r"RESOURCE_EXHAUSTED: (.*(?:memory|HBM|hbm).*)")


def plan_one(args: argparse.Namespace, mesh, batch: int) -> dict:
    """Compile one per-chip batch; a dict of what the table needs."""
    import jax

    tpu = args.slice
    build = _accel.build_step(
        args.preset,
        batch,
        dtype=args.dtype,
        remat=args.remat,
        mesh=mesh,
        zero=args.shard_optimizer,
        packed=args.state == "packed",
    )
    print(f"  per-chip batch {batch} (global {build.global_batch})", flush=True)
    start = time.monotonic()
    with _Heartbeat("lowering"):
        lowered = build.fn.lower(*build.args)
    print(f"    lowered in {time.monotonic() - start:.0f} s; compiling for TPU ...", flush=True)
    start = time.monotonic()
    try:
        with _Heartbeat("compiling"):
            compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        seconds = time.monotonic() - start
        oom = _OOM.search(str(e))
        if oom is None:
            raise
        print(f"    does NOT fit (compiler, after {seconds:.0f} s): {oom[1].strip()}", flush=True)
        return {"batch": batch, "fits": False, "peak_gib": None, "seconds": seconds}
    seconds = time.monotonic() - start

    mem = compiled.memory_analysis()
    # What occupies one chip's HBM for this program: its inputs (parameters, optimizer state, the
    # image shard), its outputs minus those that reuse donated input buffers (the new parameters
    # and optimizer state alias the old ones), the temporaries of XLA's buffer assignment
    # (activations kept for the backward, gradients, ...) and the program itself.
    parts = {
        "arguments": mem.argument_size_in_bytes,
        "outputs": mem.output_size_in_bytes,
        "aliased": -mem.alias_size_in_bytes,
        "temporaries": mem.temp_size_in_bytes,
        "code": mem.generated_code_size_in_bytes,
    }
    peak = sum(parts.values())
    hbm = tpu.family.hbm_gib * _accel.GIB
    fits = peak <= hbm
    detail = ", ".join(f"{k} {_bytes_text(v)}" for k, v in parts.items())
    print(f"    compiled in {seconds:.0f} s ({_minutes(seconds)})")
    print(
        f"    per-chip memory {_bytes_text(peak)} of {tpu.family.hbm_gib:g} GiB "
        f"({100 * peak / hbm:.0f}%): {'fits' if fits else 'does NOT fit'}"
    )
    print(f"      = {detail} (memory_analysis() fields)")
    flops = _accel.cost_flops(compiled)
    by_hand = _accel.analytic_train_flops(build.config, batch)
    if flops is None:
        print("    FLOPs: the compiler gave no cost analysis")
    else:
        print(
            f"    FLOPs per step: {_flop_text(flops)} per chip (XLA cost analysis), "
            f"{_flop_text(flops * tpu.chips)} per slice; matmuls by hand: "
            f"{_flop_text(by_hand)} per chip"
        )
    return {
        "batch": batch,
        "fits": fits,
        "peak_gib": peak / _accel.GIB,
        "flops": flops,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax
    import libtpu  # noqa: F401  (only to fail early, with a clear message, when it is missing)
    import numpy as np

    tpu = args.slice
    print(
        f"{args.preset} on {args.tpu}: topology {tpu.topology_name} "
        f"({tpu.chips} chips, {tpu.family.chip_config}), {tpu.family.hbm_gib:g} GiB HBM per "
        f"chip; {args.dtype}, remat {args.remat}, optimizer state "
        f"{'sharded (ZeRO-1)' if args.shard_optimizer else 'replicated'}",
        flush=True,
    )
    devices = _accel.compile_only_devices(tpu)
    mesh = jax.sharding.Mesh(np.array(devices), (_train_axis(),))
    print(
        f"  compile-only devices: {len(devices)} x {devices[0].device_kind}; jax {jax.__version__}, "
        f"libtpu {_libtpu_version()}",
        flush=True,
    )
    rows = [plan_one(args, mesh, batch) for batch in args.batches]
    print(
        "\nrows for docs/tpu_plan.md (preset | slice | dtype | remat | optimizer state | "
        "per-chip batch | per-chip GiB | fits | TFLOP per chip per step | compile s):"
    )
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "> HBM"
        flops = f"{r['flops'] / 1e12:.3g}" if r.get("flops") else "-"
        print(
            f"| {args.preset} | {args.tpu} | {args.dtype} | {args.remat} | "
            f"{'ZeRO-1' if args.shard_optimizer else 'replicated'} | {r['batch']} | {peak} | "
            f"{'yes' if r['fits'] else 'no'} | {flops} | {r['seconds']:.0f} |"
        )
    return 0


def _train_axis() -> str:
    from mae_jax import replication

    return replication.AXIS


def _libtpu_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return "unknown"


def _fail(message: str) -> int:
    print(f"plan_tpu.py: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ModuleNotFoundError as e:
        if e.name != "libtpu":
            raise
        sys.exit(_fail('libtpu is missing; pip install "jax[tpu]==<your jax version>"'))
    except _accel.AccelError as e:
        sys.exit(_fail(str(e)))
