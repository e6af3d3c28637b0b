"""Which export formats fit the model as it is now, and what each would cost: the guidance shown by
`studio export --advice` and the export dialog before anything is written."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from studio.core.errors import ExportError

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class FormatAdvice:
    format: str
    usable: bool
    summary: str  # one line: fits / does not fit and why
    details: list[str] = field(default_factory=list)


def model_state_summary(model: nn.Module) -> str:
    """'28 layers quantized (4-bit g64 asym ×28), 12 sparse (2:4 ×12)' or 'not compressed'."""
    from studio.core.state import compression_state

    state = compression_state(model)
    quant = Counter(f"{r.quant.bits}-bit " + (f"g{r.quant.group_size}" if r.quant.group_size else "per-channel")
                    + (" sym" if r.quant.symmetric else " asym") for r in state.values() if r.quant is not None)
    sparse = Counter(r.sparsity_pattern or "unstructured" for r in state.values() if r.packed_mask is not None)
    parts = []
    factored = _low_rank_count(model)
    if factored:
        parts.append(f"{factored} layers low-rank factored")
    if quant:
        parts.append(f"{sum(quant.values())} layers quantized (" + ", ".join(f"{k} ×{n}" for k, n in quant.items()) + ")")
    if sparse:
        parts.append(f"{sum(sparse.values())} sparse (" + ", ".join(f"{k} ×{n}" for k, n in sparse.items()) + ")")
    return ", ".join(parts) or "not compressed"


def format_advice(model: nn.Module, gguf_type: str = "auto", formats: tuple[str, ...] | None = None
                  ) -> list[FormatAdvice]:
    """Advice for each of `formats` (all when None), in EXPORT_FORMATS order; only those asked for are worked out."""
    from studio.core.export.formats import EXPORT_FORMATS

    advisers = {"hf-safetensors": _dense_advice, "compressed-tensors": _compressed_tensors_advice,
                "gguf": lambda m: _gguf_advice(m, gguf_type)}
    factored = _low_rank_count(model)
    if factored:  # the writers see the model with its factors multiplied out, and so does the advice
        from studio.core.factored import densified

        asked = [f.id for f in EXPORT_FORMATS if formats is None or f.id in formats]
        dense = densified(model) if set(asked) - {"hf-safetensors"} else model  # the GUI thread: only when needed
        note = (f"{factored} low-rank layers are multiplied back into dense weights, so their parameter saving is "
                "not kept; only the studio's own factored folder (hf-safetensors with --keep-factors) keeps it.")
        advice = [advisers[f](model if f == "hf-safetensors" else dense) for f in asked]
        return [FormatAdvice(a.format, a.usable, a.summary, [note, *a.details]) for a in advice]
    return [advisers[f.id](model) for f in EXPORT_FORMATS if formats is None or f.id in formats]


def _low_rank_count(model: nn.Module) -> int:
    from studio.core.factored import low_rank_layers

    return len(low_rank_layers(model))


def _dense_advice(model: nn.Module) -> FormatAdvice:
    from studio.core.state import compression_state

    quantized = any(r.quant is not None for r in compression_state(model).values())
    details = ["Quantized layers are written as their dense values: the folder is not smaller on disk."] if quantized else []
    return FormatAdvice("hf-safetensors", True, "Always fits: dense weights, loads with plain transformers; the studio "
                        "keeps the codes beside them for a later export.", details)


def _compressed_tensors_advice(model: nn.Module) -> FormatAdvice:
    from studio.core.export.compressed_tensors import compressed_tensors_problems
    from studio.core.state import compression_state

    problems = compressed_tensors_problems(model)
    sparse = any(r.packed_mask is not None for r in compression_state(model).values())
    details = ["compressed-tensors 0.20 writes no sparse format: pruned layers are stored dense."] if sparse else []
    return FormatAdvice("compressed-tensors", not problems,
                        problems[0] if problems else "Fits: the studio's codes are packed as they are.",
                        problems[1:] + details)


def _gguf_advice(model: nn.Module, gguf_type: str) -> FormatAdvice:
    from studio.core.export.gguf_file import gguf_plan

    try:
        plan = gguf_plan(model, gguf_type)
    except ExportError as exc:
        return FormatAdvice("gguf", False, str(exc))
    details = list(plan.get("details", []))
    if plan["requantized"] or plan["quantized_at_export"]:
        details.append("Rounding at export changes the evaluated weights: verify to measure the file's perplexity.")
    return FormatAdvice("gguf", True, plan["advice"], details)
