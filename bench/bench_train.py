"""Speed and memory of one MAE pretraining step on CPU: mae_jax's pmapped train step against the same
recipe in PyTorch (Hugging Face ViTMAEForPreTraining + torch.optim.AdamW).

Run from the repository root: `python bench/bench_train.py [--preset mae_vit_base_patch16]
[--batch 8] [--reps 5] [--dtype float32|bfloat16] [--threads 2] [--skip-memory] [--breakdown]`. Four to six minutes for ViT-B at batch 8 on 2 idle cores (longer on a loaded
machine).

One step is forward + backward + AdamW update (betas 0.9/0.95, weight decay 0.05 on every tensor
with more than one dimension that is not a bias), mask ratio 0.75, norm_pix_loss on.

1. Sanity check: the loss and gradient norm of the first batch, same weights, images and masking
   noise on both sides (mae_jax through ``pretrain_step.loss_and_grads``, HF through ``noise=``).
2. Time per step, repetitions alternating between mae_jax (``make_p_train_step`` on the single
   local device: the real training step, images passed as host NumPy as the training loop does)
   and torch with SDPA and with eager attention. ``--breakdown`` also times forward, forward +
   backward and the optimizer update alone on each side.
3. Peak memory of the step (``--skip-memory`` leaves it out): each side in its own subprocess,
   VmHWM from /proc/self/status, reset through /proc/self/clear_refs after compilation and the
   first steps, so the figure is the steady-state step's own high-water mark.
4. The data pipeline beside it: images/s of ``mae_jax.data.pretrain_batches`` on synthetic JPEGs.

Before any torch model is built, the JAX step is also timed alone: in a process that runs torch
steps too, the JAX step is slower and more variable (the cause is not identified; see the README).

--dtype bfloat16 changes the JAX compute dtype only (parameters and optimizer state stay float32);
torch always runs float32.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

import _common
import numpy as np

MASK_RATIO = 0.75
BLR = 1.5e-4  # the official base lr; lr = blr * batch / 256 (the value does not change the timing)
WEIGHT_DECAY = 0.05
BETAS = (0.9, 0.95)
TORCH_ATTNS = ("sdpa", "eager")
MEMORY_STEPS = 3  # steps inside the measured high-water-mark window
MEMORY_TAG = "MEMORY "
PIPELINE_IMAGES = 200
PIPELINE_BATCHES = 20  # timed batches, after the first


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mae_vit_base_patch16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5, help="timed steps per candidate (>= 5)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--skip-memory", action="store_true", help="no peak-memory subprocesses")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time forward, forward+backward and the optimizer update alone",
    )
    # Internal: run one side's memory measurement and print it as a JSON line.
    parser.add_argument(
        "--memory-child",
        choices=("jax", *(f"torch-{a}" for a in TORCH_ATTNS)),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args(argv)
    if args.batch < 1 or args.reps < 1 or args.threads < 1:
        parser.error("--batch, --reps and --threads must be positive")
    return args


# --------------------------------------------------------------------------- the two recipes


def jax_setup(config, dtype_name: str, lr: float, seed: int = 0):
    """(model, graphdef, params, fixed, tx, opt_state) of a fresh mae_jax model and its AdamW."""
    import jax.numpy as jnp
    from flax import nnx

    import mae_jax
    from mae_jax import optim, pretrain_step

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
    model = mae_jax.create_model(config, rngs=nnx.Rngs(seed), dtype=dtype)
    graphdef, params, fixed = pretrain_step.split_model(model)
    # The step takes the lr as an argument (JaxTrainer passes it), as train.pretrain does.
    tx = optim.pretrain_direction(weight_decay=WEIGHT_DECAY, b1=BETAS[0], b2=BETAS[1])
    return model, graphdef, params, fixed, tx, tx.init(params)


class JaxTrainer:
    """The real ``make_p_train_step`` over the local device(s), state threaded from step to step."""

    def __init__(self, graphdef, params, fixed, num_patches: int, lr: float, seed: int = 0):
        import jax
        from flax import nnx

        from mae_jax import pretrain_step, replication

        # Parameters and AdamW state laid out as train.pretrain lays them out on this platform.
        params = nnx.to_pure_dict(params)
        packing, tx = pretrain_step.pretrain_optimizer(
            params,
            packed=pretrain_step.packs_state(),
            weight_decay=WEIGHT_DECAY,
            b1=BETAS[0],
            b2=BETAS[1],
        )
        packed = packing.pack(params)
        self.n_dev = jax.local_device_count()
        self.params = replication.replicate(packed, self.n_dev)
        self.opt_state = replication.replicate(tx.init(packed), self.n_dev)
        self.fixed = replication.replicate(fixed, self.n_dev)
        self.p_step = pretrain_step.make_p_train_step(
            graphdef, tx, MASK_RATIO, num_patches, packing=packing
        )
        self.key = jax.random.key(seed)
        self.lr = np.float32(lr)
        self.step_count = 0

    def _args(self, imgs_NxHxWxC: np.ndarray) -> tuple:
        from mae_jax import replication

        # [devices, 1 micro-batch, b, H, W, C]; float images are taken as normalised already.
        batch = replication.shard_batch(imgs_NxHxWxC, self.n_dev)[:, None]
        step = np.int32(self.step_count)
        return self.params, self.opt_state, self.fixed, batch, self.key, step, self.lr

    def compile(self, imgs_NxHxWxC: np.ndarray) -> dict[str, float]:
        """Compile the step ahead of time (later steps use it); XLA's memory plan in MiB."""
        compiled = self.p_step.lower(*self._args(imgs_NxHxWxC)).compile()
        self.p_step = compiled
        plan = compiled.memory_analysis()
        return {
            "xla_arguments": plan.argument_size_in_bytes / 2**20,
            "xla_aliased": plan.alias_size_in_bytes / 2**20,
            "xla_temp": plan.temp_size_in_bytes / 2**20,
        }

    def step(self, imgs_NxHxWxC: np.ndarray) -> dict:
        """One blocking train step on a host batch; returns the metrics of device 0."""
        import jax

        params, opt_state, metrics = self.p_step(*self._args(imgs_NxHxWxC))
        jax.block_until_ready((params, opt_state, metrics))
        self.params, self.opt_state = params, opt_state
        self.step_count += 1
        return {k: float(v[0]) for k, v in metrics.items()}


def torch_param_groups(model) -> tuple[list, list]:
    """(decay, no_decay) trainable tensors: the official rule, no decay for 1-D and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return decay, no_decay


def torch_adamw(model, lr: float):
    import torch

    decay, no_decay = torch_param_groups(model)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=BETAS,
    )


def torch_step(model, optimizer, imgs_NxCxHxW) -> float:
    """One train step as the official loop does it (HF draws its own masking noise)."""
    optimizer.zero_grad(set_to_none=True)
    loss = model(pixel_values=imgs_NxCxHxW).loss
    loss.backward()
    optimizer.step()
    return loss.item()


def hf_model(config, attn: str, state_dict=None):
    """HF ViTMAEForPreTraining in train mode, on ``state_dict`` (official layout) or HF's own init."""
    from transformers import ViTMAEForPreTraining

    from convert.hf_reference import vitmae_config

    if state_dict is not None:
        model = _common.hf_pretraining_model(state_dict, config, attn=attn, mask_ratio=MASK_RATIO)
    else:
        model = ViTMAEForPreTraining(
            vitmae_config(config, mask_ratio=MASK_RATIO, norm_pix_loss=True, attn=attn)
        )
    return model.train()  # dropout probabilities are 0, so train() changes nothing numerically


def images(config, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, H, W, C] float32, masking noise [N, L] float32), normal and uniform."""
    rng = np.random.default_rng(seed)
    shape = (batch, config.img_size, config.img_size, config.in_chans)
    return rng.standard_normal(shape, dtype=np.float32), rng.random(
        (batch, config.num_patches), dtype=np.float32
    )


def nchw(imgs_NxHxWxC: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(imgs_NxHxWxC.transpose(0, 3, 1, 2)))


# --------------------------------------------------------------------------- memory (subprocess)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and RSS would count it)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(args: argparse.Namespace) -> int:
    """Measure one side's peak RSS around steady-state train steps; print one JSON line."""
    import mae_jax

    config = mae_jax.get_config(args.preset, norm_pix_loss=True)
    lr = BLR * args.batch / 256
    imgs, _ = images(config, args.batch)
    mib = 1 / 1024
    report = {"after_imports": _proc_status_kib("VmRSS") * mib}
    if args.memory_child == "jax":
        import jax

        model, graphdef, params, fixed, tx, opt_state = jax_setup(config, args.dtype, lr)
        trainer = JaxTrainer(graphdef, params, fixed, config.num_patches, lr)
        # train.pretrain() keeps its unreplicated params and opt_state alive through the loop;
        # the step itself does not need them.
        host_bytes = sum(x.nbytes for x in jax.tree.leaves((params, fixed, opt_state)))
        report["host_copies"] = host_bytes / 2**20
        del model, params, fixed, opt_state
        gc.collect()
        report["setup"] = _proc_status_kib("VmRSS") * mib
        report.update(trainer.compile(imgs))
        run = functools.partial(trainer.step, imgs)
        stats = jax.devices()[0].memory_stats()
    else:
        import torch

        torch.set_num_threads(args.threads)
        model = hf_model(config, args.memory_child.removeprefix("torch-"))
        optimizer = torch_adamw(model, lr)
        imgs_t = nchw(imgs)
        report["setup"] = _proc_status_kib("VmRSS") * mib
        run = functools.partial(torch_step, model, optimizer, imgs_t)
        stats = None
    for _ in range(2):  # compile / allocate the optimizer state
        run()
    report["peak_including_setup"] = _proc_status_kib("VmHWM") * mib
    report["between_steps"] = _proc_status_kib("VmRSS") * mib
    gc.collect()
    _trim_heap()
    report["between_steps_trimmed"] = _proc_status_kib("VmRSS") * mib
    report["reset_ok"] = _reset_peak_rss()
    for _ in range(MEMORY_STEPS):
        run()
    report["peak_step"] = _proc_status_kib("VmHWM") * mib
    report["device_memory_stats"] = stats
    print(MEMORY_TAG + json.dumps(report), flush=True)
    return 0


def measure_memory(args: argparse.Namespace, side: str) -> dict:
    """Run ``memory_child`` for ``side`` in a fresh interpreter and parse its report."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-child",
        side,
        "--preset",
        args.preset,
        "--batch",
        str(args.batch),
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(MEMORY_TAG)]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1][len(MEMORY_TAG) :])


# --------------------------------------------------------------------------- data pipeline


def pipeline_images_per_s(batch: int, img_size: int, read_threads: int = 16) -> float:
    """Images/s of ``pretrain_batches`` over synthetic 500x375 JPEGs, after its first batch."""
    from bench_data import write_synthetic_jpegs

    from mae_jax import data

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_jpegs(tmp, max(PIPELINE_IMAGES, 2 * batch), 500, 375)
        folder = data.ImageFolder(tmp)
        with data.pretrain_batches(
            folder, batch_size=batch, img_size=img_size, seed=0, read_threads=read_threads
        ) as loader:
            next(loader)  # threads start and fill their buffer
            start = time.perf_counter()
            for _ in range(PIPELINE_BATCHES):
                next(loader)
            elapsed = time.perf_counter() - start
        # Threads still decoding when the loader closes would log the deleted temporary files.
        logging.getLogger(data.__name__).setLevel(logging.ERROR)
    return PIPELINE_BATCHES * batch / elapsed


# --------------------------------------------------------------------------- phases (--breakdown)


def breakdown_runs(
    graphdef, params, fixed, tx, opt_state, torch_models, torch_opts, imgs, noise
) -> dict:
    """Zero-argument blocking calls for forward, forward+backward and the update, both sides."""
    import jax
    import optax
    import torch
    from flax import nnx

    from mae_jax import pretrain_step

    imgs_j, noise_j = jax.numpy.asarray(imgs), jax.numpy.asarray(noise)

    @jax.jit
    def forward(params, fixed, imgs, noise):
        return nnx.merge(graphdef, params, fixed)(imgs, noise=noise, mask_ratio=MASK_RATIO)[0]

    grads_fn = jax.jit(
        functools.partial(pretrain_step.loss_and_grads, graphdef, mask_ratio=MASK_RATIO)
    )

    @jax.jit
    def update(grads, opt_state, params):  # not donating: one extra copy of params and state
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    _, grads = grads_fn(params, fixed, imgs_j, noise_j)
    runs = {
        "jax forward": lambda: jax.block_until_ready(forward(params, fixed, imgs_j, noise_j)),
        "jax fwd+bwd": lambda: jax.block_until_ready(grads_fn(params, fixed, imgs_j, noise_j)),
        "jax update": lambda: jax.block_until_ready(update(grads, opt_state, params)),
    }
    imgs_t, noise_t = nchw(imgs), torch.from_numpy(noise)
    for attn, model in torch_models.items():

        def fwd(model=model):
            model(pixel_values=imgs_t, noise=noise_t).loss.item()

        def fwd_bwd(model=model, opt=torch_opts[attn]):
            opt.zero_grad(set_to_none=True)
            model(pixel_values=imgs_t, noise=noise_t).loss.backward()

        runs[f"torch {attn} forward"] = fwd
        runs[f"torch {attn} fwd+bwd"] = fwd_bwd
        runs[f"torch {attn} update"] = torch_opts[attn].step  # grads from the last fwd+bwd
    return runs


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        return memory_child(args)

    import jax
    import optax
    import torch

    import mae_jax
    from convert.mapping import official_from_state
    from mae_jax import optim, pretrain_step
    from mae_jax.checkpoint import state_as_numpy

    torch.set_num_threads(args.threads)
    try:
        config = mae_jax.get_config(args.preset, norm_pix_loss=True)
    except ValueError as err:
        print(f"bench_train.py: {err}", file=sys.stderr)
        return 2
    lr = BLR * args.batch / 256
    print(f"machine: {_common.machine_line()}")
    print(
        f"model {args.preset}, batch {args.batch}, {config.img_size}x{config.img_size}, "
        f"jax {args.dtype} / torch float32, mask ratio {MASK_RATIO}, norm_pix_loss, AdamW "
        f"betas {BETAS} wd {WEIGHT_DECAY}, lr {lr:.2e}, {args.reps} reps each"
    )

    # ---------------------------------------------------------------- same weights on both sides
    model, graphdef, params, fixed, tx, opt_state = jax_setup(config, args.dtype, lr)
    imgs, noise = images(config, args.batch)

    # ---------------------------------------------------------------- 0. the JAX step alone
    # Timed before any torch model exists: in a process that also runs torch steps the JAX step
    # is slower and far more variable (see the README), so this is what a JAX-only training
    # process sees. The trainer works on its own replicated copies of the state.
    alone = JaxTrainer(graphdef, params, fixed, config.num_patches, lr)
    alone.step(imgs)  # compiles
    alone_times = _common.interleaved_times(
        {"jax alone": functools.partial(alone.step, imgs)}, reps=args.reps
    )["jax alone"]
    del alone
    gc.collect()
    print(
        f"  jax step alone (no torch in the process yet): median "
        f"{_common.median_ms(alone_times):.1f} ms  (range {_common.spread(alone_times)} ms)"
    )

    state_dict = official_from_state(state_as_numpy(model))
    torch_models = {attn: hf_model(config, attn, state_dict) for attn in TORCH_ATTNS}
    torch_opts = {attn: torch_adamw(m, lr) for attn, m in torch_models.items()}
    imgs_t = nchw(imgs)

    decay_mask = optim.pretrain_decay_mask(params)
    jax_decayed = sum(
        int(np.size(p))
        for p, d in zip(jax.tree.leaves(params), jax.tree.leaves(decay_mask), strict=True)
        if d
    )
    torch_decayed = sum(p.numel() for p in torch_param_groups(torch_models["sdpa"])[0])
    jax_total = sum(int(np.size(p)) for p in jax.tree.leaves(params))
    torch_total = sum(p.numel() for p in torch_models["sdpa"].parameters() if p.requires_grad)
    print(
        f"  trainable parameters: jax {jax_total:,} / torch {torch_total:,}; with weight decay: "
        f"jax {jax_decayed:,} / torch {torch_decayed:,}"
    )

    # ---------------------------------------------------------------- 1. sanity check
    sanity_fn = jax.jit(
        functools.partial(pretrain_step.loss_and_grads, graphdef, mask_ratio=MASK_RATIO)
    )
    loss_j, grads_j = sanity_fn(params, fixed, jax.numpy.asarray(imgs), jax.numpy.asarray(noise))
    loss_j, norm_j = float(loss_j), float(optax.tree.norm(grads_j))
    del grads_j
    sanity = {}
    for attn, m in torch_models.items():
        out = m(pixel_values=imgs_t, noise=torch.from_numpy(noise))
        out.loss.backward()
        norm_t = float(
            torch.sqrt(
                sum((p.grad.double() ** 2).sum() for p in m.parameters() if p.grad is not None)
            )
        )
        torch_opts[attn].zero_grad(set_to_none=True)
        sanity[attn] = (out.loss.item(), norm_t)
        print(
            f"  first-batch loss: jax {loss_j:.7f}, torch {attn} {sanity[attn][0]:.7f} "
            f"(|diff| {abs(loss_j - sanity[attn][0]):.1e}); grad norm jax {norm_j:.6f}, "
            f"torch {norm_t:.6f} (rel diff {abs(norm_j - norm_t) / norm_t:.1e})"
        )

    # ---------------------------------------------------------------- 2. time per step
    trainer = JaxTrainer(graphdef, params, fixed, config.num_patches, lr)
    start = time.perf_counter()
    first_metrics = trainer.step(imgs)
    compile_s = time.perf_counter() - start
    print(
        f"  jax first step (compiles) {compile_s:.1f} s on {trainer.n_dev} device(s), "
        f"loss {first_metrics['loss']:.7f}"
    )
    candidates = {"jax": functools.partial(trainer.step, imgs)}
    for attn in TORCH_ATTNS:
        candidates[f"torch {attn}"] = functools.partial(
            torch_step, torch_models[attn], torch_opts[attn], imgs_t
        )
    step_times = _common.interleaved_times(candidates, reps=args.reps, warmup=1)
    step_ms = {name: _common.median_ms(t) for name, t in step_times.items()}
    for name, t in step_times.items():
        print(
            f"  {name:<12} median {step_ms[name]:8.1f} ms/step  {1e3 * args.batch / step_ms[name]:6.2f}"
            f" images/s  (range {_common.spread(t)} ms)"
        )

    phase_ms = {}
    if args.breakdown:
        # Device 0's copies stay on the device (unreplicate would make host NumPy arrays, and
        # every call would then pay a host-to-device transfer).
        dev0 = [
            jax.tree.map(lambda x: x[0], t)
            for t in (trainer.params, trainer.fixed, trainer.opt_state)
        ]
        runs = breakdown_runs(
            graphdef, *dev0[:2], tx, dev0[2], torch_models, torch_opts, imgs, noise
        )
        del dev0
        phase_times = _common.interleaved_times(runs, reps=args.reps, warmup=1)
        phase_ms = {name: _common.median_ms(t) for name, t in phase_times.items()}
        for name, t in phase_times.items():
            print(f"  {name:<22} median {phase_ms[name]:8.1f} ms  (range {_common.spread(t)} ms)")

    # The big models leave before the memory subprocesses and the data pipeline start.
    del model, params, opt_state, trainer, torch_models, torch_opts, candidates
    gc.collect()

    # ---------------------------------------------------------------- 3. memory
    memory = {}
    if not args.skip_memory:
        for side in ("jax", *(f"torch-{a}" for a in TORCH_ATTNS)):
            memory[side] = measure_memory(args, side)
            print(f"  memory {side}: {json.dumps(memory[side])}")

    # ---------------------------------------------------------------- 4. data pipeline
    pipeline = pipeline_images_per_s(args.batch, config.img_size)
    print(f"  data pipeline: {pipeline:.1f} images/s (batch {args.batch}, 16 read threads)")

    # ---------------------------------------------------------------- summary
    jax_ms = step_ms["jax"]
    best = min((f"torch {a}" for a in TORCH_ATTNS), key=step_ms.__getitem__)
    rows = [
        (
            "train step, jax (pmap, 1 device)",
            f"{jax_ms:.0f} ms",
            f"{1e3 * args.batch / jax_ms:.2f} img/s",
        )
    ]
    for attn in TORCH_ATTNS:
        ms = step_ms[f"torch {attn}"]
        rows.append(
            (
                f"train step, torch {attn}",
                f"{ms:.0f} ms",
                f"{1e3 * args.batch / ms:.2f} img/s; / jax {ms / jax_ms:.2f}x",
            )
        )
    fastest_torch = min(min(step_times[f"torch {a}"]) for a in TORCH_ATTNS)
    alone_ms = _common.median_ms(alone_times)
    rows += [
        (f"HEADLINE {best} / jax", f"{step_ms[best] / jax_ms:.2f}x", "target >= 2x"),
        (
            "train step, jax alone in its process",
            f"{alone_ms:.0f} ms",
            f"{best} / this {step_ms[best] / alone_ms:.2f}x",
        ),
    ]
    rows += [
        (
            "fastest torch rep / fastest jax rep",
            f"{fastest_torch / min(step_times['jax']):.2f}x",
            f"{1e3 * fastest_torch:.0f} / {1e3 * min(step_times['jax']):.0f} ms",
        ),
        (
            "first-batch |loss diff| sdpa / eager",
            f"{abs(loss_j - sanity['sdpa'][0]):.1e} / {abs(loss_j - sanity['eager'][0]):.1e}",
            f"loss {loss_j:.6f}",
        ),
        (
            "grad norm rel diff sdpa / eager",
            " / ".join(f"{abs(norm_j - sanity[a][1]) / sanity[a][1]:.1e}" for a in TORCH_ATTNS),
            f"norm {norm_j:.5f}",
        ),
    ]
    if phase_ms:
        for side in ("jax", *(f"torch {a}" for a in TORCH_ATTNS)):
            fwd, fb, upd = (phase_ms[f"{side} {p}"] for p in ("forward", "fwd+bwd", "update"))
            rows.append(
                (
                    f"{side}: fwd / bwd / update",
                    f"{fwd:.0f}/{fb - fwd:.0f}/{upd:.0f} ms",
                    f"fwd+bwd {fb:.0f} ms",
                )
            )
    for side, rep in memory.items():
        if "error" in rep:
            rows.append((f"peak RSS in step, {side}", "failed", rep["error"][:60]))
            continue
        base = rep["between_steps_trimmed"]
        note = (
            f"between steps {base:.0f} (+{rep['peak_step'] - base:.0f} in the step); "
            f"peak with setup and compile {rep['peak_including_setup']:.0f}"
        )
        if not rep["reset_ok"]:
            note += " (VmHWM reset refused: peak includes setup)"
        rows.append((f"peak RSS in step, {side}", f"{rep['peak_step']:.0f} MiB", note))
        if side == "jax":
            rows.append(
                (
                    "  jax: XLA plan args / temp",
                    f"{rep['xla_arguments']:.0f}/{rep['xla_temp']:.0f} MiB",
                    f"aliased {rep['xla_aliased']:.0f}; memory_stats() "
                    f"{rep['device_memory_stats']}; pretrain() also holds host copies "
                    f"of {rep['host_copies']:.0f}",
                )
            )
    rows += [
        ("data pipeline (pretrain_batches)", f"{pipeline:.0f} img/s", "synthetic 500x375 JPEGs"),
        ("pipeline / jax train step", f"{pipeline * jax_ms / (1e3 * args.batch):.1f}x", ""),
    ]
    print()
    print(
        f"summary ({args.preset}, batch {args.batch}, jax {args.dtype}, median of {args.reps} steps, "
        f"torch threads {args.threads})"
    )
    for label, value, note in rows:
        print(f"  {label:<36} {value:>16}  {note}")
    print(f"  machine: {_common.machine_line()}")
    print(f"  {_common.calibration_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
