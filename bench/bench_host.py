"""Host time of one call of the pmapped pretraining step: can the host keep ahead of the device?

Run from the repository root:

    python bench/bench_host.py [--sizes base,large,huge] [--calls 30] [--bare-calls 200]

For each size it prints the host time of one call of ``pretrain_step.make_p_train_step``'s step,
called the way ``train.pretrain``'s loop calls it on a GPU (parameters and AdamW state
packed by weight-decay group, ``pretrain_step.pretrain_optimizer(packed=True)``; the fixed tables
as plain nested dicts; uint8 images, the base key, the micro-step as a Python int, the lr as a
NumPy scalar), beside:

- "per-param step": the same step with one buffer per parameter and per moment (what the loop
  passes on TPU and XLA:CPU, and passed everywhere before it packed its state on GPUs);
- "bare": a pmapped function of the model's leaves, one buffer per parameter and moment (same
  in_axes, same donation, same outputs, no computation): the least a call with those buffers
  costs, the reference the host-time targets are set against;
- "bare packed": the same for the packed buffers the step takes;
- the device time of the step on an H100 (989 TFLOP/s dense bf16) at 50% MFU and 64 images per
  chip, from the analytic FLOP count (``_accel.analytic_train_flops``): the host must dispatch
  faster than that, or the device waits for it.

Host time is dispatch only: each timed call returns as soon as the step is enqueued; its outputs
are awaited afterwards, untimed. On a CPU the "device" is the same cores, and XLA starts the
step while the call is still wrapping its outputs, so the wall time of a call includes waiting
for cores; the headline figure is therefore the calling thread's CPU time during the call (the
host's own work; on a GPU machine the two agree), with the wall time beside it. The median of
the calls after a warm-up (which compiles). The step runs one image per device on one local
device: the host's work depends on the buffers, not on the batch, and one image keeps the
untimed device work short on a CPU. Parameters and optimizer state are zeros made on the device
(no host copy), so ViT-H fits in ~8 GB.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import _accel
import _common

H100_TFLOPS = 989.0
DEVICE_BATCH = 64  # images per chip for the device-time column


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _accel.OneLineParser(prog="bench_host.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="base,large,huge", help=f"from {', '.join(_accel.SIZES)}"
    )
    parser.add_argument("--calls", type=int, default=30, help="timed calls of the real step")
    parser.add_argument("--bare-calls", type=int, default=200, help="timed calls of the bare one")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (compile)")
    args = parser.parse_args(argv)
    args.size_list = _accel.parse_sizes(parser, args.sizes)
    if min(args.calls, args.bare_calls) < 1 or args.warmup < 1:
        parser.error("--calls, --bare-calls and --warmup must be positive")
    return args


def _zeros_on_devices(tree, n_dev: int):
    """Zeros shaped like the abstract ``tree``, with a leading device axis, laid out by a pmap
    (as ``replication.replicate``'s copies are) and made on the devices, not copied from the host."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    return jax.pmap(lambda _: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree))(
        np.zeros(n_dev)
    )


def plain(tree):
    """``tree`` with every ``nnx.State`` in it as a plain nested dict: the same leaves."""
    import jax
    from flax import nnx

    def is_state(x):
        return isinstance(x, nnx.State)

    return jax.tree.map(lambda s: nnx.to_pure_dict(s) if is_state(s) else s, tree, is_leaf=is_state)


def time_dispatch(call, state, calls: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each timed ``call(state) -> (outputs, next_state)``: "cpu", the calling
    thread's CPU time (the host's own work, whatever else runs on the machine), "wall", its wall
    time, and "whole", until its outputs were ready. Outputs are awaited after the timers stop."""
    import jax

    times: dict[str, list[float]] = {"cpu": [], "wall": [], "whole": []}
    for i in range(warmup + calls):
        start, start_cpu = time.perf_counter(), time.thread_time()
        outputs, state = call(state)
        dispatched, dispatched_cpu = time.perf_counter(), time.thread_time()
        jax.block_until_ready(outputs)
        if i >= warmup:
            times["cpu"].append(dispatched_cpu - start_cpu)
            times["wall"].append(dispatched - start)
            times["whole"].append(time.perf_counter() - start)
    return times


def _bare(p, o, f, imgs, key, step, lr):
    """Returns its donated state untouched: no computation, the same outputs as the step."""
    return p, o, {"loss": lr, "grad_norm": lr}


def time_calls(fn, abstract: tuple, n_dev: int, extra: tuple, calls: int, warmup: int):
    """``time_dispatch`` of ``fn(params, opt_state, fixed, *extra)``, the state made as zeros on
    the devices from ``abstract`` and threaded from call to call (the step donates it)."""
    params, opt_state, fixed = _zeros_on_devices(abstract, n_dev)
    images, key, lr = extra

    def call(state):
        params, opt_state, step = state
        out = fn(params, opt_state, fixed, images, key, step, lr)
        return out, (out[0], out[1], step + 1)

    # The last outputs are freed when the timing returns.
    return time_dispatch(call, (params, opt_state, 0), calls, warmup)


def measure(preset: str, args: argparse.Namespace) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from mae_jax import pretrain_step
    from mae_jax.config import get_config
    from mae_jax.model import MaskedAutoencoderViT

    n_dev = 1
    config = get_config(preset, norm_pix_loss=True)
    abstract = nnx.eval_shape(lambda: MaskedAutoencoderViT(config, rngs=nnx.Rngs(0)))
    graphdef, param_states, fixed_states = pretrain_step.split_model(abstract)
    params, fixed = plain((param_states, fixed_states))
    packing, tx = pretrain_step.pretrain_optimizer(params, packed=True)
    no_packing, per_param_tx = pretrain_step.pretrain_optimizer(params, packed=False)
    per_param = (params, jax.eval_shape(per_param_tx.init, params), fixed)
    packed_params = jax.eval_shape(packing.pack, params)
    packed = (packed_params, jax.eval_shape(tx.init, packed_params), fixed)
    images = np.zeros((n_dev, 1, 1, config.img_size, config.img_size, config.in_chans), np.uint8)
    extra = (images, jax.random.key(0), np.float32(1e-4))
    bare = jax.pmap(_bare, in_axes=(0, 0, 0, 0, None, None, None), donate_argnums=(0, 1))

    def step_fn(tx, packing):
        return pretrain_step.make_p_train_step(
            graphdef, tx, 0.75, config.num_patches, packing=packing
        )

    # One candidate at a time: each makes its own zeros on the devices and frees them after.
    start = time.perf_counter()
    times = {
        "bare": time_calls(bare, per_param, n_dev, extra, args.bare_calls, args.warmup),
        "bare packed": time_calls(bare, packed, n_dev, extra, args.bare_calls, args.warmup),
        "step": time_calls(step_fn(tx, packing), packed, n_dev, extra, args.calls, args.warmup),
        "per-param step": time_calls(
            step_fn(per_param_tx, no_packing), per_param, n_dev, extra, args.calls, args.warmup
        ),
    }
    flops = _accel.analytic_train_flops(config, DEVICE_BATCH)
    return {
        "leaves": {
            "per-param": len(jax.tree.leaves(per_param)),
            "packed": len(jax.tree.leaves(packed)),
        },
        "times": times,
        "seconds": time.perf_counter() - start,
        "device_s": _accel.device_seconds_at(flops, H100_TFLOPS, 0.5),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    from mae_jax import _memory

    # Each candidate's state is freed before the next is made; returned to the system at once,
    # ViT-H's candidates fit one after another in 24 GB.
    _memory.return_large_blocks_to_the_system()

    print(
        f"host time per call of the pmapped pretraining step on {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), 1 local device, 1 image; dispatch only, median of "
        f"{args.calls} calls (bare functions: {args.bare_calls})",
        flush=True,
    )
    rows = []
    for size in args.size_list:
        preset = _accel.SIZES[size]
        r = measure(preset, args)
        cpu = {k: 1e3 * statistics.median(t["cpu"]) for k, t in r["times"].items()}
        wall = {k: 1e3 * statistics.median(t["wall"]) for k, t in r["times"].items()}
        leaves = r["leaves"]
        print(
            f"{preset}: {leaves['per-param']} leaves per parameter, {leaves['packed']} packed; "
            + "; ".join(
                f"{k} {cpu[k]:.2f} ms CPU, {wall[k]:.2f} ms wall "
                f"(p10-p90 {_percentiles_ms(r['times'][k]['wall'])})"
                for k in r["times"]
            )
            + f"; a whole step here {1e3 * statistics.median(r['times']['step']['whole']):.0f} ms"
            f"; {r['seconds']:.0f} s in all with the compiles",
            flush=True,
        )
        device_ms = 1e3 * r["device_s"]
        rows.append(
            (
                f"{size} ({leaves['per-param']} -> {leaves['packed']} buffers)",
                f"{cpu['step']:.2f} ms",
                f"step/bare {cpu['step'] / cpu['bare']:.2f}x; bare {cpu['bare']:.2f} ms, "
                f"bare packed {cpu['bare packed']:.2f} ms, per-param step "
                f"{cpu['per-param step']:.2f} ms; H100 at 50% MFU, {DEVICE_BATCH}/chip: "
                f"{device_ms:.3g} ms ({'host ahead' if cpu['step'] < device_ms else 'HOST BEHIND'})",
            )
        )
    _common.print_summary(
        "host time per call of the pmapped step, calling thread's CPU time: step, bare, device",
        rows,
    )
    return 0


def _percentiles_ms(seconds: list[float]) -> str:
    qs = statistics.quantiles(seconds, n=10) if len(seconds) > 1 else seconds * 9
    return f"{1e3 * qs[0]:.2f}-{1e3 * qs[-1]:.2f}"


if __name__ == "__main__":
    sys.exit(main())
