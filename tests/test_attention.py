"""attention=auto|cudnn|xla (mae_jax/model.py): which kernel computes attention.

auto: cuDNN's fused attention where the model is lowered for a CUDA GPU in bfloat16, XLA's
elsewhere; cudnn: that or a one-line error; xla: never cuDNN. Checked by lowering for ``cuda``
without a device (jax's cuDNN version query answered as a CUDA install would), by equal numbers
of auto and xla on CPU, and through the settings, the CLI, checkpoints and a resumed run. The
setting is no part of a model's state: checkpoints and parameter names are the same with each.
"""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import mae_jax
from mae_jax import cli, finetune, run_config, train
from mae_jax import model as model_lib
from mae_jax.checkpoint import METADATA_FILE, save_model
from mae_jax.run_settings import SettingsError, check_settings, compare_with_saved
from tests.test_train import _cfg, _image_folder, _losses
from tests.test_train_step import _canonical_stablehlo, cudnn_present  # noqa: F401

TINY, TINY_VIT = "mae_vit_tiny_patch4", "vit_tiny_patch4"  # 2 + 2 blocks; 2 blocks
CUDNN_CALL = re.compile(r"custom_call @__cudnn\$fmha")


def _images(config, n=2):
    shape = (n, config.img_size, config.img_size, config.in_chans)
    return jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)


def _cudnn_calls(model, platform: str) -> int:
    """cuDNN attention calls in the forward of ``model`` lowered for ``platform``."""
    imgs = jax.ShapeDtypeStruct(_images(model.config).shape, jnp.float32)
    if isinstance(model, mae_jax.MaskedAutoencoderViT):
        lowered = jax.jit(lambda m, x, k: m.forward_full(x, key=k).pred).trace(
            model, imgs, jax.random.key(0)
        )
    else:
        lowered = jax.jit(lambda m, x: m(x)).trace(model, imgs)
    text = _canonical_stablehlo(lowered.lower(lowering_platforms=(platform,)))
    return len(CUDNN_CALL.findall(text))


# ------------------------------------------------------------------ what each setting lowers to


@pytest.mark.parametrize(
    "attention, dtype, per_block",
    [
        ("auto", jnp.bfloat16, 1),
        ("cudnn", jnp.bfloat16, 1),
        ("xla", jnp.bfloat16, 0),
        ("auto", jnp.float32, 0),  # auto keeps float32 on XLA's path, as before the setting
    ],
    ids=["auto-bf16", "cudnn-bf16", "xla-bf16", "auto-f32"],
)
def test_forward_lowered_for_cuda(cudnn_present, attention, dtype, per_block):  # noqa: F811
    mae = mae_jax.create_model(TINY, dtype=dtype, attention=attention)
    assert _cudnn_calls(mae, "cuda") == 4 * per_block  # 2 encoder + 2 decoder blocks
    vit = mae_jax.create_classifier(TINY_VIT, dtype=dtype, attention=attention)
    assert _cudnn_calls(vit, "cuda") == 2 * per_block


def test_auto_stays_off_cudnn_for_tpu(cudnn_present):  # noqa: F811
    mae = mae_jax.create_model(TINY, dtype=jnp.bfloat16, attention="auto")
    assert _cudnn_calls(mae, "tpu") == 0


# ------------------------------------------------------------------ the numbers on CPU


def test_xla_attention_is_softmax_attention():
    """The XLA path against softmax(q k^T / sqrt(c)) v written in float64 NumPy (tolerance
    1e-5 relative, float32 compute)."""
    dim, heads, n, t = 64, 4, 2, 17
    attn = model_lib.Attention(dim, heads, jnp.float32, nnx.Rngs(0), "xla")
    x = np.random.default_rng(1).normal(size=(n, t, dim))
    out = np.asarray(jax.jit(lambda a, x: a(x))(attn, jnp.asarray(x, jnp.float32)))

    def dense(layer, v):
        return v @ np.asarray(layer.kernel[...], np.float64) + np.asarray(layer.bias[...])

    q, k, v = dense(attn.qkv, x).reshape(n, t, 3, heads, dim // heads).transpose(2, 0, 3, 1, 4)
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dim // heads)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    ref = dense(attn.proj, (weights @ v).transpose(0, 2, 1, 3).reshape(n, t, dim))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_auto_and_xla_give_the_same_numbers_and_state_on_cpu(dtype):
    """The MAE's loss, prediction and latent, and an attention layer's gradients, equal bit for
    bit; the states hold the same names and values (a checkpoint of one is one of the other)."""
    imgs = _images(mae_jax.get_config(TINY))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 17, 64)), jnp.float32)
    results = {}
    for attention in ("auto", "xla"):
        model = mae_jax.create_model(TINY, rngs=nnx.Rngs(3), dtype=dtype, attention=attention)
        out = jax.jit(lambda m: m.forward_full(imgs, key=jax.random.key(4)))(model)
        graphdef, state = nnx.split(model.blocks[0].attn)

        def attn_loss(state, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, state)(x.astype(dtype)).astype(jnp.float32) ** 2)

        grads = jax.jit(jax.grad(attn_loss))(state)
        results[attention] = (
            nnx.to_pure_dict(nnx.state(model)),
            (out.loss, out.pred, out.latent),
            nnx.to_pure_dict(grads),
        )
    for a, b in zip(results["auto"], results["xla"], strict=True):
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(u, np.float32), np.asarray(v, np.float32))


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "attention, dtype, platform, needle",
    [
        ("fast", jnp.bfloat16, None, "attention=fast: must be one of auto, cudnn, xla"),
        ("cudnn", jnp.bfloat16, "cpu", "needs a CUDA GPU, and jax runs on cpu here"),
        ("cudnn", jnp.bfloat16, "tpu", "needs a CUDA GPU, and jax runs on tpu here"),
        ("cudnn", jnp.float32, None, "needs bfloat16 or float16 compute, not float32"),
        ("cudnn", jnp.bfloat16, None, "not available here (this jax has no CUDA plugin"),
    ],
)
def test_check_attention_refuses_what_cannot_run(attention, dtype, platform, needle):
    with pytest.raises(model_lib.AttentionError, match=re.escape(needle)):
        model_lib.check_attention(attention, dtype, platform)
    if platform is None:  # the models check the same when they are built
        with pytest.raises(model_lib.AttentionError, match=re.escape(needle)):
            mae_jax.create_model(TINY, dtype=dtype, attention=attention)
        with pytest.raises(model_lib.AttentionError, match=re.escape(needle)):
            mae_jax.create_classifier(TINY_VIT, dtype=dtype, attention=attention)


def test_cudnn_is_accepted_where_it_can_run(cudnn_present):  # noqa: F811
    model_lib.check_attention("cudnn", jnp.bfloat16, "gpu")
    model_lib.check_attention("cudnn", jnp.float16)
    model = mae_jax.create_model(TINY, dtype=jnp.bfloat16, attention="cudnn")
    assert {b.attn.attention for b in [*model.blocks, *model.decoder_blocks]} == {"cudnn"}


@pytest.mark.parametrize("config_cls", [run_config.PretrainConfig, finetune.FinetuneConfig])
def test_settings_refuse_cudnn_on_cpu_and_unknown_kernels(config_cls):
    with pytest.raises(SettingsError, match=r"^--set attention=cudnn: .*jax runs on cpu here"):
        check_settings(config_cls(attention="cudnn"))
    with pytest.raises(SettingsError, match=r"^--set attention=fast: must be one of auto, cudnn"):
        check_settings(config_cls(attention="fast"))
    check_settings(config_cls(attention="xla"))


def test_eval_refuses_cudnn_on_cpu(tmp_path, capsys):
    """pretrain, finetune and linprobe: tests/test_faults.py, with the other settings."""
    for dtype in ("float32", "bfloat16"):
        argv = ["eval", "--data", tmp_path, "--checkpoint", tmp_path / "none", "--attention"]
        code = cli.main([str(a) for a in [*argv, "cudnn", "--dtype", dtype]])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(
            "mae-jax: error: --attention cudnn: cuDNN's fused attention needs a CUDA GPU, and "
            "jax runs on cpu here; use --attention auto or xla"
        ), err


# ------------------------------------------------------------------ checkpoints, runs, eval


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny MAE and a 5-class tiny classifier saved by models built with attention=xla."""
    root = tmp_path_factory.mktemp("attention")
    mae = mae_jax.create_model(TINY, rngs=nnx.Rngs(1), attention="xla")
    vit = mae_jax.create_classifier(TINY_VIT, rngs=nnx.Rngs(2), attention="xla")
    vit.head.kernel[...] = jax.random.normal(jax.random.key(6), vit.head.kernel.shape)
    return save_model(mae, root / "mae"), save_model(vit, root / "vit"), mae


def _kernels(model) -> set[str]:
    return {block.attn.attention for block in model.blocks}


def test_checkpoints_load_with_any_attention(saved):
    mae_path, _, mae = saved
    assert "attention" not in (mae_path / METADATA_FILE).read_text()
    want = nnx.to_pure_dict(nnx.state(mae))
    for attention in ("auto", "xla"):
        loaded = mae_jax.load_pretrained(mae_path, dtype=jnp.bfloat16, attention=attention)
        assert _kernels(loaded) == {attention} and loaded.attention == attention
        got = nnx.to_pure_dict(nnx.state(loaded))
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(model_lib.AttentionError, match="not float32"):
        mae_jax.load_pretrained(mae_path, attention="cudnn")


@pytest.mark.parametrize("mode", ["finetune", "linprobe"])
def test_finetuning_builds_its_classifier_with_the_setting(saved, mode):
    mae_path, vit_path, _ = saved
    # a classifier init pools as it was trained (globally), which linear probing does not
    for init in (None, mae_path) + ((vit_path,) if mode == "finetune" else ()):
        config = finetune.FinetuneConfig(
            mode=mode, preset=TINY_VIT, data="unused", init=init and str(init), attention="xla"
        ).resolved()
        model = finetune.build_model(config, 5, jnp.float32)
        vit = model.vit if mode == "linprobe" else model
        assert _kernels(vit) == {"xla"}


def test_eval_gives_the_same_accuracy_with_each_kernel(saved, tmp_path, capsys):
    _, vit_path, _ = saved
    for i, colour in enumerate(["red", "green", "blue", "white", "black"]):
        (tmp_path / f"c{i}").mkdir()
        Image.new("RGB", (40, 40), colour).save(tmp_path / f"c{i}" / "0.png")
    lines = []
    for attention in ("auto", "xla"):
        argv = ["eval", "--data", str(tmp_path), "--checkpoint", str(vit_path), "--quiet"]
        code = cli.main([*argv, "--dtype", "bfloat16", "--attention", attention])
        out = capsys.readouterr().out
        assert code == 0, out
        lines.append(next(line for line in out.splitlines() if line.startswith("* Acc@1")))
    assert lines[0] == lines[1]


def test_a_run_resumes_with_another_attention_and_from_an_older_config(tmp_path):
    """Two steps with xla, then the run's config.json as an older version wrote it (no
    attention key), then two more steps with xla: the change from the old default (auto) is
    free, and the losses are those of four uninterrupted steps with auto, bit for bit."""
    folder = _image_folder(tmp_path / "imgs", n=16)
    train.pretrain(_cfg(folder, max_steps=4), tmp_path / "straight", progress=False)
    run = tmp_path / "resumed"
    train.pretrain(_cfg(folder, max_steps=2, attention="xla"), run, progress=False)
    saved_settings = json.loads((run / "config.json").read_text())
    assert saved_settings.pop("attention") == "xla"
    (run / "config.json").write_text(json.dumps(saved_settings))
    summary = train.pretrain(_cfg(folder, max_steps=4, attention="xla"), run, progress=False)
    assert summary["start_step"] == 2
    assert _losses(run) == _losses(tmp_path / "straight")
    assert json.loads((run / "config.json").read_text())["attention"] == "xla"


def test_an_older_finetuning_config_resumes_with_another_attention(tmp_path):
    config = finetune.FinetuneConfig(preset=TINY_VIT, data="unused").resolved()
    old = config.to_dict()
    del old["attention"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    changed = dataclasses.replace(config, attention="xla")
    assert compare_with_saved(tmp_path, changed, finetune._model_dict) == [
        "attention: 'auto' -> 'xla'"
    ]
