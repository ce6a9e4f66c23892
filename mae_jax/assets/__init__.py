"""Files that ship with mae-jax: sample photographs and the small demo model trained on them."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent


def sample_images_dir() -> Path:
    """The folder of bundled photographs (licences in its SOURCES.md)."""
    return _HERE / "photos"


def demo_image_paths() -> list[Path]:
    return sorted(sample_images_dir().glob("*.jpg"))


def demo_checkpoint_dir() -> Path:
    """The mae-jax checkpoint of the demo model (preset mae_demo_patch8)."""
    return _HERE / "demo_model"


def demo_pretrain_settings() -> dict:
    """The settings of ``mae-jax pretrain`` without --data: the run that made the demo model.

    Seven photographs, one batch of seven random crops per epoch, pixel targets (the figure is
    easier to read than with normalized-pixel targets).
    """
    return {
        "preset": "mae_demo_patch8",
        "data": None,
        "batch_size": 7,
        "epochs": 8000,
        "warmup_epochs": 200,
        "lr": 1.5e-3,
        "norm_pix_loss": False,
        "log_every": 50,
        "ckpt_every": 2000,
        "recon_every": 2000,
        "recon_images": 7,
        "read_threads": 4,
    }
