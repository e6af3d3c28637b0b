"""Which GGUF type each tensor of a model gets, decided without touching the weights (the export dialog shows
it at once), and a one-line advice on the type to choose."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from studio.core.errors import ExportError
from studio.core.export.gguf_arch import GgufArch, architecture_of, check_width, qk_row_order, tensor_name_map
from studio.core.export.gguf_blocks import BLOCK, BY_SIZE, holds_codes, smallest_container
from studio.core.state import STATE_ATTR

if TYPE_CHECKING:
    from torch import nn

    from studio.core.state import QuantizedWeight

DENSE_TYPES = ("F32", "F16", "BF16")
BLOCK_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
# How each tensor is written: the studio's codes as they are, its codes quantized again to a type that cannot
# hold them, a weight it did not quantize quantized now, dense floats, or a 1-D tensor (always F32).
CODES, REQUANTIZED, QUANTIZED, DENSE, VECTOR = "codes", "requantized", "quantized", "dense", "vector"


@dataclass
class TensorJob:
    name: str  # in the GGUF file, e.g. blk.0.attn_q.weight
    parameter: str  # in the transformers model, e.g. model.layers.0.self_attn.q_proj.weight
    shape: tuple[int, ...]
    qtype: str
    how: str
    quant: QuantizedWeight | None = None
    row_order: np.ndarray | None = None  # llama's q/k rows
    offset: float = 0.0  # added to the values (Gemma norms)

    @property
    def layer(self) -> str:
        return self.parameter.rsplit(".", 1)[0]

    @property
    def nbytes(self) -> int:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[self.qtype]]
        return int(np.prod(self.shape)) // block * size


@dataclass
class ExportPlan:
    arch: GgufArch
    jobs: list[TensorJob]
    requested: str
    warnings: list[str]
    transformers_drops: str | None = None  # why transformers' GGUF loader would not rebuild this model

    @property
    def matrices(self) -> list[TensorJob]:
        return [job for job in self.jobs if job.how != VECTOR]

    def names(self, how: str) -> list[str]:
        return [job.layer for job in self.jobs if job.how == how]

    @property
    def bits_per_weight(self) -> float:
        weights = sum(int(np.prod(job.shape)) for job in self.matrices)
        return sum(job.nbytes * 8 for job in self.matrices) / max(weights, 1)

    @property
    def gguf_type(self) -> str:
        """The requested type, or for "auto" the type holding most of the weights (general.file_type)."""
        if self.requested != "auto":
            return self.requested
        counts = Counter()
        for job in self.matrices:
            counts[job.qtype] += int(np.prod(job.shape))
        return counts.most_common(1)[0][0] if counts else "F16"

    def tensor_types(self) -> dict[str, int]:
        return dict(Counter(job.qtype for job in self.jobs))


def plan_export(model: nn.Module, requested: str = "auto", embedding_type: str | None = None) -> ExportPlan:
    from studio.core.export.formats import GGUF_TYPES

    if requested not in GGUF_TYPES:
        raise ExportError(f"Unknown GGUF type '{requested}'. Choose one of: {', '.join(GGUF_TYPES)}.")
    if embedding_type is not None and embedding_type not in DENSE_TYPES + BLOCK_TYPES:
        raise ExportError(f"Unknown GGUF embedding type '{embedding_type}'. Choose one of: "
                          f"{', '.join(DENSE_TYPES + BLOCK_TYPES)}.")
    arch = architecture_of(model)
    config = model.config
    names = tensor_name_map(arch, config.num_hidden_layers)
    records = getattr(model, STATE_ATTR, None) or {}
    quantized_model = any(r.quant is not None for r in records.values())
    plan = ExportPlan(arch, [], requested, [])
    for parameter, tensor in model.named_parameters():
        job = _locate(arch, config, names, parameter, tuple(tensor.shape))
        if len(job.shape) == 2:
            record = records.get(job.layer)
            job.quant = record.quant if record is not None else None
            is_embedding = job.name.startswith(("token_embd.", "output."))
            target = embedding_type if is_embedding and embedding_type else requested
            job.qtype, job.how = _choose(target, job.quant, quantized_model)
            if job.qtype in BLOCK_TYPES and job.shape[1] % BLOCK:
                plan.warnings.append(f"{job.layer}: rows of {job.shape[1]} weights are not a multiple of 32, so "
                                     f"it is written as F16 instead of {job.qtype}.")
                job.qtype, job.how = "F16", DENSE
        plan.jobs.append(job)
    biases = [job.layer for job in plan.jobs if job.name.endswith(".bias")]
    if biases and arch.name == "llama":
        plan.transformers_drops = (f"{len(biases)} layers have biases (e.g. {biases[0]}): llama.cpp reads these "
                                   "bias tensors, transformers' GGUF loader drops them (its llama config has no "
                                   "bias flags)")
        plan.warnings.append(plan.transformers_drops + ".")
    return plan


def _locate(arch: GgufArch, config: Any, names: Any, parameter: str, shape: tuple[int, ...]) -> TensorJob:
    """The tensor's GGUF name and how its values are laid out there; refuses what llama.cpp cannot load."""
    layer, suffix = parameter.rsplit(".", 1)
    base = names.get_name(layer)
    if base is None:
        raise ExportError(f"The GGUF export does not know where llama.cpp's '{arch.name}' keeps the parameter "
                          f"'{parameter}'. Export a Hugging Face folder instead.")
    kind = base.rsplit(".", 1)[-1]
    check_width(arch, config, parameter, kind, shape)
    if suffix == "bias" and kind not in arch.biases:
        raise ExportError(
            f"Layer '{layer}' has a bias, but llama.cpp's '{arch.name}' architecture has no bias on '{kind}' "
            "(structured pruning's bias compensation adds one). Prune without bias_compensation, or export a "
            "Hugging Face folder."
        )
    job = TensorJob(f"{base}.{suffix}", parameter, shape, "F32", VECTOR)
    if arch.permute_qk and kind in ("attn_q", "attn_k"):
        heads = config.num_attention_heads if kind == "attn_q" else config.num_key_value_heads
        job.row_order = qk_row_order(shape[0], heads)
    if len(shape) == 1 and kind.endswith("norm"):
        job.offset = arch.norm_offset
    return job


def _choose(requested: str, quant: QuantizedWeight | None, quantized_model: bool) -> tuple[str, str]:
    if requested in DENSE_TYPES:
        return requested, DENSE
    if quant is not None:
        if requested == "auto":
            container = smallest_container(quant)
            return (container, CODES) if container else ("Q8_0", REQUANTIZED)
        return requested, CODES if holds_codes(quant, requested) else REQUANTIZED
    if requested == "auto":
        return ("Q8_0", QUANTIZED) if quantized_model else ("F16", DENSE)
    return requested, QUANTIZED


def plan_summary(plan: ExportPlan) -> dict[str, Any]:
    return {
        "requested_type": plan.requested,
        "gguf_type": plan.gguf_type,
        "tensor_types": plan.tensor_types(),
        "codes_kept": plan.names(CODES),
        "requantized": plan.names(REQUANTIZED),
        "quantized_at_export": plan.names(QUANTIZED),
        "bits_per_weight": round(plan.bits_per_weight, 3),
        "warnings": list(plan.warnings),
        "transformers_drops": plan.transformers_drops,
        "advice": advice(plan),
        "details": details(plan),
    }


def details(plan: ExportPlan) -> list[str]:
    """Lines for the export dialog under the advice: what happens to which weights, and the size."""
    lines = []
    for how, text in ((CODES, "keep the studio's codes"), (REQUANTIZED, "are requantized"),
                      (QUANTIZED, "are quantized at export"), (DENSE, "are written as dense floats")):
        jobs = [job for job in plan.matrices if job.how == how]
        if jobs:
            types = ", ".join(f"{t} ×{n}" for t, n in Counter(job.qtype for job in jobs).items())
            lines.append(f"{len(jobs)} weight matrices {text} ({types}).")
    lines.append(f"{plan.bits_per_weight:.2f} bits per weight over the weight matrices; norms and biases in F32.")
    return lines + list(plan.warnings)


def advice(plan: ExportPlan) -> str:
    quantized = [job for job in plan.matrices if job.quant is not None]
    if not quantized:
        return ("Unquantized model: F16 keeps it as it is; Q8_0 halves that with little loss, and Q4_0 / Q4_1 "
                "quantize it now by plain rounding.")
    widths = sorted({job.quant.bits for job in quantized})
    bits = "/".join(map(str, widths)) + "-bit codes"
    best = Counter(smallest_container(job.quant) for job in quantized).most_common(1)[0][0]
    requantized = [job for job in quantized if job.how == REQUANTIZED]
    if best is None:
        return (f"{bits}: no GGUF block type holds them (groups must be multiples of 32 weights); every type "
                "requantizes them.")
    best_bits = _container_bits(best)
    if requantized:
        return (f"{bits}: {len(requantized)} layers do not fit {plan.requested} and will be requantized; "
                f"{best} keeps them exactly ({best_bits:.1f} bits per weight on disk).")
    if plan.requested in DENSE_TYPES:
        return f"{bits}: written as dense {plan.requested}; {best} would keep them exactly in {best_bits:.1f} bits."
    smaller = [t for t in BY_SIZE if _container_bits(t) < best_bits]
    tail = f"; {smaller[-1]} would requantize them" if smaller else ""
    return f"{bits}: kept exactly in {best} blocks ({best_bits:.1f} bits per weight on disk){tail}."


def _container_bits(name: str) -> float:
    from studio.core.export.gguf_blocks import CONTAINERS

    return CONTAINERS[name].bits_per_weight
