"""The compression methods, one module per algorithm. Importing this package registers them."""

from studio.methods import magnitude, rtn  # noqa: F401
