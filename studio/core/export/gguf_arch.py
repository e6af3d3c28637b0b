"""What llama.cpp expects of each architecture the GGUF writer supports: its name, the hyperparameter keys
it reads, and how weights differ from transformers' (llama's q/k row order, Gemma's norm offset, the
optional biases its loader knows). Tensor names come from gguf-py's own HF-to-GGUF name map."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from studio.core.errors import ExportError

if TYPE_CHECKING:
    import gguf

# llama.cpp loads a bias for these only where its architecture has the optional tensor.
QKV = frozenset({"attn_q", "attn_k", "attn_v"})
LLAMA_BIASES = QKV | {"attn_output", "ffn_gate", "ffn_up", "ffn_down"}


@dataclass(frozen=True)
class GgufArch:
    name: str  # llama.cpp's architecture name
    permute_qk: bool  # llama.cpp's llama rotates interleaved pairs; transformers rotates two halves
    norm_offset: float  # Gemma's RMSNorm multiplies by (1 + w); GGUF stores 1 + w
    biases: frozenset[str]
    sliding_window: bool = False


ARCHITECTURES = {
    "llama": GgufArch("llama", True, 0.0, LLAMA_BIASES),
    "qwen2": GgufArch("qwen2", False, 0.0, QKV),
    "gemma": GgufArch("gemma", False, 1.0, QKV),
    "gemma2": GgufArch("gemma2", False, 1.0, QKV, sliding_window=True),
    "gemma3_text": GgufArch("gemma3", False, 1.0, QKV, sliding_window=True),
}
SUPPORTED = "llama (incl. SmolLM), qwen2, gemma, gemma2, gemma3 (text)"


def architecture_of(model: Any) -> GgufArch:
    model_type = getattr(model.config, "model_type", "?")
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise ExportError(
            f"GGUF export does not support the '{model_type}' architecture ({type(model).__name__}). Supported: "
            f"{SUPPORTED}. Export it as a Hugging Face folder instead, and convert it with llama.cpp's "
            "convert_hf_to_gguf.py if llama.cpp knows the architecture."
        )
    return arch


def tensor_name_map(arch: GgufArch, blocks: int) -> gguf.TensorNameMap:
    import gguf

    (key,) = [k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.name]
    return gguf.get_tensor_name_map(key, blocks)


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def qk_row_order(rows: int, heads: int) -> np.ndarray:
    """Row order that turns transformers' [first halves | second halves] rotary layout of each head into the
    interleaved pairs llama.cpp's llama rotates: new row i is old row order[i]."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def check_width(arch: GgufArch, config: Any, parameter: str, kind: str, shape: tuple[int, ...]) -> None:
    """llama.cpp builds every block from the hyperparameters, so each weight must have the widths the config
    gives (structured pruning keeps them uniform and rewrites the config)."""
    dim = head_dim(config)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    expected = {"attn_q": (0, config.num_attention_heads * dim), "attn_k": (0, kv_heads * dim),
                "attn_v": (0, kv_heads * dim), "attn_output": (1, config.num_attention_heads * dim),
                "ffn_gate": (0, config.intermediate_size), "ffn_up": (0, config.intermediate_size),
                "ffn_down": (1, config.intermediate_size)}.get(kind)
    if expected is not None and len(shape) == 2 and shape[expected[0]] != expected[1]:
        raise ExportError(f"'{parameter}' has shape {tuple(shape)} but the model's config describes "
                          f"{expected[1]} {'rows' if expected[0] == 0 else 'columns'}; llama.cpp builds every "
                          "block from the config, so a GGUF file needs the same widths in every block.")
    if arch.name == "qwen2" and config.num_attention_heads * dim != config.hidden_size:
        raise ExportError(f"llama.cpp's qwen2 needs attention heads × head size = hidden size, but this model has "
                          f"{config.num_attention_heads} × {dim} ≠ {config.hidden_size} (attention heads were "
                          "pruned). Prune with head_ratio 0 for a GGUF export, or export a Hugging Face folder.")


def rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """transformers 5 keeps rope settings in `rope_parameters` (per layer type for Gemma 3); older configs in
    rope_theta / rope_scaling."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    elif isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]
    merged = dict(getattr(config, "rope_scaling", None) or {})
    merged.update(params)
    merged.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return merged


def write_hyperparameters(writer: gguf.GGUFWriter, arch: GgufArch, config: Any) -> list[str]:
    """The {arch}.* keys llama.cpp reads; returns warnings about settings llama.cpp would not reproduce."""
    warnings: list[str] = []
    dim = head_dim(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    if arch.name == "llama":
        writer.add_rope_dimension_count(dim)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    warnings += _rope_scaling(writer, rope)
    if arch.sliding_window:
        warnings += _gemma_attention(writer, arch, config)
    return warnings


def _rope_scaling(writer: gguf.GGUFWriter, rope: dict[str, Any]) -> list[str]:
    import gguf

    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return []
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        return []
    if kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        if rope.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        return []
    raise ExportError(
        f"The model's rope scaling '{kind}' is not written by the studio's GGUF export (it writes default, "
        "linear and yarn). Export a Hugging Face folder and convert it with llama.cpp's convert_hf_to_gguf.py."
    )


def _gemma_attention(writer: gguf.GGUFWriter, arch: GgufArch, config: Any) -> list[str]:
    warnings = []
    layer_types = getattr(config, "layer_types", None)
    if getattr(config, "sliding_window", None) and layer_types:
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        if arch.name == "gemma3":
            local = rope_parameters(config, "sliding_attention")
            writer.add_rope_freq_base_swa(float(local["rope_theta"]))
    for key, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                     ("final_logit_softcapping", writer.add_final_logit_softcapping)):
        if getattr(config, key, None):
            add(float(getattr(config, key)))
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and scalar != head_dim(config) and config.num_hidden_layers not in (46, 62):
        warnings.append(f"query_pre_attn_scalar is {scalar} but llama.cpp scales attention by the head size "
                        f"{head_dim(config)} for this Gemma size: llama.cpp's outputs will differ from transformers'.")
    return warnings
