"""Give freed memory back to the system promptly while whole models pass through the process."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@functools.cache
def return_large_blocks_to_the_system() -> bool:
    """Serve every allocation of 1 MiB or more with its own mmap (glibc only; else a no-op).

    glibc raises its mmap threshold each time a large block is freed, so that later blocks of that
    size come from the heap, which keeps freed memory and lets it fragment. Converting a model
    tensor by tensor then leaves the process holding up to twice the model. A fixed threshold
    turns that off: a freed tensor is unmapped at once. Returns whether the setting was applied.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 20))
