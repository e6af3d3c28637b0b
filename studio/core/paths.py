"""Where the studio keeps its caches and data, overridable for tests and portable installs."""

import os
from pathlib import Path

RESOURCES_DIR = Path(__file__).resolve().parents[2] / "resources"
PRESETS_DIR = RESOURCES_DIR / "presets"


def cache_dir() -> Path:
    """`$STUDIO_CACHE_DIR`, else `$XDG_CACHE_HOME/compression-studio`, else `~/.cache/compression-studio`."""
    if env := os.environ.get("STUDIO_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "compression-studio"


def data_dir() -> Path:
    """`$STUDIO_DATA_DIR`, else `$XDG_DATA_HOME/compression-studio`, else `~/.local/share/compression-studio`."""
    if env := os.environ.get("STUDIO_DATA_DIR"):
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "compression-studio"
