"""Where the studio keeps its caches and data, overridable for tests and portable installs."""

import os
import sys
from pathlib import Path


def resources_dir(package_file: str = __file__, prefix: str = sys.prefix) -> Path:
    """`resources/` beside the package in a checkout (and in the built app); a wheel installs it as data files
    under `<prefix>/share/compression-studio` (pyproject's data-files)."""
    beside_package = Path(package_file).resolve().parents[2] / "resources"
    installed = Path(prefix) / "share" / "compression-studio"
    return beside_package if beside_package.is_dir() or not installed.is_dir() else installed


RESOURCES_DIR = resources_dir()
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
