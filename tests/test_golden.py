"""The official code's own outputs (tests/golden, see its README), reproduced stage by stage.

The weights go through the whole user path: the official .pth -> pth_to_orbax -> load_pretrained.
Tolerance: 1e-5 max abs error on every float stage (float32 rounding is about 1e-6; a wrong GELU,
LayerNorm epsilon, patch order or position table shows up at 1e-4 or more); mask and ids_restore
exactly; loss within 1e-6 relative.
"""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import mae_jax
import mae_jax.checkpoint
from convert.pth_to_orbax import convert_pth

GOLDEN = Path(__file__).parent / "golden"
CASES = ["r0.75__np0", "r0.75__np1", "r0.9__np0", "r0.9__np1"]
ATOL = 1e-5
FLOAT_STAGES = [
    "patch_embed",
    "x_masked",
    "enc_in",
    "enc_blocks",
    "dec_embed",
    "dec_in",
    "dec_blocks",
    "dec_norm",
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    convert_pth(GOLDEN / "tiny_shared.pth", out / "full")
    convert_pth(GOLDEN / "tiny_shared_encoder_only.pth", out / "enc")
    convert_pth(GOLDEN / "tiny_shared_trainckpt.pth", out / "train")
    return out


@pytest.mark.parametrize("case", CASES)
def test_every_stage_matches_official(converted, case):
    g = np.load(GOLDEN / f"tiny_shared__{case}.npz")
    model = mae_jax.load_pretrained(str(converted / "full"))
    model.config = model.config.replace(norm_pix_loss=bool(g["norm_pix_loss"]))
    out = model.forward_full(
        jnp.asarray(g["x_nhwc"]),
        noise=jnp.asarray(g["noise"]),
        mask_ratio=float(g["mask_ratio"]),
        capture_stages=True,
    )
    for stage in FLOAT_STAGES:
        np.testing.assert_allclose(
            out.stages[stage], g[f"stage_{stage}"], rtol=0, atol=ATOL, err_msg=stage
        )
    np.testing.assert_allclose(out.latent, g["latent"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(out.pred, g["pred"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(
        mae_jax.unpatchify(out.pred, 4), g["pred_imgs"].transpose(0, 2, 3, 1), rtol=0, atol=ATOL
    )
    np.testing.assert_array_equal(out.mask, g["mask"])
    np.testing.assert_array_equal(out.ids_restore, g["ids_restore"])
    assert out.latent.shape[1] == 1 + int(g["len_keep"])
    np.testing.assert_allclose(float(out.loss), float(g["loss"]), rtol=1e-6)
    np.testing.assert_array_equal(mae_jax.patchify(jnp.asarray(g["x_nhwc"]), 4), g["target"])


@pytest.mark.parametrize("case", CASES)
def test_fast_path_matches_official(converted, case):
    """Without stage capture the encoder embeds only the kept patches (the fast path used in
    training and by ``model(...)``); it must give the official numbers as well."""
    g = np.load(GOLDEN / f"tiny_shared__{case}.npz")
    model = mae_jax.load_pretrained(str(converted / "full"))
    model.config = model.config.replace(norm_pix_loss=bool(g["norm_pix_loss"]))
    x, noise, ratio = jnp.asarray(g["x_nhwc"]), jnp.asarray(g["noise"]), float(g["mask_ratio"])
    loss, pred, mask = model(x, noise=noise, mask_ratio=ratio)
    latent = model.forward_encoder(x, mae_jax.masking_from_noise(noise, ratio))
    np.testing.assert_allclose(latent, g["latent"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(pred, g["pred"], rtol=0, atol=ATOL)
    np.testing.assert_array_equal(mask, g["mask"])
    np.testing.assert_allclose(float(loss), float(g["loss"]), rtol=1e-6)


def test_encoder_only_checkpoint(converted):
    g = np.load(GOLDEN / "tiny_shared__r0.75__np0.npz")
    model = mae_jax.load_pretrained(str(converted / "enc"))
    masks = mae_jax.masking_from_noise(jnp.asarray(g["noise"]), 0.75)
    np.testing.assert_allclose(
        model.forward_encoder(jnp.asarray(g["x_nhwc"]), masks), g["latent"], rtol=0, atol=ATOL
    )
    with pytest.raises(mae_jax.MissingDecoderError, match="no decoder weights"):
        model(jnp.asarray(g["x_nhwc"]), noise=jnp.asarray(g["noise"]))


def test_training_checkpoint_gives_the_same_weights(converted):
    a = mae_jax.checkpoint.state_as_numpy(mae_jax.load_pretrained(str(converted / "full")))
    b = mae_jax.checkpoint.state_as_numpy(mae_jax.load_pretrained(str(converted / "train")))
    import jax

    assert all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
