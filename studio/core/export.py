"""Export a (compressed) model as a Hugging Face folder that plain transformers loads: safetensors weights,
config, tokenizer, and the recipe and report beside them.

The folder is written under a temporary name next to the destination and renamed into place only when
complete, so a failure or a cancel leaves nothing half-written; an existing destination is replaced only
with `force`, and then only after the new folder is complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from studio import __version__
from studio.core.errors import ExportError
from studio.core.evaluation.size import size_report
from studio.core.recipe import Recipe


def check_destination(out: str | os.PathLike, force: bool) -> Path:
    """Fail early, before any work, if the export could not be written."""
    out = Path(out).expanduser()
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"Export destination '{out}' is an existing file; choose a folder path instead.")
        if not force and any(out.iterdir()):
            raise ExportError(
                f"Export destination '{out}' already exists and is not empty. Choose another folder, or pass "
                "--force to replace it (the old folder is removed only after the new one is complete)."
            )
    parent = out.parent
    if parent.exists() and not os.access(parent, os.W_OK):
        raise ExportError(f"Cannot write into '{parent}': permission denied. Choose another folder.")
    return out


def export_hf_folder(
    model: nn.Module,
    tokenizer: Any,
    out: str | os.PathLike,
    *,
    recipe: Recipe | None = None,
    report: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    out = check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if recipe is not None:
            (tmp / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
        full_report = dict(report or {})
        full_report["studio_version"] = __version__
        full_report["export"] = {"format": "hf-safetensors", "path": str(out)}
        full_report["export"]["size"] = size_report(model, tmp)
        (tmp / "report.json").write_text(json.dumps(full_report, indent=2, default=str), encoding="utf-8")
        _move_into_place(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise ExportError(f"Could not write the export to '{out}': {exc}") from exc
        raise
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)  # put the user's folder back
        raise
    shutil.rmtree(old, ignore_errors=True)
