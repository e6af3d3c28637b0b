"""GGUF for llama.cpp: one file with the hyperparameters, the tokenizer, provenance and every tensor.

GGUF is llama.cpp's container: typed key-values ({arch}.* hyperparameters, tokenizer.*, general.*; the
studio adds studio.*), then tensors named as llama.cpp expects (token_embd, blk.N.attn_q, ..., output_norm,
output when untied), each of its own ggml type. 1-D tensors (norms, biases) are F32; weight matrices are
F32 / F16 / BF16, or ggml blocks of 32 weights with an fp16 scale (Q8_0, Q5_0/Q5_1, Q4_0/Q4_1; the layouts
are in gguf_blocks).

The studio's own integer codes are written into blocks as they are where the group layout allows (see
gguf_blocks), so the file holds the very weights the studio evaluated; a layer whose codes the chosen type
cannot hold is requantized from its dense weights with gguf-py, as are weights the studio did not quantize.
Each kept layer is checked against gguf-py's own dequantization while it is written.

`load_gguf_with_transformers` and `LlamaCppLogits` load a written file back for a perplexity check with
transformers' GGUF loader or llama.cpp (llama-cpp-python)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from studio.core.errors import ExportError
from studio.core.events import CancelToken
from studio.core.export.gguf_arch import write_hyperparameters
from studio.core.export.gguf_blocks import codes_to_blocks
from studio.core.export.gguf_plan import (
    CODES,
    DENSE,
    VECTOR,
    ExportPlan,
    TensorJob,
    plan_export,
    plan_summary,
)
from studio.core.export.gguf_vocab import add_tokenizer

if TYPE_CHECKING:
    import gguf
    from torch import nn

__all__ = ["LlamaCppLogits", "gguf_plan", "load_gguf_with_transformers", "write_gguf"]

log = logging.getLogger(__name__)

QUANTIZED_BY = "Compression Studio"
# A kept layer may differ from (codes - zeros) * scales only by ggml's fp16 storage of d and m: within 2^-11
# relative, that moves a weight q steps from zero (or with zero point z) by at most q * 2^-11 (z * 2^-11) steps,
# below 2^bits * 2^-11 steps. Twice that is a packing bug, not rounding.
FP16_RELATIVE_ROUNDING = 2.0**-11


def gguf_plan(model: nn.Module, type: str = "auto", embedding_type: str | None = None) -> dict[str, Any]:  # noqa: A002
    """For the export dialog, without quantizing anything: which layers keep the studio's codes, which are
    requantized, which are quantized at export, the resulting bits per weight and a one-line advice."""
    return plan_summary(plan_export(model, type, embedding_type))


def write_gguf(model: nn.Module, tokenizer: Any, folder: Path, provenance: dict[str, Any],
               cancel: CancelToken | None = None, *, type: str = "auto", name: str | None = None,  # noqa: A002
               embedding_type: str | None = None) -> dict[str, Any]:
    """Write `folder/<name or model-TYPE>.gguf`; returns the summary that goes into the export report.
    `embedding_type` overrides the type of token_embd / output (default: the same as the other weights)."""
    import gguf

    plan = plan_export(model, type, embedding_type)
    path = Path(folder) / f"{(name or 'model-' + plan.gguf_type).removesuffix('.gguf')}.gguf"
    writer = gguf.GGUFWriter(path, plan.arch.name)
    try:
        warnings = list(plan.warnings) + write_hyperparameters(writer, plan.arch, model.config)
        _write_general(writer, plan, provenance, name)
        n_vocab = model.get_input_embeddings().weight.shape[0]
        described = add_tokenizer(writer, tokenizer, provenance.get("source_info") or {}, n_vocab, warnings)
        if described.startswith("built"):
            warnings.append(f"Tokenizer {described}.")
        for job in plan.jobs:
            _declare(writer, job)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        largest_change = _write_tensors(writer, plan, dict(model.named_parameters()), cancel)
    finally:
        writer.close()
    for warning in warnings:
        log.warning("GGUF export: %s", warning)
    summary = plan_summary(plan)
    summary.update(
        file=path.name,
        studio_codes_kept=len(summary.pop("codes_kept")),
        kept_codes_max_change_in_steps=largest_change,
        tokenizer=described,
        warnings=warnings,
        how_to_load=f"llama-cli -m {path.name}  # or: AutoModelForCausalLM.from_pretrained(FOLDER, "
                    f"gguf_file='{path.name}')",
    )
    return summary


def _write_general(writer: gguf.GGUFWriter, plan: ExportPlan, provenance: dict[str, Any], name: str | None) -> None:
    import gguf

    source = provenance.get("source") or ""
    writer.add_name(name or provenance.get("recipe_name") or Path(str(source)).stem or "model")
    writer.add_quantized_by(QUANTIZED_BY)
    writer.add_file_type(int(gguf.LlamaFileType[FILE_TYPES[plan.gguf_type]]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string("studio.version", str(provenance.get("studio_version") or ""))
    writer.add_string("studio.created", str(provenance.get("created") or ""))
    writer.add_string("studio.source", str(source))
    writer.add_string("studio.recipe", provenance.get("recipe_yaml") or "")
    writer.add_key_value("studio.metrics", json.dumps(provenance.get("metrics") or {}), gguf.GGUFValueType.STRING)


FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
              "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1"}


def _declare(writer: gguf.GGUFWriter, job: TensorJob) -> None:
    """Tensor infos go before any data, so each tensor is computed and written one at a time afterwards."""
    import gguf

    if job.qtype in ("F32", "F16"):
        dtype = np.float32 if job.qtype == "F32" else np.float16
        writer.add_tensor_info(job.name, job.shape, np.dtype(dtype), job.nbytes)
        return
    qtype = gguf.GGMLQuantizationType[job.qtype]
    byte_shape = gguf.quant_shape_to_byte_shape(job.shape, qtype)
    writer.add_tensor_info(job.name, byte_shape, np.dtype(np.uint8), job.nbytes, raw_dtype=qtype)


def _write_tensors(writer: gguf.GGUFWriter, plan: ExportPlan, parameters: dict[str, Any],
                   cancel: CancelToken | None) -> float:
    largest_change = 0.0
    for job in plan.jobs:
        if cancel is not None:
            cancel.check()
        data = tensor_data(job, parameters[job.parameter])
        if job.how == CODES:
            largest_change = max(largest_change, _check_kept_codes(job, data))
        writer.write_tensor_data(data)
    return largest_change


def tensor_data(job: TensorJob, parameter: Any) -> np.ndarray:
    """The bytes (or floats) of one tensor as it goes into the file."""
    import gguf

    if job.how == CODES:
        return codes_to_blocks(job.quant, job.qtype, job.row_order)
    values = parameter.detach().float().cpu().numpy()
    if job.row_order is not None:
        values = values[job.row_order]
    if job.how == VECTOR:
        return (values + np.float32(job.offset)).astype(np.float32)
    if job.how == DENSE and job.qtype == "F32":
        return np.ascontiguousarray(values, dtype=np.float32)
    if job.how == DENSE and job.qtype == "F16":
        return values.astype(np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), gguf.GGMLQuantizationType[job.qtype])


def _check_kept_codes(job: TensorJob, data: np.ndarray) -> float:
    """How far gguf-py's dequantization of the written blocks is from (codes - zeros) * scales, in quantization
    steps; raises when more than fp16 storage explains."""
    import gguf

    quant = job.quant
    written = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[job.qtype])
    expected = quant.dequantize().float().cpu().numpy()
    width = quant.group_size or expected.shape[1]
    steps = np.repeat(np.abs(quant.scales.float().cpu().numpy()), width, axis=1)
    if job.row_order is not None:
        expected, steps = expected[job.row_order], steps[job.row_order]
    change = float((np.abs(written - expected) / np.maximum(steps, np.finfo(np.float32).tiny)).max())
    if change > 2 * 2**quant.bits * FP16_RELATIVE_ROUNDING:
        raise ExportError(f"Writing the codes of layer '{job.layer}' as {job.qtype} changed a weight by "
                          f"{change:.3g} quantization steps. This is a bug in the GGUF export; please report it "
                          "and export with type F16 meanwhile.")
    return change


# --- loading a written file back --------------------------------------------------------------------


def load_gguf_with_transformers(file: str | Path) -> nn.Module:
    """The file dequantized into a transformers model (float32, eval mode)."""
    from studio.core.export.gguf_check import load_with_transformers

    return load_with_transformers(Path(file))


def __getattr__(name: str) -> Any:
    if name == "LlamaCppLogits":  # an nn.Module subclass, so it is built when first asked for (torch loads late)
        from studio.core.export.gguf_check import llama_cpp_logits_class

        return llama_cpp_logits_class()
    raise AttributeError(name)
