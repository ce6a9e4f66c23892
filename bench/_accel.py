"""Shared by plan_tpu.py and bench_accel.py: chip tables, TPU slice names, meshes, and ``build_step``,
the one function that knows the train step's signature.

Not a library: imported only by the scripts next to it (run from the repository root).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/, not the root, on sys.path
    sys.path.insert(0, str(REPO))

MASK_RATIO = 0.75
LR = 1.5e-4 * 4096 / 256  # the official blr at the official 4096 batch; it does not change timing
WEIGHT_DECAY = 0.05
BETAS = (0.9, 0.95)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GIB = 2**30


class AccelError(ValueError):
    """A request the tools cannot serve (unknown chip, bad slice name, ...); the message says why."""


# Short names of the presets that bench_accel.py and bench_host.py take in --sizes.
SIZES = {
    "tiny": "mae_vit_tiny_patch4",
    "demo": "mae_demo_patch8",
    "base": "mae_vit_base_patch16",
    "large": "mae_vit_large_patch16",
    "huge": "mae_vit_huge_patch14",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line and status 2, without the usage block."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_sizes(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """--sizes 'base,large' -> ['base', 'large'] (keys of SIZES), or the parser's error."""
    sizes = [s.strip() for s in text.split(",") if s.strip()]
    if not sizes or any(s not in SIZES for s in sizes):
        parser.error(f"--sizes {text!r}: choose from {', '.join(SIZES)}")
    return sizes


# --------------------------------------------------------------------------- chip tables


@dataclasses.dataclass(frozen=True)
class TpuFamily:
    """One TPU generation as Cloud TPU sells it."""

    name: str  # the family in slice names: v4, v5e, v5p, v6e
    topology_prefix: str  # the name libtpu's topology parser takes
    chip_config: str  # megacore: the chip's 2 TensorCores form one device
    hbm_gib: float  # per chip
    dims: int  # torus dimensions (3-D slices for v4/v5p, 2-D for v5e/v6e)
    cores_in_name: bool  # slice names count TensorCores (v4-8 = 4 chips), not chips
    chips_per_host: tuple[int, int, int]


# Per-chip HBM and dense bf16 peak from Google's public Cloud TPU pages (docs.cloud.google.com/tpu/
# docs/v4, /v5e, /v5p, /v6e, "System architecture" tables): v4 32 GiB and 275 TFLOP/s; v5e 16 GiB
# and 197 TFLOP/s; v5p 95 GiB and 459 TFLOP/s; v6e (Trillium) 32 GiB and 918 TFLOP/s (the peaks
# are in PEAK_BF16_TFLOPS below, keyed by the device_kind jax reports). v4 and v5p
# have two TensorCores per chip that JAX drives as one device (megacore); v5e and v6e have one.
# Their slice names differ too: v4-8 and v5p-8 count TensorCores (4 chips), v5e-8 and v6e-8 chips.
TPU_FAMILIES: dict[str, TpuFamily] = {
    "v4": TpuFamily("v4", "v4", "megacore", 32, 3, True, (2, 2, 1)),
    "v5p": TpuFamily("v5p", "v5p", "megacore", 95, 3, True, (2, 2, 1)),
    "v5e": TpuFamily("v5e", "v5e", "default", 16, 2, False, (2, 4, 1)),
    "v6e": TpuFamily("v6e", "v6e", "default", 32, 2, False, (2, 4, 1)),
}
# The names users type for the same families (Cloud's accelerator types and marketing names).
_TPU_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    family: TpuFamily
    chips: int
    topology: tuple[int, ...]  # chips along each torus axis

    @property
    def topology_name(self) -> str:
        return f"{self.family.topology_prefix}:{'x'.join(map(str, self.topology))}"


def _slice_topology(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud TPU's standard slice shapes: double the shortest axis, the last one on ties.

    3-D: 4 -> 2x2x1, 8 -> 2x2x2, 16 -> 2x2x4, 32 -> 2x4x4, 64 -> 4x4x4. 2-D: 1 -> 1x1, 4 -> 2x2,
    8 -> 2x4, 16 -> 4x4, 32 -> 4x8, 256 -> 16x16.
    """
    shape = [2, 2, 1] if dims == 3 else [1, 1]
    while (size := _product(shape)) < chips:
        smallest = min(shape)
        last = max(i for i, s in enumerate(shape) if s == smallest)
        shape[last] *= 2
    if size != chips:
        raise AccelError(f"no standard slice holds {chips} chips")
    return tuple(shape)


def _product(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def parse_tpu_slice(name: str) -> TpuSlice:
    """'v5e-8' (8 chips), 'v4-8' (8 TensorCores = 4 chips), 'v5p-16', 'v6e-256' -> TpuSlice."""
    match = re.fullmatch(r"(v[0-9a-z]+)-(\d+)", name.strip().lower())
    if match is None:
        raise AccelError(f"--tpu {name!r}: expected FAMILY-SIZE such as v5e-8, v4-8, v5p-8, v6e-8")
    family_name = _TPU_ALIASES.get(match[1], match[1])
    if family_name not in TPU_FAMILIES:
        raise AccelError(f"--tpu {name!r}: unknown TPU family; known: {', '.join(TPU_FAMILIES)}")
    family = TPU_FAMILIES[family_name]
    size = int(match[2])
    chips, rest = divmod(size, 2) if family.cores_in_name else (size, 0)
    if rest or chips < 1 or chips & (chips - 1) or (family.dims == 3 and chips < 4):
        unit = "TensorCores (2 per chip)" if family.cores_in_name else "chips"
        smallest = 8 if family.cores_in_name else 1
        raise AccelError(
            f"--tpu {name!r}: the size counts {unit}; use a power of two >= {smallest}"
        )
    return TpuSlice(family, chips, _slice_topology(chips, family.dims))


def compile_only_devices(tpu: TpuSlice) -> list:
    """Devices of a TPU slice that can only compile: no TPU needed, only libtpu (jax[tpu])."""
    from jax.experimental import topologies

    # libtpu takes a machine-wide lock on first use, meant for a real TPU's exclusive owner; a
    # compile-only client owns no chip, so several plans (and the tests) may run side by side.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    topology = tpu.topology + (1,) * (3 - len(tpu.topology))
    host = tuple(min(h, t) for h, t in zip(tpu.family.chips_per_host, topology, strict=True))
    try:
        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=tpu.topology_name,
            chip_config_name=tpu.family.chip_config,
            chips_per_host_bounds=host,
            num_slices=1,
            wrap=(False, False, False),
        )
    except (RuntimeError, NotImplementedError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AccelError(
            f"cannot describe TPU topology {tpu.topology_name}: {first_line} "
            '(is libtpu installed? pip install "jax[tpu]==<your jax version>")'
        ) from None
    return list(desc.devices)


# Dense bf16 peak FLOP/s per device, matched as substrings of jax's / torch's device_kind, first
# match wins (so "H100 PCIe" precedes "H100"). Sources: NVIDIA's datasheets (H100 SXM5 and H200:
# 989.4 TFLOPS bf16 dense, the 1,979 headline is with 2:4 sparsity; H100 PCIe 756; A100 312) and
# the Cloud TPU pages above. A TPU v4/v5p device is one megacore chip.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),  # also GH200
    ("A100", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),  # jax calls v5p "TPU v5"
    ("TPU v6 lite", 918.0),  # v6e
    ("TPU v6e", 918.0),
)


def peak_bf16_tflops(device_kind: str) -> float | None:
    """The table's dense bf16 peak of one device of this kind, or None for an unknown chip."""
    for needle, tflops in PEAK_BF16_TFLOPS:
        if needle.lower() in device_kind.lower():
            return tflops
    return None


# --------------------------------------------------------------------------- FLOPs by hand


def analytic_train_flops(config, batch: int, mask_ratio: float = MASK_RATIO) -> float:
    """Matmul FLOPs of one forward+backward of ``batch`` images, no optimizer: the model FLOPs
    that MFU is computed from (bench_accel.py, bench_host.py), whatever the platform counts.

    Per block 24*T*D^2 (qkv, proj, two MLP layers at mlp_ratio 4; 2*(4 + 2*mlp_ratio)*T*D^2 in
    general) and 4*T^2*D (q @ k^T and weights @ v); the patch embedding and the encoder see the
    1 + kept tokens (the kept patches only are embedded), decoder_embed the encoder's 1 + kept
    outputs, the decoder and decoder_pred 1 + all tokens. Backward = twice the forward (the
    gradients of a matmul's two inputs), except the patch embedding, whose input is the images:
    no gradient, so it counts twice, not three times. With remat the hardware does more (the
    recomputed forward), which MFU does not count. tests/test_accel_tools.py checks the count
    against XLA's own count of every matmul of the real step.
    """
    from mae_jax.masking import num_kept

    kept = num_kept(config.num_patches, mask_ratio)
    d, dd, p = config.embed_dim, config.decoder_embed_dim, config.patch_dim
    t_enc, t_dec = 1 + kept, 1 + config.num_patches
    mlp = config.mlp_ratio

    def blocks(depth: int, t: int, width: int) -> float:
        return depth * (2 * t * width * width * (4 + 2 * mlp) + 4 * t * t * width)

    patch_embed = 2 * kept * p * d
    rest = (
        blocks(config.depth, t_enc, d)
        + 2 * t_enc * d * dd
        + blocks(config.decoder_depth, t_dec, dd)
        + 2 * t_dec * dd * p
    )
    return float(batch * (2 * patch_embed + 3 * rest))


def device_seconds_at(flops: float, peak_tflops: float, mfu: float = 0.5) -> float:
    """Seconds a device of ``peak_tflops`` takes for ``flops`` at model FLOPs utilisation ``mfu``."""
    return flops / (mfu * peak_tflops * 1e12)


# --------------------------------------------------------------------------- the train step


@dataclasses.dataclass
class StepBuild:
    """A train step over a mesh, not yet compiled, and the arguments of its first call.

    ``args`` are ShapeDtypeStructs with shardings (``concrete=False``) or device arrays;
    ``advance(args, outputs)`` gives the next call's arguments (state threaded, step + 1).
    """

    fn: Callable
    args: tuple
    advance: Callable[[tuple, tuple], tuple]
    config: Any
    global_batch: int


def _model_factory(config, dtype, remat: str) -> Callable[[Any], Any]:
    from mae_jax.model import MaskedAutoencoderViT

    return lambda rngs: MaskedAutoencoderViT(config, rngs=rngs, dtype=dtype, remat=remat)


def build_step(
    preset: str,
    per_chip_batch: int,
    *,
    dtype: str,
    remat: str,
    mesh,
    zero: bool = False,
    concrete: bool = False,
    seed: int = 0,
    packed: bool | None = None,
) -> StepBuild:
    """The pretraining step of ``preset`` under ``jax.shard_map`` over ``mesh`` (one axis named
    ``replication.AXIS``): parameters replicated, the optimizer state replicated or, with ``zero``,
    split over the devices (ZeRO-1, ``pretrain_step.OptimizerShards``), uint8 images split on the batch
    axis. Parameters and optimizer state are donated, as in training.

    With ``concrete=False`` nothing is materialized: the model comes from ``nnx.eval_shape`` and
    every argument is a ShapeDtypeStruct, so planning ViT-H costs no memory. ``packed``: the
    parameters and optimizer state packed by weight-decay group or one buffer per parameter;
    by default as the training loop lays them out on the mesh's platform. This is the only
    place that knows the step's signature, ``pretrain_step.make_train_step``'s
    ``step(params, opt_state, fixed, imgs_uint8 [accum, b, H, W, 3], key, step, lr)``.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mae_jax import pretrain_step, replication
    from mae_jax.config import get_config

    config = get_config(preset, norm_pix_loss=True)
    compute_dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[dtype]
    make_model = _model_factory(config, compute_dtype, remat)
    n_dev = mesh.devices.size
    global_batch = per_chip_batch * n_dev
    accum_iter = 1
    abstract_model = nnx.eval_shape(lambda: make_model(nnx.Rngs(seed)))
    graphdef, abstract_params, abstract_fixed = pretrain_step.split_model(abstract_model)
    if packed is None:  # as the training loop: packed by weight-decay group on GPUs
        packed = pretrain_step.packs_state(mesh.devices.flat[0].platform)
    plain_params = nnx.to_pure_dict(abstract_params)
    packing, tx = pretrain_step.pretrain_optimizer(
        plain_params,
        packed=packed,
        weight_decay=WEIGHT_DECAY,
        b1=BETAS[0],
        b2=BETAS[1],
    )
    packed_params = jax.eval_shape(packing.pack, plain_params)
    shards = pretrain_step.OptimizerShards(packed_params, n_dev) if zero else None
    step_fn = pretrain_step.make_train_step(
        graphdef,
        tx,
        mask_ratio=MASK_RATIO,
        num_patches=config.num_patches,
        shards=shards,
        packing=packing,
    )

    # The optimizer state as one device holds it: the full state, or its slices of every
    # packed buffer (flat [k] leaves, laid out as [n * k] over the mesh) beside replicated
    # scalars.
    local_opt = jax.eval_shape(tx.init, shards.template() if zero else packed_params)

    def opt_spec(leaf):
        return P(replication.AXIS) if zero and leaf.ndim >= 1 else P()

    opt_specs = jax.tree.map(opt_spec, local_opt)
    image_spec = P(None, replication.AXIS)
    in_specs = (P(), opt_specs, P(), image_spec, P(), P(), P())
    # check_vma=False: the step is written for pmap, where replication is not tracked; its outputs
    # are replicated by construction (averaged gradients, or all-gathered slices under ZeRO-1),
    # but jax cannot infer that through all_gather.
    sharded = jax.shard_map(
        step_fn,
        mesh=mesh,
        in_specs=in_specs,
        out_specs=(P(), opt_specs, P()),
        check_vma=False,
    )
    fn = jax.jit(sharded, donate_argnums=(0, 1))

    replicated = NamedSharding(mesh, P())
    image_sharding = NamedSharding(mesh, image_spec)
    opt_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), opt_specs)
    image_shape = (accum_iter, global_batch, config.img_size, config.img_size, config.in_chans)

    def global_opt_shape(leaf, spec):
        return (leaf.shape[0] * n_dev, *leaf.shape[1:]) if spec != P() else leaf.shape

    if concrete:

        def init():
            _, params, fixed = pretrain_step.split_model(make_model(nnx.Rngs(seed)))
            params = packing.pack(nnx.to_pure_dict(params))
            opt_state = tx.init(params)
            if zero:  # zero slices, as a fresh run's AdamW moments are zero anyway
                opt_state = jax.tree.map(
                    lambda leaf, spec: jnp.zeros(global_opt_shape(leaf, spec), leaf.dtype),
                    local_opt,
                    opt_specs,
                )
            return params, opt_state, fixed

        params, opt_state, fixed = jax.jit(
            init, out_shardings=(replicated, opt_shardings, replicated)
        )()
        keys = jax.random.split(jax.random.key(seed + 1))
        images = jax.jit(
            lambda k: jax.random.randint(k, image_shape, 0, 256, jnp.int32).astype(jnp.uint8),
            out_shardings=image_sharding,
        )(keys[0])
        key = jax.device_put(keys[1], replicated)
        step = jax.device_put(jnp.int32(0), replicated)
        lr = jax.device_put(jnp.float32(LR), replicated)
        args = (params, opt_state, fixed, images, key, step, lr)
    else:

        def replicated_struct(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)

        args = (
            jax.tree.map(replicated_struct, packed_params),
            jax.tree.map(
                lambda leaf, spec: jax.ShapeDtypeStruct(
                    global_opt_shape(leaf, spec), leaf.dtype, sharding=NamedSharding(mesh, spec)
                ),
                local_opt,
                opt_specs,
            ),
            jax.tree.map(replicated_struct, abstract_fixed),
            jax.ShapeDtypeStruct(image_shape, jnp.uint8, sharding=image_sharding),
            replicated_struct(jax.eval_shape(lambda: jax.random.key(0))),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
            jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated),
        )

    def advance(args: tuple, outputs: tuple) -> tuple:
        params, opt_state, _metrics = outputs
        return (params, opt_state, *args[2:5], args[5] + np.int32(accum_iter), args[6])

    return StepBuild(fn, args, advance, config, global_batch)


def cost_flops(compiled) -> float | None:
    """FLOPs per device per call from XLA's cost analysis (a dict, or a list of one dict)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])
