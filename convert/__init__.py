"""Weight conversion between official PyTorch MAE checkpoints and mae-jax, plus PyTorch references.

Installed as ``mae_jax.convert`` (``mae-jax convert``, ``to-pth``, ``parity``); in a clone the same
files are the package ``convert`` and run as scripts (``python convert/pth_to_orbax.py``). Modules
here import each other relatively, so both work. They import ``mae_jax``; of ``mae_jax``, only the
command line (``mae_jax.cli``) imports them, once a converter command is named.
"""
