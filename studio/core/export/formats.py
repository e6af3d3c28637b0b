"""The export formats, listed without loading torch (the export dialog shows them at once)."""

from __future__ import annotations

from dataclasses import dataclass

GGUF_TYPES = ("auto", "F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


@dataclass(frozen=True)
class ExportFormat:
    id: str
    name: str
    description: str
    writer: str  # "module:function" under studio.core.export, imported when used
    single_file_suffix: str | None = None  # a destination ending in it is written as one file


EXPORT_FORMATS: tuple[ExportFormat, ...] = (
    ExportFormat("hf-safetensors", "Hugging Face folder (safetensors)",
                 "Dense weights (with the shapes structured pruning and layer dropping left), config, tokenizer, "
                 "recipe, report and model card: loads with plain transformers.", "hf:write_hf_folder"),
    ExportFormat("compressed-tensors", "compressed-tensors",
                 "Packed int4 / int8 weights (W4A16, W8A16, W8A8) in the format vLLM and transformers read for "
                 "llm-compressor checkpoints; needs a quantized model.",
                 "compressed_tensors:write_compressed_tensors"),
    ExportFormat("gguf", "GGUF", "One file for llama.cpp and its tools (F32, F16, BF16, Q8_0, Q5_x, Q4_x); "
                 "the studio's own 4/5/8-bit codes are written as they are where the block layout allows.",
                 "gguf_file:write_gguf", single_file_suffix=".gguf"),
)


def export_format(format_id: str) -> ExportFormat:
    for fmt in EXPORT_FORMATS:
        if fmt.id == format_id:
            return fmt
    known = ", ".join(f.id for f in EXPORT_FORMATS)
    from studio.core.errors import ExportError

    raise ExportError(f"Unknown export format '{format_id}'. Choose one of: {known}.")
