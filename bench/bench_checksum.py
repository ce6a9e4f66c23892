"""Seconds per save that the checkpoint checksums cost, for ViT-L pretraining.

Run from the repository root: `python bench/bench_checksum.py [--preset mae_vit_large_patch16]
[--reps 5]`.

``Checkpoints.save`` takes a CRC-32 of every array it saves (``run_checkpoints.checksums``) before
handing them to Orbax, on the training loop's thread. This times exactly that on the preset's
parameters and AdamW state (mu and nu) as host float32 arrays (for ViT-L about 330M numbers each,
4 GB in all), alternating with a calibration: a 2048x2048 float32 matmul in numpy, so that a figure
from another machine can be compared. It prints the medians, the throughput and the machine line.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
from _common import interleaved_times, machine_line  # also puts the repository on sys.path


def host_state(preset: str) -> tuple[dict, dict]:
    """The preset's model tree and optimizer leaves as save receives them: host numpy arrays
    (shapes from ``nnx.eval_shape``, so nothing is initialized; the values do not matter)."""
    import jax
    from flax import nnx

    import mae_jax
    from mae_jax import optim, pretrain_step

    model = nnx.eval_shape(lambda: mae_jax.create_model(preset, rngs=nnx.Rngs(0)))
    _, params, fixed = pretrain_step.split_model(model)
    opt_state = jax.eval_shape(optim.pretrain_direction().init, params)

    def fill(x):
        return np.full(x.shape, 0.5, x.dtype)

    model_tree = {
        "params": jax.tree.map(fill, nnx.to_pure_dict(params)),
        "fixed": jax.tree.map(fill, nnx.to_pure_dict(fixed)),
    }
    opt_leaves = {str(i): fill(x) for i, x in enumerate(jax.tree.leaves(opt_state))}
    return model_tree, opt_leaves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mae_vit_large_patch16")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    from mae_jax.run_checkpoints import checksums

    model_tree, opt_leaves = host_state(args.preset)
    import jax

    arrays = jax.tree.leaves(model_tree) + list(opt_leaves.values())
    nbytes = sum(a.nbytes for a in arrays)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((2048, 2048), dtype=np.float32) for _ in range(2))
    times = interleaved_times(
        {
            "checksums": lambda: (checksums(model_tree), checksums(opt_leaves)),
            "matmul": lambda: a @ b,
        },
        reps=args.reps,
    )
    per_save = statistics.median(times["checksums"])
    matmul = statistics.median(times["matmul"])
    print(
        f"{args.preset}: {len(arrays)} arrays, {nbytes / 1e9:.2f} GB (parameters, AdamW mu and nu)"
    )
    print(
        f"checksums per save (CRC-32, zlib): {per_save:.2f} s median of {args.reps} "
        f"(range {min(times['checksums']):.2f}-{max(times['checksums']):.2f} s), "
        f"{nbytes / per_save / 1e9:.2f} GB/s"
    )
    print(
        f"calibration: 2048x2048 float32 matmul in numpy {1e3 * matmul:.1f} ms median "
        f"({2 * 2048**3 / matmul / 1e9:.0f} GFLOP/s)"
    )
    print(f"machine: {machine_line()}")


if __name__ == "__main__":
    main()
