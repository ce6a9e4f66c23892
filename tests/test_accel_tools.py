"""The accelerator tools in bench/: TPU slice names, chip tables, argument errors, and the train
step that bench/_accel.build_step builds (its signature must follow mae_jax.train)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.extend import core as jax_core

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import _accel  # noqa: E402
import bench_accel  # noqa: E402
import bench_host  # noqa: E402
import plan_tpu  # noqa: E402


@pytest.mark.parametrize(
    "name, chips, topology_name",
    [
        ("v4-8", 4, "v4:2x2x1"),  # v4 and v5p names count TensorCores, two per chip
        ("v4-32", 16, "v4:2x2x4"),
        ("v5p-128", 64, "v5p:4x4x4"),
        ("v5e-1", 1, "v5e:1x1"),
        ("v5e-8", 8, "v5e:2x4"),
        ("v5litepod-16", 16, "v5e:4x4"),
        ("v6e-256", 256, "v6e:16x16"),
    ],
)
def test_tpu_slice_names_map_to_cloud_topologies(name, chips, topology_name):
    tpu = _accel.parse_tpu_slice(name)
    assert (tpu.chips, tpu.topology_name) == (chips, topology_name)


@pytest.mark.parametrize("name", ["v4-6", "v4-4", "v5e-12", "v7-8", "v5e", "tpu"])
def test_bad_tpu_slice_names_are_refused(name):
    with pytest.raises(_accel.AccelError, match="--tpu"):
        _accel.parse_tpu_slice(name)


@pytest.mark.parametrize(
    "kind, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H200", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("TPU v4", 275),
        ("TPU v5 lite", 197),
        ("TPU v5", 459),
        ("TPU v6 lite", 918),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_table_matches_device_kinds(kind, tflops):
    assert _accel.peak_bf16_tflops(kind) == tflops


@pytest.mark.parametrize(
    "module, argv, message",
    [
        (plan_tpu, ["mae_vit_base_patch16", "--tpu", "v5e-7", "--batch", "8"], "power of two"),
        (plan_tpu, ["mae_vit_nope", "--tpu", "v5e-8", "--batch", "8"], "unknown preset"),
        (plan_tpu, ["mae_vit_base_patch16", "--tpu", "v5e-8", "--batch", "8,x"], "--batch"),
        (bench_accel, ["--sizes", "base,giant"], "--sizes"),
        (bench_accel, ["--batch", "0"], "positive"),
        (bench_host, ["--sizes", "base,giant"], "--sizes"),
        (bench_host, ["--calls", "0"], "positive"),
    ],
)
def test_bad_arguments_give_one_line_and_status_2(module, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_build_step_compiles_with_sharded_optimizer_and_counts_flops():
    """The abstract step over 2 CPU devices with ZeRO-1 lowers and compiles with no arrays made;
    XLA's FLOP count covers the hand count of the matmuls and is not far above it."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("devices",))
    build = _accel.build_step(
        "mae_vit_tiny_patch4", 4, dtype="float32", remat="none", mesh=mesh, zero=True
    )
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(build.args))
    images = build.args[3]
    assert images.shape == (1, 8, 32, 32, 3) and images.dtype == np.uint8
    compiled = build.fn.lower(*build.args).compile()
    flops = _accel.cost_flops(compiled)
    by_hand = _accel.analytic_train_flops(build.config, 4)
    assert by_hand <= flops <= 1.3 * by_hand


@functools.cache
def _xla_dot_flops(lhs, rhs, dimension_numbers, preferred) -> float:
    """XLA's cost analysis of one dot_general of these operands, on this machine's backend."""

    def dot(a, b):
        return jax.lax.dot_general(a, b, dimension_numbers, preferred_element_type=preferred)

    lowered = jax.jit(dot).lower(jax.ShapeDtypeStruct(*lhs), jax.ShapeDtypeStruct(*rhs))
    cost = lowered.cost_analysis()
    return float((cost[0] if isinstance(cost, list | tuple) else cost)["flops"])


def xla_matmul_flops(jaxpr) -> float:
    """The FLOPs XLA counts for every dot_general of ``jaxpr``, nested ones included (a scan's
    body times its length, the costlier branch of a cond)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            lhs, rhs = ((v.aval.shape, v.aval.dtype) for v in eqn.invars)
            params = eqn.params
            total += _xla_dot_flops(
                lhs, rhs, params["dimension_numbers"], params.get("preferred_element_type")
            )
            continue
        inner = [
            xla_matmul_flops(j.jaxpr if isinstance(j, jax_core.ClosedJaxpr) else j)
            for value in eqn.params.values()
            for j in (value if isinstance(value, list | tuple) else [value])
            if isinstance(j, jax_core.ClosedJaxpr | jax_core.Jaxpr)
        ]
        if eqn.primitive.name == "cond":
            total += max(inner, default=0.0)
        elif eqn.primitive.name == "scan":
            total += eqn.params["length"] * sum(inner)
        else:
            total += sum(inner)
    return total


def _one_device_step(preset: str, batch: int):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("devices",))
    return _accel.build_step(preset, batch, dtype="float32", remat="none", mesh=mesh)


@pytest.mark.parametrize("preset, batch", [("mae_vit_tiny_patch4", 4), ("mae_demo_patch8", 8)])
def test_analytic_flops_are_xla_count_of_every_matmul_of_the_step(preset, batch):
    """Every dot_general of the real step (forward and backward; the optimizer has none), each
    costed by XLA, adds up to the analytic count: no matmul is missing or counted twice. XLA's
    count of the whole step also holds the elementwise work, 4-6% at these widths (0.4% for
    ViT-B, below). float32: in bfloat16 the dots are the same, but XLA:CPU costs some of them
    with conversions (+0.04% here)."""
    build = _one_device_step(preset, batch)
    jaxpr = jax.make_jaxpr(build.fn)(*build.args).jaxpr
    xla = xla_matmul_flops(jaxpr)
    by_hand = _accel.analytic_train_flops(build.config, batch)
    assert by_hand == pytest.approx(xla, rel=1e-6)  # the bound is 2%; it is exact


def test_analytic_flops_within_2_percent_of_xla_count_of_the_vit_b_step():
    """XLA's cost analysis of the whole lowered ViT-B step at 64 images (elementwise work and
    AdamW included) is within 2% of the analytic matmul count (+0.4%): what MFU is taken from
    on GPU, where XLA's own count is unusable, is what XLA counts on CPU."""
    build = _one_device_step("mae_vit_base_patch16", 64)
    cost = build.fn.lower(*build.args).cost_analysis()
    xla = float((cost[0] if isinstance(cost, list | tuple) else cost)["flops"])
    by_hand = _accel.analytic_train_flops(build.config, 64)
    assert by_hand <= xla <= 1.02 * by_hand


def test_device_time_at_half_mfu_on_an_h100():
    """The figures bench_host.py prints beside the host time (issue 17: ~7.5, 16 and 38 ms)."""
    from mae_jax.config import get_config

    ms = [
        1e3 * _accel.device_seconds_at(_accel.analytic_train_flops(get_config(p), 64), 989.0)
        for p in ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14")
    ]
    np.testing.assert_allclose(ms, [7.5, 16.0, 37.6], rtol=0.01)


def test_compile_only_tpu_devices_without_a_tpu():
    pytest.importorskip("libtpu")
    devices = _accel.compile_only_devices(_accel.parse_tpu_slice("v5e-8"))
    assert len(devices) == 8 and devices[0].device_kind == "TPU v5 lite"


def test_device_check_runs_on_cpu(tmp_path):
    """bench/device_check.sh --cpu: every step of the first-GPU script (tiny model) passes and
    the summary holds each step's status and its key lines."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env["PYTHON"] = sys.executable
    result = subprocess.run(
        ["bash", "bench/device_check.sh", "--cpu", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = (tmp_path / "summary.txt").read_text()
    assert result.returncode == 0, summary + result.stderr[-2000:]
    steps = (
        *("weights", "export", "convert", "parity", "precision", "attention", "accel", "host"),
        "packing",
    )
    for step in steps:
        assert f"[ok]     {step} (" in summary
    assert "[FAILED]" not in summary
    assert "parity: all stages within tolerance" in summary
    assert summary.count("finite True: ok") == 3  # the tiny MAE's encoder, decoder, classifier
    assert "matmul calibration" in summary and "tiny (183 -> 9 buffers)" in summary
    assert "packed/per-param" in summary
