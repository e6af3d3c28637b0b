"""How big a model is: parameters, non-zero parameters, bytes in memory, the bytes its compressed form needs,
and bytes on disk when it has been exported."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Collection

import torch
from torch import nn

from studio.core.memory import release_read_only_file_pages
from studio.core.state import compression_state
from studio.core.summary import unique_tensors


_CHUNK = 1 << 22  # elements counted at a time, so a memory-mapped checkpoint's pages go back as they are read


def _count_nonzero(t: torch.Tensor, release: bool = True) -> int:
    """torch.count_nonzero (-0.0 is zero), a slice at a time on the CPU: with `release`, the pages of a
    memory-mapped checkpoint that were only read are given back after each slice. Measured on 28 M float32
    weights, 2 threads: 6.5 ms dense and 24 ms with one weight in eight zero, where taking |w| into a buffer and
    counting its bits as integers took 38-40 ms either way."""
    if t.device.type != "cpu" or not t.is_contiguous():
        return int(t.count_nonzero())
    count = 0
    for chunk in t.view(-1).split(_CHUNK):
        count += int(chunk.count_nonzero())
        if release:
            release_read_only_file_pages(chunk.data_ptr(), chunk.numel() * chunk.element_size())
    return count


def memory_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in unique_tensors(model))


def compressed_bytes(model: nn.Module, memory: int | None = None) -> int:
    """Quantized layers at their packed size, everything else as stored (`memory`: memory_bytes, if known)."""
    compressed = memory_bytes(model) if memory is None else memory
    state = compression_state(model)
    for name, module in model.named_modules():
        record = state.get(name)
        if record is not None and record.quant is not None:
            compressed += record.quant.packed_bytes() - module.weight.numel() * module.weight.element_size()
    return compressed


def size_report(model: nn.Module, folder: str | Path | None = None, *,
                about_to_overwrite: Collection[torch.Tensor] = ()) -> dict[str, Any]:
    """`about_to_overwrite`: parameters whose checkpoint pages stay mapped after they are counted, since the caller
    writes over them next (fresh_pages_for_overwrite then drops them). Handing them back only for the write to read
    them in again made an in-place RTN int8 run on SmolLM2 take 0.72 s instead of 0.55 s (medians of 4)."""
    params = set(model.parameters())
    total = sum(p.numel() for p in params)
    keep = {id(p) for p in about_to_overwrite}
    nonzero = sum(_count_nonzero(p.detach(), release=id(p) not in keep) for p in params)
    memory = memory_bytes(model)
    report = {
        "parameters": total,
        "nonzero_parameters": nonzero,
        "memory_bytes": memory,
        "compressed_bytes": compressed_bytes(model, memory),
    }
    if folder is not None:
        report["disk_bytes"] = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    return report
