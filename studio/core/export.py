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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio import __version__
from studio.core.errors import ExportError
from studio.core.recipe import Recipe

if TYPE_CHECKING:  # the export dialog lists the formats without loading torch
    from torch import nn


@dataclass(frozen=True)
class ExportFormat:
    id: str
    name: str
    description: str
    available: bool  # False: planned, shown greyed as "coming"


EXPORT_FORMATS: tuple[ExportFormat, ...] = (
    ExportFormat("hf-safetensors", "Hugging Face folder (safetensors)",
                 "Dense weights, config, tokenizer, recipe and report: loads with plain transformers.", True),
    ExportFormat("compressed-tensors", "compressed-tensors",
                 "Packed quantized / sparse weights for vLLM and transformers.", False),
    ExportFormat("gguf", "GGUF", "A single file for llama.cpp and its tools.", False),
)


def export_summary(folder: str | os.PathLike) -> dict[str, Any]:
    """What an export wrote: its path, bytes on disk, and each file with its size (largest first), plus the
    export section of its report.json."""
    folder = Path(folder)
    files = sorted(((str(f.relative_to(folder)), f.stat().st_size) for f in folder.rglob("*") if f.is_file()),
                   key=lambda item: (-item[1], item[0]))
    try:
        written = json.loads((folder / "report.json").read_text(encoding="utf-8")).get("export", {})
    except (OSError, ValueError):
        written = {}
    return {"path": str(folder), "disk_bytes": sum(size for _, size in files), "files": files, "export": written}


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
    while not parent.exists() and parent != parent.parent:  # the folders export would create
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ExportError(
            f"Cannot write the export to '{out}': '{parent}' is a file, not a folder. Choose another folder."
        )
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
    from studio.core.evaluation.size import size_report

    out = check_destination(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"Could not create the export folder next to '{out}': {exc}") from exc
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
