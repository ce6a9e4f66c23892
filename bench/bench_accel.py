"""Pretraining speed on one accelerator: mae_jax's train step against the PyTorch recipe, images/s
and MFU, for ViT-B, ViT-L and ViT-H in bfloat16.

Run from the repository root on a GPU or TPU machine (see bench/README.md for the install line):

    python bench/bench_accel.py [--sizes base,large,huge] [--batch 64] [--steps 20] [--warmup 3]
                                [--remat none|block|dots] [--skip-torch] [--peak-tflops X]

Smoke run on CPU (tiny model, numbers meaningless): ``--allow-cpu --sizes tiny``.

JAX: ``_accel.build_step`` (the real train step under shard_map on a one-device mesh, uint8 images
normalized on the device, parameters and optimizer state donated), compiled ahead of time.
PyTorch: Hugging Face ``ViTMAEForPreTraining`` with MAE's sizes and SDPA attention, torch autocast
bfloat16 (AMP), ``torch.optim.AdamW(fused=True)`` with the official decay groups; same batch, mask
ratio 0.75, norm_pix_loss. Both on the first device of the same card, one after the other, each
step blocked until ready; the median of the timed steps after the warmup steps.

MFU = the step's model FLOPs (``_accel.analytic_train_flops``: the matmuls of the forward and
backward, attention included; not the optimizer, not remat's recomputation) / step time / the
chip's dense bf16 peak. Not XLA's cost analysis: on GPU it counts the cuBLAS and cuDNN calls,
which do nearly all the work, as -1 FLOP each. The torch MFU uses the same count, since both
compute the same model. The JAX step is compiled once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

# JAX must not take 75% of the card up front: torch runs on the same device in this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import _accel  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _accel.OneLineParser(prog="bench_accel.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="base,large,huge", help=f"from {', '.join(_accel.SIZES)}"
    )
    parser.add_argument("--batch", type=int, default=64, help="images per device per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side and size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--remat", choices=("none", "block", "dots"), default="none")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--skip-torch", action="store_true", help="time the JAX step only")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, if not in the table")
    parser.add_argument("--allow-cpu", action="store_true", help="smoke run on CPU")
    args = parser.parse_args(argv)
    args.size_list = _accel.parse_sizes(parser, args.sizes)
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch and --steps must be positive, --warmup not negative")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error("--peak-tflops must be positive")
    return args


def time_steps(step: Callable[[], None], warmup: int, steps: int) -> list[float]:
    """Seconds of each timed call; ``step`` must block until its results are ready."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


# --------------------------------------------------------------------------- JAX


def run_jax(preset: str, args: argparse.Namespace, device) -> dict:
    import jax
    import numpy as np

    from mae_jax import replication

    mesh = jax.sharding.Mesh(np.array([device]), (replication.AXIS,))
    build = _accel.build_step(
        preset, args.batch, dtype=args.dtype, remat=args.remat, mesh=mesh, concrete=True
    )
    start = time.perf_counter()
    compiled = build.fn.lower(*build.args).compile()
    compile_s = time.perf_counter() - start
    state = {"args": build.args, "metrics": None}

    def step() -> None:
        outputs = compiled(*state["args"])
        jax.block_until_ready(outputs)
        state["args"] = build.advance(state["args"], outputs)
        state["metrics"] = outputs[2]

    times = time_steps(step, args.warmup, args.steps)
    loss = float(np.asarray(state["metrics"]["loss"]))
    return {
        "seconds": statistics.median(times),
        "flops": _accel.analytic_train_flops(build.config, args.batch),
        "compile_s": compile_s,
        "loss": loss,
    }


# --------------------------------------------------------------------------- PyTorch


def run_torch(preset: str, args: argparse.Namespace, device: str) -> dict:
    import torch
    from transformers import ViTMAEForPreTraining

    from convert.hf_reference import vitmae_config
    from mae_jax.config import get_config

    config = get_config(preset, norm_pix_loss=True)
    hf_config = vitmae_config(config, mask_ratio=_accel.MASK_RATIO, norm_pix_loss=True, attn="sdpa")
    model = ViTMAEForPreTraining(hf_config).to(device).train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # the official rule: no decay for 1-D and biases
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": _accel.WEIGHT_DECAY}, {"params": no_decay}],
        lr=_accel.LR,
        betas=_accel.BETAS,
        weight_decay=0.0,
        fused=True,
    )
    autocast_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    shape = (args.batch, config.in_chans, config.img_size, config.img_size)
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=generator)
    mean = torch.tensor(_accel.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(_accel.IMAGENET_STD, device=device).view(1, 3, 1, 1)
    device_type = torch.device(device).type
    losses = []

    def step() -> None:
        # uint8 in, normalized on the device, as the JAX step does.
        x = (images.float() / 255.0 - mean) / std
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=args.dtype != "float32"):
            loss = model(pixel_values=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()
        losses.append(loss.detach())

    times = time_steps(step, args.warmup, args.steps)
    loss = float(losses[-1])
    return {"seconds": statistics.median(times), "loss": loss}


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _release_torch_memory() -> None:
    """Give torch's cached blocks back, so the next size's JAX step finds the card's memory."""
    try:
        import torch
    except ModuleNotFoundError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- report


def versions() -> str:
    import jax

    parts = [f"jax {jax.__version__}"]
    try:
        import torch
        import transformers

        cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
        parts.append(f"torch {torch.__version__}{cuda}, transformers {transformers.__version__}")
    except ModuleNotFoundError:
        parts.append("torch not installed")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu" and not args.allow_cpu:
        print(
            "bench_accel.py: error: jax finds no accelerator (only cpu); on a GPU install "
            '"jax[cuda12]", on a TPU "jax[tpu]", or pass --allow-cpu --sizes tiny for a smoke run',
            file=sys.stderr,
        )
        return 2
    peak = args.peak_tflops or _accel.peak_bf16_tflops(device.device_kind)
    peak_text = f"{peak:g} TFLOP/s dense bf16" if peak else "unknown peak (pass --peak-tflops)"
    print(
        f"device: {device.device_kind} ({device.platform}, 1 of {len(jax.devices())}), {peak_text}"
    )
    print(f"versions: {versions()}")
    print(
        f"per step: {args.batch} images, {args.dtype}, remat {args.remat}, mask ratio "
        f"{_accel.MASK_RATIO}, norm_pix_loss; median of {args.steps} steps after {args.warmup}",
        flush=True,
    )
    torch_device = None
    if not args.skip_torch:
        torch_device = {"gpu": "cuda", "cpu": "cpu"}.get(device.platform)
        if torch_device is None:
            print(f"torch: skipped (no torch device for {device.platform})")

    rows = []
    for size in args.size_list:
        preset = _accel.SIZES[size]
        print(f"\n{preset}", flush=True)
        try:
            jx = run_jax(preset, args, device)
        except Exception as e:  # one size out of memory must not cost the other sizes' figures
            print(f"  jax:   failed: {_first_line(e)}", flush=True)
            continue
        print(
            f"  jax:   {1e3 * jx['seconds']:.1f} ms/step (compiled in {jx['compile_s']:.0f} s), "
            f"loss {jx['loss']:.4f}",
            flush=True,
        )
        th = None
        if torch_device is not None:
            try:
                th = run_torch(preset, args, torch_device)
            except ModuleNotFoundError as e:
                print(f"  torch: skipped ({e.name} is not installed)")
                torch_device = None
            except Exception as e:
                print(f"  torch: failed: {_first_line(e)}")
            else:
                print(f"  torch: {1e3 * th['seconds']:.1f} ms/step, loss {th['loss']:.4f}")
            finally:
                _release_torch_memory()
        rows.append((size, jx, th))

    print(f"\nsummary ({device.device_kind}, batch {args.batch}, {args.dtype}, remat {args.remat})")
    print("  size   jax img/s  jax MFU  torch img/s  torch MFU  jax/torch  GFLOP/step")
    for size, jx, th in rows:
        flops = jx["flops"]

        def mfu(seconds: float, flops=flops) -> str:
            if not (flops and peak):
                return "n/a"
            return f"{100 * flops / seconds / (peak * 1e12):.1f}%"

        jax_ips = args.batch / jx["seconds"]
        torch_ips = f"{args.batch / th['seconds']:.1f}" if th else "-"
        ratio = f"{th['seconds'] / jx['seconds']:.2f}x" if th else "-"
        print(
            f"  {size:<6} {jax_ips:>9.1f} {mfu(jx['seconds']):>8} {torch_ips:>12} "
            f"{mfu(th['seconds']) if th else '-':>10} {ratio:>10} "
            f"{flops / 1e9 if flops else float('nan'):>11.1f}"
        )
    print("  (MFU from the model's matmul FLOPs, analytic; remat's recomputation is not counted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
