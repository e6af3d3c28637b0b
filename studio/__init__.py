"""Compression Studio: compress causal language models, from a window or the command line."""

__version__ = "0.1.0"
