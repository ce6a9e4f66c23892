"""Pretraining with its run in a bucket: one-line refusals, and the checkpoint listing the
two-host bucket test (tests/test_multihost_resume.py) waits on."""

from __future__ import annotations

from etils import epath


def complete_checkpoints(workdir: str) -> list[int]:
    """The complete checkpoints of a run in a bucket: Orbax writes a step's folder in place and
    marks it complete with commit_success.txt last."""
    import fsspec

    # epath's gcsfs instance caches listings, and other processes write
    fsspec.filesystem("gcs", finalize_on_close=True).invalidate_cache()
    folder = epath.Path(workdir) / "checkpoints"
    if not folder.exists():
        return []
    return sorted(
        int(p.name)
        for p in folder.iterdir()
        if p.name.isdigit() and (p / "commit_success.txt").exists()
    )


def test_a_run_in_a_missing_bucket_is_one_line(gcs_env, capsys):
    from mae_jax import cli

    code = cli.main(["pretrain", "--workdir", "gs://no-such-bucket/run", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err == (
        "mae-jax: error: gs://no-such-bucket/run: the bucket gs://no-such-bucket does not exist "
        "or cannot be reached\n"
    )
