"""Export a (compressed) model in a format other tools load: a dense Hugging Face folder, compressed-tensors
for vLLM and transformers, or GGUF for llama.cpp.

Each format's writer (a module of this package) writes into a temporary folder next to the destination;
provenance (recipe, studio version, measured metrics) is added, and the result renamed into place only when
complete (see `staging`), so a failed or cancelled export leaves nothing behind and never touches an existing
folder unless asked to replace it, and then only after the new one is complete."""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.core.errors import ExportError
from studio.core.events import CancelToken
from studio.core.export.formats import EXPORT_FORMATS, GGUF_TYPES, ExportFormat, export_format
from studio.core.export.provenance import build_provenance, write_side_files
from studio.core.export.staging import check_destination, move_into_place, staging_folder
from studio.core.recipe import Recipe

if TYPE_CHECKING:  # the export dialog lists the formats without loading torch
    from torch import nn

    from studio.core.evaluation.perplexity import PerplexityConfig


@dataclass(frozen=True)
class ExportResult:
    path: Path
    export: dict[str, Any]  # the report's export section: format, what the writer did, size, verification

__all__ = [
    "EXPORT_FORMATS", "GGUF_TYPES", "ExportFormat", "ExportResult", "check_destination", "export_format", "export_hf_folder",
    "export_model", "export_summary",
]


def export_model(
    model: nn.Module,
    tokenizer: Any,
    out: str | os.PathLike,
    *,
    format: str = "hf-safetensors",
    options: dict[str, Any] | None = None,
    recipe: Recipe | None = None,
    report: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    force: bool = False,
    cancel: CancelToken | None = None,
    verify: PerplexityConfig | None = None,
) -> ExportResult:
    """Write `model` to `out` in `format` (an id of EXPORT_FORMATS) with the format's `options`. With `verify`,
    the written files are loaded back by the consumer libraries and scored against the model in memory before
    they are moved into place (studio.core.export.verify). Returns the path written (a folder, or the .gguf
    file when `out` ends in .gguf) and the report's export section."""
    from studio.core.evaluation.size import size_report

    fmt = export_format(format)
    out = check_destination(out, force)
    single_file = fmt.single_file_suffix is not None and out.suffix.lower() == fmt.single_file_suffix
    if out.suffix.lower() == ".gguf" and not single_file:
        raise ExportError(f"'{out}' ends in .gguf but the format is {fmt.id}; give a folder path instead.")
    module_name, function = fmt.writer.split(":")
    writer = getattr(importlib.import_module(f"studio.core.export.{module_name}"), function)
    provenance = build_provenance(fmt.id, recipe, report, source)
    written_model = model
    if fmt.id != "hf-safetensors":  # no other format has low-rank layers: the factors are multiplied out
        from studio.core.factored import densified

        written_model = densified(model)
    with staging_folder(out) as tmp:
        written = writer(written_model, tokenizer, tmp, provenance, cancel, **(options or {}))
        if written_model is not model:
            written["low_rank"] = "low-rank layers multiplied back into dense weights before writing"
        if cancel is not None:
            cancel.check()
        full_report = dict(report or {})
        full_report["studio_version"] = provenance["studio_version"]
        full_report["export"] = {"format": fmt.id, "path": str(out), **written}
        full_report["export"]["size"] = size_report(model, tmp)
        if verify is not None:
            from studio.core.export.verify import verify_export

            written_path = next(tmp.glob(f"*{fmt.single_file_suffix}")) if fmt.single_file_suffix else tmp
            full_report["export"]["verification"] = verify_export(model, tokenizer, fmt.id, written_path, written,
                                                                  verify, cancel)
        if single_file:
            (file,) = tmp.glob(f"*{fmt.single_file_suffix}")
            move_into_place(file, out)
        else:
            write_side_files(tmp, provenance, full_report)
            move_into_place(tmp, out)
    return ExportResult(out, full_report["export"])


def export_hf_folder(model: nn.Module, tokenizer: Any, out: str | os.PathLike, *, recipe: Recipe | None = None,
                     report: dict[str, Any] | None = None, force: bool = False) -> Path:
    """The Hugging Face folder `studio run --out` writes: dense, or the studio's factored form for a model with
    low-rank layers, so the run's result reloads with its parameters really reduced."""
    return export_model(model, tokenizer, out, options={"keep_factors": True}, recipe=recipe, report=report,
                        force=force).path


def export_summary(path: str | os.PathLike, export: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an export wrote: its path, bytes on disk, and each file with its size (largest first), plus the
    export section of its report (`export`, else read from its report.json)."""
    path = Path(path)
    paths = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    root = path.parent if path.is_file() else path
    files = sorted(((str(f.relative_to(root)), f.stat().st_size) for f in paths), key=lambda item: (-item[1], item[0]))
    written = export
    if written is None:
        try:
            written = json.loads((path / "report.json").read_text(encoding="utf-8")).get("export", {})
        except (OSError, ValueError):
            written = {}
    return {"path": str(path), "disk_bytes": sum(size for _, size in files), "files": files, "export": written}
