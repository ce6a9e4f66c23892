"""The accelerator tools in bench/: TPU slice names, chip tables, argument errors, and the train
step that bench/_accel.build_step builds (its signature must follow mae_jax.train)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import _accel  # noqa: E402
import bench_accel  # noqa: E402
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


def test_compile_only_tpu_devices_without_a_tpu():
    pytest.importorskip("libtpu")
    devices = _accel.compile_only_devices(_accel.parse_tpu_slice("v5e-8"))
    assert len(devices) == 8 and devices[0].device_kind == "TPU v5 lite"
