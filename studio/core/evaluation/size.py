"""How big a model is: parameters, non-zero parameters, bytes in memory, the bytes its compressed form needs,
and bytes on disk when it has been exported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from studio.core.state import compression_state
from studio.core.summary import unique_tensors


def size_report(model: nn.Module, folder: str | Path | None = None) -> dict[str, Any]:
    params = set(model.parameters())
    total = sum(p.numel() for p in params)
    nonzero = sum(int(p.count_nonzero()) for p in params)
    memory = sum(t.numel() * t.element_size() for t in unique_tensors(model))
    # compressed bytes: quantized layers at their packed size, everything else as stored
    compressed = memory
    state = compression_state(model)
    for name, module in model.named_modules():
        record = state.get(name)
        if record is not None and record.quant is not None:
            compressed += record.quant.packed_bytes() - module.weight.numel() * module.weight.element_size()
    report = {
        "parameters": total,
        "nonzero_parameters": nonzero,
        "memory_bytes": memory,
        "compressed_bytes": compressed,
    }
    if folder is not None:
        report["disk_bytes"] = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    return report
