"""Speed of the classifier's eval forward on CPU: mae_jax under jit against HF ViT in torch.

Run from the repository root: `python bench/bench_eval.py [--batch 32] [--preset vit_base_patch16]
[--reps 5] [--threads 2]`. A few minutes for ViT-B at batch 32 on 2 cores.

The same weights (a fresh cls-token ``vit_base_patch16`` classifier with a perturbed head, copied into
``ViTForImageClassification`` through convert.hf_reference) and the same 224px float32 images on
both sides: mae_jax's eval forward as ``mae-jax eval`` runs it (``classifier.make_eval_logits``:
jitted, and on CPU in slices of about 1,600 tokens) against torch (eval, inference_mode,
``--threads`` intra-op threads) with SDPA and with eager attention. For reference it also times
``model(imgs)`` jitted on the whole batch at once. Repetitions alternate between the candidates; it
prints max |logits difference| first, then median ms and images/s, and the headline ratio (faster
torch variant / mae_jax's eval forward, by medians and by fastest runs).
"""

from __future__ import annotations

import argparse
import sys

import _common
import numpy as np


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--preset", default="vit_base_patch16")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per candidate")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.reps < 1 or args.threads < 1:
        parser.error("--batch, --reps and --threads must be positive")
    return args


def hf_classifier(state_dict, config, attn: str):
    """HF ViTForImageClassification (eval) holding an official cls-token classifier's weights."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from convert.hf_reference import as_float32_tensor, load_official_into_hf

    hf = ViTForImageClassification(
        ViTConfig(
            hidden_size=config.embed_dim,
            num_hidden_layers=config.depth,
            num_attention_heads=config.num_heads,
            intermediate_size=int(config.embed_dim * config.mlp_ratio),
            image_size=config.img_size,
            patch_size=config.patch_size,
            num_channels=config.in_chans,
            num_labels=config.num_classes,
            layer_norm_eps=config.layer_norm_eps,
            hidden_act="gelu",  # exact erf, as the official Mlp
            qkv_bias=True,
            attn_implementation=attn,
        )
    )
    head = {k: state_dict[k] for k in ("head.weight", "head.bias")}
    load_official_into_hf(
        hf.vit,
        state_dict,
        what=f"benchmark weights vs HF ViT ({attn})",
        also_expected={k: v.shape for k, v in head.items()},
    )
    with torch.no_grad():
        hf.classifier.weight.copy_(as_float32_tensor(head["head.weight"]))
        hf.classifier.bias.copy_(as_float32_tensor(head["head.bias"]))
    return hf.eval()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    import mae_jax
    from convert.mapping import official_from_state
    from mae_jax.checkpoint import state_as_numpy
    from mae_jax.classifier import eval_slice_size, make_eval_logits

    torch.set_num_threads(args.threads)
    # HF's ViTForImageClassification pools the cls token, so the jax side does too (same weights,
    # comparable logits); the pooling is a negligible part of the cost either way.
    model = mae_jax.create_classifier(args.preset, rngs=nnx.Rngs(0), global_pool=False)
    model.head.kernel[...] = 0.02 * jax.random.normal(jax.random.key(1), model.head.kernel.shape)
    config = model.config
    state_dict = official_from_state(state_as_numpy(model))
    hf = {attn: hf_classifier(state_dict, config, attn) for attn in ("sdpa", "eager")}

    rng = np.random.default_rng(0)
    size = config.img_size
    imgs = rng.standard_normal((args.batch, size, size, config.in_chans), dtype=np.float32)
    imgs_jax = jnp.asarray(imgs)
    imgs_torch = torch.from_numpy(imgs.transpose(0, 3, 1, 2).copy())

    graphdef, state = nnx.split(model)
    eval_logits = make_eval_logits(model, args.batch)
    whole = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    slice_size = eval_slice_size(config, args.batch)

    def run_jax():
        return eval_logits(state, imgs_jax).block_until_ready()

    def run_jax_whole():
        return whole(state, imgs_jax).block_until_ready()

    def torch_runner(attn):
        def run():
            with torch.inference_mode():
                return hf[attn](pixel_values=imgs_torch).logits

        return run

    runs = {"jax (jit)": run_jax, "jax, no slices": run_jax_whole}
    runs |= {"torch sdpa": torch_runner("sdpa"), "torch eager": torch_runner("eager")}

    print(
        f"{args.preset} eval forward, batch {args.batch}, {size}px, float32; "
        f"jax in slices of {slice_size} images"
    )
    logits = np.asarray(run_jax())
    print(f"  max |logits whole batch - slices| = {np.abs(run_jax_whole() - logits).max():.2e}")
    for name in ("torch sdpa", "torch eager"):
        diff = np.abs(runs[name]().numpy() - logits).max()
        print(f"  max |logits {name} - jax| = {diff:.2e} (logits up to {np.abs(logits).max():.2f})")

    times = _common.interleaved_times(runs, reps=args.reps)
    for name, seconds in times.items():
        per_s = args.batch / (_common.median_ms(seconds) / 1e3)
        print(
            f"  {name:<14} median {_common.median_ms(seconds):8.0f} ms "
            f"(range {_common.spread(seconds)})  {per_s:7.1f} images/s"
        )
    jax_ms = _common.median_ms(times["jax (jit)"])
    best_torch = min(("torch sdpa", "torch eager"), key=lambda n: _common.median_ms(times[n]))
    ratio = _common.median_ms(times[best_torch]) / jax_ms
    fastest = min(min(times["torch sdpa"]), min(times["torch eager"])) / min(times["jax (jit)"])
    _common.print_summary(
        f"{args.preset}, batch {args.batch}, torch {args.threads} threads",
        [
            ("jax images/s", f"{args.batch / jax_ms * 1e3:.1f}", "median"),
            (
                f"{best_torch} images/s",
                f"{args.batch / _common.median_ms(times[best_torch]) * 1e3:.1f}",
                "median, the faster torch",
            ),
            ("speedup (medians)", f"{ratio:.2f}x", "target >= 2x"),
            ("speedup (fastest runs)", f"{fastest:.2f}x", "less sensitive to machine load"),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
