"""What packing the step's state costs its compute: the pretraining step with parameters and
AdamW state packed into one flat buffer per weight-decay group (as the loop runs it on GPU and
TPU) against one buffer per parameter (as on XLA:CPU), on the first device, alternating.

Run from the repository root:

    python bench/bench_packing.py [--size base] [--batch 8] [--dtype float32|bfloat16]
                                  [--reps 5] [--warmup 1]

Both candidates are ``_accel.build_step`` (the real step under ``shard_map`` on a one-device
mesh, state donated), compiled once; the timed calls alternate between them, each blocked until
its outputs are ready. It prints the median and range of each, their ratio, and XLA's memory
plan of each (temporaries, arguments, outputs), then the machine and calibration lines. Where
packing is slower, the slices of the packed buffers are copied before the matmuls (on XLA:CPU
in float32: the reason the loop keeps one buffer per parameter there, ``pretrain_step.packs_state``).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import _accel
import _common

CANDIDATES = {"packed": True, "per-param": False}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _accel.OneLineParser(prog="bench_packing.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="base", choices=list(_accel.SIZES))
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=5, help="timed steps of each candidate")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    if min(args.batch, args.reps) < 1 or args.warmup < 0:
        parser.error("--batch and --reps must be positive, --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np

    from mae_jax import replication

    device = jax.devices()[0]
    mesh = jax.sharding.Mesh(np.array([device]), (replication.AXIS,))
    preset = _accel.SIZES[args.size]
    print(
        f"{preset} train step, batch {args.batch}, {args.dtype}, on {device.device_kind} "
        f"({device.platform}): packed state against one buffer per parameter",
        flush=True,
    )
    runs, memory = {}, {}
    for name, packed in CANDIDATES.items():
        build = _accel.build_step(
            preset,
            args.batch,
            dtype=args.dtype,
            remat="none",
            mesh=mesh,
            concrete=True,
            packed=packed,
        )
        compiled = build.fn.lower(*build.args).compile()
        plan = compiled.memory_analysis()
        memory[name] = {
            "temporaries": plan.temp_size_in_bytes,
            "arguments": plan.argument_size_in_bytes,
            "outputs": plan.output_size_in_bytes,
        }
        state = {"args": build.args}

        def step(compiled=compiled, build=build, state=state):
            outputs = compiled(*state["args"])
            jax.block_until_ready(outputs)
            state["args"] = build.advance(state["args"], outputs)

        runs[name] = step
    times = _common.interleaved_times(runs, args.reps, warmup=args.warmup)
    rows = []
    for name in CANDIDATES:
        t, m = times[name], memory[name]
        rows.append(
            (
                name,
                f"{1e3 * statistics.median(t):.1f} ms",
                f"(range {1e3 * min(t):.1f}-{1e3 * max(t):.1f}); XLA's plan: "
                + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in m.items()),
            )
        )
    ratio = statistics.median(times["packed"]) / statistics.median(times["per-param"])
    extra = (memory["packed"]["temporaries"] - memory["per-param"]["temporaries"]) / 2**30
    rows.append(
        ("packed/per-param", f"{ratio:.3f}x", f"time by medians; {extra:+.2f} GiB temporaries")
    )
    _common.print_summary(f"{preset} step, batch {args.batch}, {args.dtype}", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
