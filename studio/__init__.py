"""Compression Studio: compress causal language models, from a window or the command line."""

import os

# With this set, PyTorch's CPU allocator places each tensor of 2 MiB or more on 2 MiB-aligned transparent huge
# pages (Linux). It reads the variable once, at the first tensor allocation, so it is set here, before any.
# Measured on the calibrated methods (bench/README.md, "Against the peers"): lower and steadier peak RSS at the
# same speed. A value the user set is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from studio.core.memory import settle_malloc_thresholds  # noqa: E402

settle_malloc_thresholds()

__version__ = "0.1.0"
