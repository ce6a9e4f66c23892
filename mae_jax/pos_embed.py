"""Fixed 2-D sin-cos position embeddings, computed as the official code computes them."""

from __future__ import annotations

import numpy as np


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[M] positions -> [M, dim] float64: all sin channels, then all cos channels."""
    if dim % 2:
        raise ValueError(f"sin-cos width {dim} is odd")
    # float64 frequencies against float32 positions, as the reference does; the product is float64.
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float32), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
    """[(1 +) G*G, dim] float32 table for a G x G patch grid, row-major patches.

    The first dim/2 channels encode the patch's column index and the last dim/2 its row index
    (the official variable names suggest the opposite; the values are what the checkpoints hold).
    With ``cls_token`` a zero row comes first.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos width {dim} is not divisible by 4")
    rows, cols = np.meshgrid(
        np.arange(grid_size, dtype=np.float32),
        np.arange(grid_size, dtype=np.float32),
        indexing="ij",
    )
    table = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return table.astype(np.float32)
