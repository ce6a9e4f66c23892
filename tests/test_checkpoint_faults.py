"""A run's checkpoints under faults: damaged steps are skipped for the newest one that verifies,
failed saves are one line and leave nothing waiting (Checkpoints used directly, no training)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
from pathlib import Path

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import mae_jax
from mae_jax import cli, multihost, pretrain_step
from mae_jax.run_checkpoints import CheckpointRestoreError, Checkpoints, CheckpointSaveError


class _Loader:
    """What resume needs of a data loader."""

    state = None

    def set_state(self, state):
        self.state = state


@pytest.fixture(scope="module")
def template():
    """The tiny preset's (states, opt_state) as shapes: the tests fill in the values."""
    model = nnx.eval_shape(lambda: mae_jax.create_model("mae_vit_tiny_patch4", rngs=nnx.Rngs(0)))
    _, params, fixed = pretrain_step.split_model(model)
    return {"params": params, "fixed": fixed}, jax.eval_shape(optax.adamw(1e-3).init, params)


def _state(template, seed):
    """A distinct host state per seed, (states, opt_state), every float32 random bits: such
    bytes do not compress, so Orbax's data files hold them as they are, where a test finds them."""
    rng = np.random.default_rng(seed)

    def random_bits(x):
        if x.dtype != np.float32:
            return np.zeros(x.shape, x.dtype)
        return rng.integers(0, 2**32, size=x.shape, dtype=np.uint32).view(np.float32)

    return _map_host(template, random_bits)


def _map_host(template, fn):
    """(states, opt_state) with ``fn`` applied to every array of ``template``'s (copies)."""
    states, opt_state = template
    mapped = {}
    for name, state in states.items():
        copy = jax.tree.map(lambda x: x, state)
        nnx.replace_by_pure_dict(copy, jax.tree.map(fn, nnx.to_pure_dict(state)))
        mapped[name] = copy
    return mapped, jax.tree.map(fn, opt_state)


def _blank(template):
    """Templates to restore into, holding none of the saved values."""
    return _map_host(template, lambda x: np.zeros(x.shape, x.dtype))


def _bytes(states, opt_state) -> list[bytes]:
    trees = [nnx.to_pure_dict(v) for _, v in sorted(states.items())] + [opt_state]
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(trees)]


def _saved_run(workdir, template, steps=(1, 2), keep=5):
    """A run with a checkpoint at each of ``steps``: {step: bytes of its arrays}."""
    ckpts = Checkpoints(workdir, keep=keep)
    written = {}
    for step in steps:
        states, opt_state = _state(template, step)
        meta = {"step": step, **Checkpoints.position({"epoch": 0, "step": step})}
        ckpts.save(step, states, opt_state, meta)
        written[step] = _bytes(states, opt_state)
    ckpts.close()
    return written


def _resume(workdir, template, **kw):
    ckpts = Checkpoints(workdir, keep=5)
    loader = _Loader()
    try:
        states, opt_state, meta = ckpts.resume(*_blank(template), loader, **kw)
    finally:
        ckpts.close()
    assert loader.state == {"epoch": 0, "step": meta["step"]}
    return meta["step"], _bytes(states, opt_state)


def _one_line(text: str) -> str:
    assert text.count("\n") == 1 and text.endswith("\n"), text
    return text.strip()


# ------------------------------------------------------------------ damage done to step 2


def _data_files(step_dir: Path) -> list[Path]:
    return sorted(step_dir.glob("model/ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)


def _truncate_data(step_dir, written):
    data = _data_files(step_dir)[-1]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _delete_model(step_dir, written):
    shutil.rmtree(step_dir / "model")


def _truncate_metadata(step_dir, written):
    metadata = step_dir / "model" / "_METADATA"
    metadata.write_bytes(metadata.read_bytes()[: metadata.stat().st_size // 2])


def _flip_a_byte(step_dir, written):
    """Flip one byte in the middle of the largest array's bytes where they lie in a data file
    (found by content, so the byte is array data, not padding or an index)."""
    largest = max(written, key=len)
    window = largest[len(largest) // 2 : len(largest) // 2 + 32]
    for data in _data_files(step_dir):
        raw = bytearray(data.read_bytes())
        at = raw.find(window)
        if at >= 0:
            raw[at + 16] ^= 0xFF
            data.write_bytes(bytes(raw))
            return
    raise AssertionError("the array's bytes are not stored as they are")


DAMAGE = {
    "truncated data file": (_truncate_data, "model/ does not restore (OUT_OF_RANGE: "),
    "model/ deleted": (_delete_model, "incomplete: no model/"),
    "truncated metadata": (_truncate_metadata, "model/ does not restore (a metadata file is "),
    "flipped byte": (_flip_a_byte, "corrupt: model ["),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latest_step_is_skipped_for_the_one_before(damage, template, tmp_path, capsys):
    written = _saved_run(tmp_path, template)
    step_dir = tmp_path / "checkpoints" / "2"
    spoil, reason = DAMAGE[damage]
    spoil(step_dir, written[2])
    capsys.readouterr()

    # Tools that load a run's model read the newest good step too, and change nothing.
    ckpts = Checkpoints(tmp_path, keep=5)
    blank_states, _ = _blank(template)
    step, states, _, _ = ckpts.restore_latest(blank_states)
    ckpts.close()
    model_bytes = _bytes(states, [])
    assert (step, model_bytes) == (1, written[1][: len(model_bytes)])
    note = _one_line(capsys.readouterr().err)
    assert note.startswith(f"mae-jax: {step_dir}: skipped: {reason}"), note
    assert step_dir.is_dir()

    assert _resume(tmp_path, template) == (1, written[1])
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith(f"mae-jax: {step_dir}: skipped: {reason}"), lines
    # The run writes step 2 again: the damaged step is out of the way, kept unless half-deleted.
    if damage == "model/ deleted":
        assert lines[1] == f"mae-jax: {step_dir}: removed (half-deleted: items missing)"
    else:
        assert lines[1] == f"mae-jax: {step_dir}: moved aside to {step_dir}.unusable"
    assert len(lines) == 2
    assert not step_dir.exists()
    _saved_run(tmp_path, template, steps=(2,))
    assert _resume(tmp_path, template) == (2, written[2])


def test_a_half_deleted_old_step_is_ignored_and_removed(template, tmp_path, capsys):
    written = _saved_run(tmp_path, template, steps=(1, 2, 3))
    old = tmp_path / "checkpoints" / "1"
    _delete_model(old, None)  # a kill while Orbax deleted it: commit marker, no model/
    assert (old / "commit_success.txt").exists()
    capsys.readouterr()
    assert _resume(tmp_path, template) == (3, written[3])
    assert not old.exists()
    note = _one_line(capsys.readouterr().err)
    assert note == f"mae-jax: {old}: removed (half-deleted: items missing)"


def test_restore_step_picks_an_older_step_and_refuses_a_missing_one(template, tmp_path, capsys):
    written = _saved_run(tmp_path, template, steps=(1, 2, 3))
    assert _resume(tmp_path, template, restore_step=2) == (2, written[2])
    assert (tmp_path / "checkpoints" / "3").is_dir()  # left to the caller (discard_after)
    with pytest.raises(CheckpointRestoreError) as refused:
        _resume(tmp_path, template, restore_step=7)
    assert str(refused.value) == (
        f"{tmp_path / 'checkpoints'}: there is no checkpoint of step 7 (steps there: 1, 2, 3)"
    )
    _flip_a_byte(tmp_path / "checkpoints" / "2", written[2])
    with pytest.raises(CheckpointRestoreError) as refused:
        _resume(tmp_path, template, restore_step=2)
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'checkpoints' / '2'}: corrupt: model [")
    assert message.endswith("(steps there: 1, 2, 3)") and "\n" not in message

    ckpts = Checkpoints(tmp_path, keep=5)
    ckpts.discard_after(1)
    assert ckpts.manager.all_steps() == [1]
    ckpts.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    capsys.readouterr()


def test_no_step_that_verifies_is_one_line(template, tmp_path, capsys):
    written = _saved_run(tmp_path, template)
    for step in (1, 2):
        _flip_a_byte(tmp_path / "checkpoints" / str(step), written[step])
    with pytest.raises(CheckpointRestoreError) as refused:
        _resume(tmp_path, template)
    assert str(refused.value) == (
        f"{tmp_path / 'checkpoints'}: no checkpoint restores (steps there: 1, 2; see above)"
    )
    assert len(capsys.readouterr().err.splitlines()) == 2


def test_hosts_that_choose_different_steps_are_refused(template, tmp_path, monkeypatch, capsys):
    written = _saved_run(tmp_path, template)
    _flip_a_byte(tmp_path / "checkpoints" / "2", written[2])
    real = multihost.gather_ints

    def two_hosts(values):  # a second host that restored step 2, which this one skipped
        row = real(values)[0]
        return np.stack([row, np.where(row == 1, 2, row)])

    monkeypatch.setattr(multihost, "gather_ints", two_hosts)
    with pytest.raises(multihost.HostMismatchError) as refused:
        _resume(tmp_path, template)
    assert str(refused.value).startswith(
        f"{tmp_path / 'checkpoints'}: the hosts restored different checkpoints "
        "(host 0: step 1, host 1: step 2)"
    )
    assert (tmp_path / "checkpoints" / "2").is_dir()  # nothing moved before the hosts agree
    capsys.readouterr()


def test_a_step_saved_without_checksums_restores_unverified(template, tmp_path, capsys):
    """Checkpoints written before checksums were recorded: the same items, no checksums."""
    states, opt_state = _state(template, 5)
    manager = ocp.CheckpointManager((tmp_path / "checkpoints").absolute())
    leaves = {str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(opt_state))}
    meta = {"step": 5, **Checkpoints.position({"epoch": 0, "step": 5})}
    manager.save(
        5,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave({k: nnx.to_pure_dict(v) for k, v in states.items()}),
            opt_state=ocp.args.StandardSave(leaves),
            meta=ocp.args.JsonSave(meta),
        ),
    )
    manager.close()
    assert _resume(tmp_path, template) == (5, _bytes(states, opt_state))
    note = _one_line(capsys.readouterr().err)
    assert note == (
        f"mae-jax: {tmp_path / 'checkpoints' / '5'}: saved without checksums (before mae-jax "
        "recorded them): restored unverified"
    )


# ------------------------------------------------------------------ saves that fail


def _threads_left(before: set[threading.Thread]) -> list[str]:
    """Threads that would keep the process from exiting (Orbax's waiters held it 300 s)."""
    deadline = time.monotonic() + 5
    while True:
        left = [
            t.name
            for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.daemon
        ]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _path_class():
    from orbax.checkpoint._src.path import atomicity

    return atomicity.AtomicRenameTemporaryPath


def test_a_background_save_that_fails_is_one_line_at_the_next_step(template, tmp_path, monkeypatch):
    before = set(threading.enumerate())
    ckpts = Checkpoints(tmp_path, keep=5)
    ckpts.save(1, *_state(template, 1), {"step": 1})
    ckpts.wait()

    async def disk_full(self):  # the step's final commit, in the background thread
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.get()))

    monkeypatch.setattr(_path_class(), "finalize", disk_full)
    t0 = time.monotonic()
    ckpts.save(2, *_state(template, 2), {"step": 2})
    step_dir = tmp_path / "checkpoints" / "2"
    expected = (
        f"{step_dir}: cannot save the checkpoint: No space left on device (the earlier "
        "checkpoints are kept)"
    )
    with pytest.raises(CheckpointSaveError) as failed:
        while time.monotonic() - t0 < 20:  # what a training loop does once per step
            ckpts.raise_if_failed()
            time.sleep(0.01)
    assert str(failed.value) == expected
    with pytest.raises(CheckpointSaveError, match="No space left on device"):
        ckpts.close()
    assert time.monotonic() - t0 < 20
    assert _threads_left(before) == []
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == ["1"]


def test_a_read_only_directory_fails_the_save_itself_and_the_final_wait(
    template, tmp_path, monkeypatch
):
    before = set(threading.enumerate())
    ckpts = Checkpoints(tmp_path, keep=5)
    ckpts.save(1, *_state(template, 1), {"step": 1})
    ckpts.wait()

    async def read_only(self):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self.get()))

    monkeypatch.setattr(_path_class(), "create", read_only)
    t0 = time.monotonic()
    expected = (
        f"{tmp_path / 'checkpoints' / '2'}: cannot save the checkpoint: Read-only file system "
        "(the earlier checkpoints are kept)"
    )
    with pytest.raises(CheckpointSaveError) as failed:
        ckpts.save(2, *_state(template, 2), {"step": 2})
    assert str(failed.value) == expected
    for then in (ckpts.raise_if_failed, ckpts.wait, ckpts.close):
        with pytest.raises(CheckpointSaveError) as again:
            then()
        assert str(again.value) == expected
    assert time.monotonic() - t0 < 20
    assert _threads_left(before) == []
    meta = json.loads((tmp_path / "checkpoints" / "1" / "meta" / "metadata").read_text())
    assert set(meta["checksums"]["crc32"]) == {"model", "opt_state"}
    # The CLI prints it as one "mae-jax: error:" line and exits 2.
    assert isinstance(failed.value, cli._user_errors())
