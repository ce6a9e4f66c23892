"""Weight conversion between official PyTorch MAE checkpoints and mae-jax, plus PyTorch references."""
