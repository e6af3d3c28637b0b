"""What a loaded model is: architecture, parameters, bytes by dtype, decoder blocks and their linear layers."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

from studio.core.structure import find_decoder_blocks, in_out_features, is_linear


@dataclass
class LayerInfo:
    name: str
    kind: str
    in_features: int
    out_features: int
    parameters: int


@dataclass
class ModelSummary:
    architecture: str
    model_type: str
    parameters: int
    bytes_by_dtype: dict[str, int]
    blocks_path: str
    num_blocks: int
    hidden_size: int | None
    vocab_size: int | None
    block_layers: list[LayerInfo] = field(default_factory=list)  # the linear layers of block 0

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_dtype.values())

    def to_dict(self) -> dict:
        return asdict(self) | {"total_bytes": self.total_bytes}

    def format(self) -> str:
        lines = [
            f"architecture   {self.architecture} ({self.model_type})",
            f"parameters     {self.parameters:,}",
            "bytes          " + ", ".join(f"{d}: {b / 2**20:,.1f} MiB" for d, b in self.bytes_by_dtype.items()),
            f"decoder blocks {self.num_blocks} at {self.blocks_path}",
            f"hidden size    {self.hidden_size}   vocabulary {self.vocab_size}",
            "linear layers of each block:",
        ]
        lines += [
            f"  {layer.name:<28} {layer.kind:<8} {layer.in_features:>6} -> {layer.out_features:<6} "
            f"{layer.parameters:>12,} params"
            for layer in self.block_layers
        ]
        return "\n".join(lines)


def unique_tensors(model: nn.Module):
    seen: set[int] = set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


def summarize(model: nn.Module) -> ModelSummary:
    config = getattr(model, "config", None)
    by_dtype: Counter[str] = Counter()
    params = 0
    for p in set(model.parameters()):
        params += p.numel()
    for t in unique_tensors(model):
        by_dtype[str(t.dtype).removeprefix("torch.")] += t.numel() * t.element_size()
    decoder = find_decoder_blocks(model)
    layers = [
        LayerInfo(sub, type(m).__name__, *in_out_features(m), sum(p.numel() for p in m.parameters()))
        for sub, m in decoder.blocks[0].named_modules()
        if sub and is_linear(m)
    ]
    text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    return ModelSummary(
        architecture=type(model).__name__,
        model_type=getattr(config, "model_type", "unknown"),
        parameters=params,
        bytes_by_dtype=dict(by_dtype),
        blocks_path=decoder.path,
        num_blocks=len(decoder.blocks),
        hidden_size=getattr(text_config, "hidden_size", None),
        vocab_size=getattr(text_config, "vocab_size", None),
        block_layers=layers,
    )
