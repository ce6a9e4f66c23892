"""Shared pieces of the forward benchmarks: interleaved timing, the machine line, the HF reference.

Not a library: imported only by the bench_*.py scripts next to it (run from the repository root).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/, not the root, on sys.path
    sys.path.insert(0, str(REPO))


def interleaved_times(
    runs: Mapping[str, Callable[[], object]], reps: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each zero-argument function, alternating them within every round.

    Each function must block until its result is ready. Alternating (and rotating the order every
    round) spreads the load of other processes on this shared machine evenly over all candidates,
    so their ratio stays meaningful even when the absolute numbers drift.
    """
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


def spread(seconds: list[float]) -> str:
    """min-max of the repetitions in ms, to show how noisy a median is."""
    return f"{1e3 * min(seconds):.0f}-{1e3 * max(seconds):.0f}"


def machine_line() -> str:
    """CPU, core count, load, library versions: the context every printed figure needs."""
    import jax
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} cores (load avg {load}); python {platform.python_version()}, "
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )


def print_summary(title: str, rows: list[tuple[str, str, str]]) -> None:
    """The closing table: one (label, value, note) row a line, then the machine line."""
    label_width = max(len(label) for label, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    print()
    print(f"summary ({title})")
    for label, value, note in rows:
        print(f"  {label:<{label_width}}  {value:>{value_width}}  {note}".rstrip())
    print(f"  machine: {machine_line()}")
    print(f"  {calibration_line()}")


def calibration_line(n: int = 1024, reps: int = 7) -> str:
    """GFLOP/s of one float32 n x n matmul in XLA (jit) and in torch, alternating, in this run.

    CPUs of the same kind differ up to 2x in speed; this line lets ratios measured on different
    machines (or under different load) be compared.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    a_j, b_j = jnp.asarray(a), jnp.asarray(b)
    a_t, b_t = torch.from_numpy(a), torch.from_numpy(b)
    matmul = jax.jit(jnp.matmul)
    times = interleaved_times(
        {
            "xla": lambda: matmul(a_j, b_j).block_until_ready(),
            "torch": lambda: torch.matmul(a_t, b_t),
        },
        reps=reps,
    )
    flops = 2 * n**3
    xla, tch = (flops / statistics.median(times[k]) / 1e9 for k in ("xla", "torch"))
    return (
        f"matmul calibration (float32 {n}x{n} @ {n}x{n}, median of {reps}): "
        f"XLA {xla:.0f} GFLOP/s, torch {tch:.0f} GFLOP/s ({torch.get_num_threads()} threads)"
    )


def hf_pretraining_model(state_dict, config, *, attn: str, mask_ratio: float, dtype=None):
    """HF ViTMAEForPreTraining (eval) holding an official-layout state_dict; attn 'sdpa' or 'eager'."""
    import torch
    from transformers import ViTMAEForPreTraining

    from convert.hf_reference import load_official_into_hf, vitmae_config

    model = ViTMAEForPreTraining(
        vitmae_config(config, mask_ratio=mask_ratio, norm_pix_loss=config.norm_pix_loss, attn=attn)
    )
    load_official_into_hf(model, state_dict, what=f"benchmark weights vs HF ViTMAE ({attn})")
    return model.to(dtype or torch.float32).eval()
