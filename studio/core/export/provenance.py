"""What travels with every export: the recipe, the studio version, where the model came from and the measured
metrics. Folders get recipe.yaml, report.json and a README.md model card; a GGUF file gets the same as
key-values (written by the GGUF writer from `provenance`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from studio import __version__
from studio.core.recipe import Recipe


def build_provenance(format_id: str, recipe: Recipe | None, report: dict[str, Any] | None,
                     source: dict[str, Any] | None) -> dict[str, Any]:
    report = report or {}
    metrics = {}
    for key in ("baseline", "final"):
        if report.get(key):
            metrics[key] = {k: v for k, v in report[key].items() if isinstance(v, (int, float, str))}
    return {
        "studio_version": __version__,
        "format": format_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe_name": recipe.name if recipe is not None else None,
        "recipe_yaml": recipe.to_yaml() if recipe is not None else None,
        "source": (source or {}).get("path") or (source or {}).get("id") or (source or {}).get("name"),
        "source_info": dict(source or {}),  # kind, path: the GGUF writer reuses a source GGUF's tokenizer
        "metrics": metrics,
    }


def write_side_files(folder: Path, provenance: dict[str, Any], report: dict[str, Any]) -> None:
    """recipe.yaml, report.json and README.md into the export folder."""
    if provenance.get("recipe_yaml"):
        (folder / "recipe.yaml").write_text(provenance["recipe_yaml"], encoding="utf-8")
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    (folder / "README.md").write_text(model_card(provenance, report), encoding="utf-8")


def model_card(provenance: dict[str, Any], report: dict[str, Any]) -> str:
    export = report.get("export", {})
    lines = [
        "---",
        "tags: [compression-studio" + (f", {provenance['format']}" if provenance.get("format") else "") + "]",
        "---",
        "",
        f"# {provenance.get('recipe_name') or 'Compressed model'}",
        "",
        f"Written by Compression Studio {provenance['studio_version']} on {provenance['created']} as "
        f"**{provenance['format']}**" + (f", from `{provenance['source']}`." if provenance.get("source") else "."),
        "",
    ]
    how = export.get("how_to_load")
    if how:
        lines += ["## Load it", "", "```python", how, "```", ""]
    metrics = provenance.get("metrics") or {}
    if metrics:
        lines += ["## Measured", "", "| | perplexity | KL vs original | top-1 agreement |", "| --- | --- | --- | --- |"]
        for key, values in metrics.items():
            lines.append(f"| {key} | {_num(values.get('perplexity'))} | {_num(values.get('kl'))} | "
                         f"{_num(values.get('top1_agreement'))} |")
        lines.append("")
    verified = export.get("verification")
    if verified:
        lines += ["## Loaded back", "", f"`{verified.get('loader')}`: perplexity {_num(verified.get('reloaded'))} "
                  f"against {_num(verified.get('in_memory'))} in memory ({verified.get('tokens')} tokens of "
                  f"`{verified.get('text')}`).", ""]
    if provenance.get("recipe_yaml"):
        lines += ["## Recipe", "", "```yaml", provenance["recipe_yaml"].rstrip(), "```", ""]
    return "\n".join(lines)


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "—" if value is None else str(value)
