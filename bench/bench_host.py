"""Host time of one call of the pmapped pretraining step: can the host keep ahead of the device?

Run from the repository root:

    python bench/bench_host.py [--sizes base,large,huge] [--calls 30] [--bare-calls 200]

For each size it prints the host time of one call of ``pretrain_step.make_p_train_step``'s step, called
the way ``train.pretrain``'s loop calls it (params, optimizer state and fixed tables as the plain
nested dicts that ``replication.replicate`` lays out, uint8 images, the base key, the micro-step
as a Python int, the lr as a NumPy scalar), beside:

- the same for a bare pmapped function of the same leaves as plain dicts (same in_axes, same
  donation, same outputs, no computation): what a call costs at the least;
- "update": the same leaves with every output computed (each leaf times the lr, no model): what
  the runtime does per output buffer, which the bare function (returning its donated inputs)
  skips;
- the device time of the step on an H100 (989 TFLOP/s dense bf16) at 50% MFU and 64 images per
  chip, from the analytic FLOP count (``_accel.analytic_train_flops``): the host must dispatch
  faster than that, or the device waits for it.

Host time is dispatch only: each timed call returns as soon as the step is enqueued; its outputs
are awaited afterwards, untimed. On a CPU the "device" is the same cores, and XLA starts the
step while the call is still wrapping its outputs, so the wall time of a call includes waiting
for cores; the headline figure is therefore the calling thread's CPU time during the call (the
host's own work; on a GPU machine the two agree), with the wall time beside it. The median of
the calls after a warm-up (which compiles). The step
runs one image per device on one local device: the host's work depends on the leaves, not on
the batch, and one image keeps the untimed device work short on a CPU. Parameters and optimizer
state are zeros made on the device (no host copy), so ViT-H fits in ~8 GB.
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


def measure(preset: str, args: argparse.Namespace) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from mae_jax import optim, pretrain_step
    from mae_jax.config import get_config
    from mae_jax.model import MaskedAutoencoderViT

    n_dev = 1
    config = get_config(preset, norm_pix_loss=True)
    abstract = nnx.eval_shape(lambda: MaskedAutoencoderViT(config, rngs=nnx.Rngs(0)))
    graphdef, param_states, fixed_states = pretrain_step.split_model(abstract)
    abstract_params, abstract_fixed = plain((param_states, fixed_states))
    tx = optim.pretrain_direction(mask=optim.pretrain_decay_mask(abstract_params))
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    leaves = len(jax.tree.leaves((abstract_params, abstract_opt, abstract_fixed)))
    images = np.zeros((n_dev, 1, 1, config.img_size, config.img_size, config.in_chans), np.uint8)
    key, lr = jax.random.key(0), np.float32(1e-4)

    def scaled(tree, lr):
        return jax.tree.map(lambda x: x * lr.astype(x.dtype), tree)

    # The bare function first, on its own zeros (freed before the real state is made); then the
    # same leaves, each output computed (one multiply per leaf, no model): the runtime's work
    # per output buffer, which a function that returns its donated inputs does not do.
    bare_times = {}
    for name, outputs in (
        ("bare", lambda p, o, lr: (p, o)),
        ("update", lambda p, o, lr: (scaled(p, lr), scaled(o, lr))),
    ):
        fn = jax.pmap(
            lambda p, o, f, imgs, key, step, lr, outputs=outputs: (
                *outputs(p, o, lr),
                {"loss": lr, "grad_norm": lr},
            ),
            in_axes=(0, 0, 0, 0, None, None, None),
            donate_argnums=(0, 1),
        )
        p, o, bare_fixed = _zeros_on_devices((abstract_params, abstract_opt, abstract_fixed), n_dev)

        def bare_call(state, fn=fn, bare_fixed=bare_fixed):
            p, o, step = state
            out = fn(p, o, bare_fixed, images, key, step, lr)
            return out, (out[0], out[1], step + 1)

        # The state is donated call after call; the last outputs go when the timing returns.
        bare_times[name] = time_dispatch(bare_call, (p, o, 0), args.bare_calls, args.warmup)
        del p, o, bare_fixed

    # The real step, called as train.pretrain calls it.
    step_fn = pretrain_step.make_p_train_step(graphdef, tx, 0.75, config.num_patches)
    params, opt_state, fixed = _zeros_on_devices(
        (abstract_params, abstract_opt, abstract_fixed), n_dev
    )

    def real_call(state):
        params, opt_state, step = state
        out = step_fn(params, opt_state, fixed, images, key, step, lr)
        return out, (out[0], out[1], step + 1)

    compile_start = time.perf_counter()
    real_times = time_dispatch(real_call, (params, opt_state, 0), args.calls, args.warmup)
    seconds = time.perf_counter() - compile_start
    flops = _accel.analytic_train_flops(config, DEVICE_BATCH)
    return {
        "leaves": leaves,
        "real": real_times,
        **bare_times,
        "seconds": seconds,
        "device_s": _accel.device_seconds_at(flops, H100_TFLOPS, 0.5),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    print(
        f"host time per call of the pmapped pretraining step on {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), 1 local device, 1 image; dispatch only, median of "
        f"{args.calls} calls (bare function: {args.bare_calls})",
        flush=True,
    )
    rows = []
    for size in args.size_list:
        preset = _accel.SIZES[size]
        r = measure(preset, args)
        ms = {
            (k, t): 1e3 * statistics.median(r[k][t])
            for k in ("real", "bare", "update")
            for t in r[k]
        }
        print(
            f"{preset}: {r['leaves']} leaves; step {ms['real', 'cpu']:.2f} ms CPU, "
            f"{ms['real', 'wall']:.2f} ms wall (p10-p90 {_percentiles_ms(r['real']['wall'])}); "
            f"bare {ms['bare', 'cpu']:.2f} ms CPU, {ms['bare', 'wall']:.2f} ms wall "
            f"({_percentiles_ms(r['bare']['wall'])}); update {ms['update', 'cpu']:.2f} ms CPU; "
            "a whole step here "
            f"{1e3 * statistics.median(r['real']['whole']):.0f} ms; {r['seconds']:.0f} s in all "
            "with the compile",
            flush=True,
        )
        device_ms = 1e3 * r["device_s"]
        rows.append(
            (
                f"{size} ({r['leaves']} leaves)",
                f"{ms['real', 'cpu']:.2f} ms",
                f"bare {ms['bare', 'cpu']:.2f} ms, update {ms['update', 'cpu']:.2f} ms, step/bare "
                f"{ms['real', 'cpu'] / ms['bare', 'cpu']:.2f}x (wall {ms['real', 'wall']:.2f} "
                f"and {ms['bare', 'wall']:.2f} ms); H100 at 50% MFU, {DEVICE_BATCH}/chip: "
                f"{device_ms:.3g} ms ({'host ahead' if ms['real', 'cpu'] < device_ms else 'HOST BEHIND'})",
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
