"""The Python steps of bench/device_check.sh (run from the repository root).

    python bench/device_check.py checkpoint PRESET DIR a mae-jax checkpoint of random weights
    python bench/device_check.py precision [--preset P] a float32 model needs no precision context
    python bench/device_check.py attention [--presets base,large,huge] [--batch 8]
                                                        cuDNN attention against the XLA path

Each prints a few lines, the last one "ok" or "FAILED: why", and exits 0 or 1.
"""

from __future__ import annotations

import sys
import time

import _accel

# Attention shapes of every preset: (what, tokens, heads, head width) for the MAE encoder at mask
# ratio 0.75 (1 + kept), the MAE decoder (1 + all patches) and the fine-tuned classifier (1 + all).
CLASSIFIERS = {
    "tiny": "vit_tiny_patch4",
    "demo": None,
    "base": "vit_base_patch16",
    "large": "vit_large_patch16",
    "huge": "vit_huge_patch14",
}


def attention_shapes(size: str) -> list[tuple[str, int, int, int]]:
    from mae_jax.config import get_config, get_vit_config
    from mae_jax.masking import num_kept

    c = get_config(_accel.SIZES[size])
    shapes = [
        ("encoder", 1 + num_kept(c.num_patches, _accel.MASK_RATIO), c.num_heads, c.embed_dim),
        ("decoder", 1 + c.num_patches, c.decoder_num_heads, c.decoder_embed_dim),
    ]
    if CLASSIFIERS.get(size):
        v = get_vit_config(CLASSIFIERS[size])
        shapes.append(("classifier", 1 + v.num_patches, v.num_heads, v.embed_dim))
    return [(what, t, h, d // h) for what, t, h, d in shapes]


# --------------------------------------------------------------------------- checkpoint


def write_checkpoint(preset: str, path: str, seed: int = 0) -> None:
    """A mae-jax checkpoint of ``preset`` with random weights, biases and LayerNorm scales moved
    off their init (zeros and ones), so that a mapping mistake cannot hide."""
    import jax
    import numpy as np
    from flax import nnx

    import mae_jax
    from mae_jax.checkpoint import save_model

    model = mae_jax.create_model(preset, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed)

    def moved(path, x):
        if path[-1].key in ("bias", "scale"):
            return x + rng.normal(0, 0.02, x.shape).astype(np.float32)
        return x

    nnx.replace_by_pure_dict(
        state, jax.tree_util.tree_map_with_path(moved, nnx.to_pure_dict(state))
    )
    nnx.update(model, state)
    save_model(model, path)
    print(f"{path}: {preset}, {len(jax.tree.leaves(state))} parameters")


# --------------------------------------------------------------------------- precision


def check_precision(preset: str) -> bool:
    """A float32 model's forward, without any context, equals its forward under
    default_matmul_precision('highest') and under ('default'): the model asks for HIGHEST
    itself. Beside it, how far one DEFAULT float32 matmul is from HIGHEST on this device (TF32 on
    recent GPUs, one bfloat16 pass on TPU, nothing on CPU): what the model no longer does."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import mae_jax

    config = mae_jax.get_config(preset)
    model = mae_jax.create_model(preset, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    imgs = jnp.asarray(rng.standard_normal((2, config.img_size, config.img_size, 3)), jnp.float32)

    @jax.jit
    def pred(model, imgs):
        return model.forward_full(imgs, key=jax.random.key(0)).pred

    preds = {"none": pred(model, imgs)}
    for context in ("highest", "default"):
        with jax.default_matmul_precision(context):
            # a new function: the context is part of what jit traces
            preds[context] = jax.jit(lambda m, x: m.forward_full(x, key=jax.random.key(0)).pred)(
                model, imgs
            )
    diffs = {k: float(jnp.max(jnp.abs(v - preds["none"]))) for k, v in preds.items()}
    a = jnp.asarray(rng.standard_normal((1024, 1024)), jnp.float32)
    exact = jnp.matmul(a, a, precision=jax.lax.Precision.HIGHEST)
    fast = jnp.matmul(a, a, precision=jax.lax.Precision.DEFAULT)
    rel = float(jnp.max(jnp.abs(fast - exact)) / jnp.max(jnp.abs(exact)))
    print(
        f"{preset} float32 forward on {jax.devices()[0].device_kind}: prediction without context "
        f"vs highest context {diffs['highest']:.1e}, vs default context {diffs['default']:.1e} "
        "(both must be 0)"
    )
    print(f"one float32 1024x1024 matmul at DEFAULT vs HIGHEST here: {rel:.1e} relative")
    return diffs["highest"] == 0.0 and diffs["default"] == 0.0


# --------------------------------------------------------------------------- attention


def check_attention(sizes: list[str], batch: int) -> bool:
    """For every attention shape of ``sizes``, in bfloat16: the model's cuDNN path against its
    XLA path (forward, gradient of a fixed projection of the output with respect to qkv), and
    both finite. Without cuDNN (CPU, TPU) the XLA path is checked against jax's own reference
    attention instead."""
    import jax
    import jax.numpy as jnp

    from mae_jax import model as model_lib

    cudnn = jax.default_backend() == "gpu" and model_lib.cudnn_attention_available()
    if cudnn:
        other_name = "cuDNN"

        def other(qkv, scale):
            return model_lib._cudnn_attention(qkv, scale)
    else:
        other_name = "jax.nn.dot_product_attention(xla)"
        print(
            f"cuDNN attention: not available on {jax.default_backend()}; XLA path vs {other_name}"
        )

        def other(qkv, scale):
            n, t, _, h, c = qkv.shape
            q, k, v = (qkv[:, :, i] for i in range(3))
            out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
            return out.reshape(n, t, h * c)

    ok = True
    for size in sizes:
        for what, t, h, c in attention_shapes(size):
            scale = c**-0.5
            key_qkv, key_w = jax.random.split(jax.random.key(t * h + c))
            qkv = jax.random.normal(key_qkv, (batch, t, 3, h, c), jnp.float32).astype(jnp.bfloat16)
            weight = jax.random.normal(key_w, (batch, t, h * c), jnp.float32)

            def loss(qkv, attention, weight=weight, scale=scale):
                out = attention(qkv, scale).astype(jnp.float32)
                return (out * weight).sum(), out

            results = {}
            for name, attention in (("xla", model_lib._xla_attention), ("other", other)):
                grad_fn = jax.grad(lambda q, a=attention: loss(q, a), has_aux=True)
                grad, out = jax.jit(grad_fn)(qkv)
                results[name] = (out, grad.astype(jnp.float32))
            finite = all(bool(jnp.isfinite(x).all()) for pair in results.values() for x in pair)
            errors = []
            for i in range(2):
                ref, got = results["xla"][i], results["other"][i]
                errors.append(float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref))))
            # bfloat16 outputs: one rounding is 2^-8 = 3.9e-3 relative; the kernels sum in other
            # orders, and the gradient runs through the softmax's backward too.
            good = finite and errors[0] <= 2e-2 and errors[1] <= 5e-2
            ok &= good
            print(
                f"{size:<6} {what:<10} [{batch}, {t}, {h}x{c}]: {other_name} vs XLA forward "
                f"{errors[0]:.1e}, gradient {errors[1]:.1e} (max rel), finite {finite}: "
                f"{'ok' if good else 'OVER'}",
                flush=True,
            )
    return ok


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = _accel.OneLineParser(prog="device_check.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("checkpoint")
    p.add_argument("preset")
    p.add_argument("dir")
    p = sub.add_parser("precision")
    p.add_argument("--preset", default="mae_vit_base_patch16")
    p = sub.add_parser("attention")
    p.add_argument("--sizes", default="base,large,huge")
    p.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if args.what == "checkpoint":
        write_checkpoint(args.preset, args.dir)
        ok = True
    elif args.what == "precision":
        ok = check_precision(args.preset)
    else:
        ok = check_attention(_accel.parse_sizes(parser, args.sizes), args.batch)
    seconds = time.perf_counter() - start
    print(f"ok ({seconds:.0f} s)" if ok else f"FAILED ({seconds:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
