"""The tokenizer inside a GGUF file, so llama.cpp's tools run it without anything beside it.

Best fidelity: a model loaded from a GGUF file gets that file's tokenizer.* key-values copied as they are.
Otherwise the tokenizer is rebuilt from the transformers tokenizer: byte-level BPE as llama.cpp's "gpt2"
model (tokens, merges, and a pre-tokenizer type recognised from tokenizer.json's pre-tokenizer), byte-fallback
BPE and Unigram as its SentencePiece "llama" model (tokens, scores, token types)."""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.core.errors import ExportError

if TYPE_CHECKING:
    import gguf

log = logging.getLogger(__name__)

SPECIAL_KINDS = ("bos", "eos", "unk", "pad")


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, source_info: dict[str, Any], n_vocab: int,
                  warnings: list[str]) -> str:
    """Writes the tokenizer.* keys; returns how the tokenizer was obtained, for the summary."""
    source = Path(str(source_info.get("path") or ""))
    if source.suffix.lower() == ".gguf" and source.is_file():
        copied = copy_tokenizer_keys(writer, source, n_vocab)
        if copied:
            return f"copied from {source.name}"
        warnings.append(f"The tokenizer of {source.name} has a different vocabulary size than the model "
                        f"({n_vocab}); it was rebuilt from the transformers tokenizer instead.")
    if tokenizer is None:
        raise ExportError("The model has no tokenizer, and llama.cpp needs one inside the GGUF file. Load the "
                          "model from a folder or GGUF file that has a tokenizer, then export again.")
    return build_tokenizer_keys(writer, tokenizer, n_vocab, warnings)


def copy_tokenizer_keys(writer: gguf.GGUFWriter, source: Path, n_vocab: int) -> bool:
    import gguf

    reader = gguf.GGUFReader(str(source))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != n_vocab:
        return False
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            writer.add_key_value(key, *_field_value(field))
    return True


def _field_value(field: Any) -> tuple[Any, Any, Any]:
    """(value, type, array item type) of a GGUFReader field, strings as raw bytes so nothing is re-encoded."""
    import gguf

    main = field.types[0]
    if main == gguf.GGUFValueType.ARRAY:
        item = field.types[-1]
        if item == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]) for i in field.data], main, item
        return [v.item() for i in field.data for v in field.parts[i]], main, item
    if main == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]), main, None
    return field.parts[field.data[0]][0].item(), main, None


def build_tokenizer_keys(writer: gguf.GGUFWriter, tokenizer: Any, n_vocab: int, warnings: list[str]) -> str:
    import gguf

    with tempfile.TemporaryDirectory(prefix="studio-vocab-") as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")) \
            if (folder / "tokenizer.json").is_file() else None
        if spec is None:
            raise ExportError("The tokenizer has no tokenizer.json (a 'fast' tokenizer), which the GGUF export "
                              "reads. Load the model with its fast tokenizer and export again.")
        model = spec.get("model", {})
        kind = model.get("type")
        if kind == "BPE" and not model.get("byte_fallback"):
            described = _byte_level_bpe(writer, tokenizer, spec, n_vocab, warnings)
            special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
        elif kind in ("BPE", "Unigram"):
            described = _sentencepiece_like(writer, tokenizer, spec, n_vocab)
            special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=n_vocab)
        else:
            raise ExportError(f"The tokenizer's model is '{kind}', which the GGUF export cannot describe to "
                              "llama.cpp (it writes byte-level BPE, byte-fallback BPE and Unigram).")
        _special_tokens(special, tokenizer)
        special.add_to_gguf(writer, quiet=True)
    return described


def _special_tokens(special: Any, tokenizer: Any) -> None:
    """Ids, add_bos and chat template from the live tokenizer, which is what the studio itself tokenizes with."""
    for kind in SPECIAL_KINDS:
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            special.special_token_ids[kind] = int(token_id)
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = bos is not None and bool(ids) and ids[0] == bos
    special.add_special_token["eos"] = bool(ids) and ids[-1] == getattr(tokenizer, "eos_token_id", None)
    if getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template


def _token_texts(tokenizer: Any, n_vocab: int) -> list[str]:
    size = len(tokenizer)
    if size > n_vocab:
        raise ExportError(f"The tokenizer has {size} tokens but the model's embedding only {n_vocab} rows; "
                          "they do not belong together.")
    texts = tokenizer.convert_ids_to_tokens(list(range(size)))
    # Embedding rows beyond the tokenizer (vocabularies padded to a round size) get placeholder tokens.
    return [t if t is not None else f"[PAD{i}]" for i, t in enumerate(texts)] + \
        [f"[PAD{i}]" for i in range(size, n_vocab)]


def _token_types(tokenizer: Any, texts: list[str]) -> list[int]:
    import gguf

    size = len(tokenizer)  # computed, not stored, by transformers: once, not per token
    special_ids = set(getattr(tokenizer, "all_special_ids", []))
    added = dict(getattr(tokenizer, "added_tokens_decoder", {}))
    byte_token = re.compile(r"<0x[0-9A-Fa-f]{2}>")
    types = []
    for i, text in enumerate(texts):
        if i >= size:
            types.append(gguf.TokenType.UNUSED)
        elif i in special_ids or (i in added and getattr(added[i], "special", False)):
            types.append(gguf.TokenType.CONTROL)
        elif i in added:
            types.append(gguf.TokenType.USER_DEFINED)
        elif byte_token.fullmatch(text):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return types


def _byte_level_bpe(writer: gguf.GGUFWriter, tokenizer: Any, spec: dict, n_vocab: int,
                    warnings: list[str]) -> str:
    texts = _token_texts(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")
    pre = bpe_pre_tokenizer(spec)
    if pre == "default":
        warnings.append("The tokenizer's pre-tokenizer is not one the GGUF export recognises; it was written as "
                        "llama.cpp's 'default', so llama.cpp may split text differently from transformers.")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(texts)
    writer.add_token_types(_token_types(tokenizer, texts))
    return f"built from the HF tokenizer (gpt2 BPE, pre={pre})"


def _sentencepiece_like(writer: gguf.GGUFWriter, tokenizer: Any, spec: dict, n_vocab: int) -> str:
    """llama.cpp's SentencePiece tokenizer merges the pair whose result has the highest score: a Unigram model
    carries its scores; a byte-fallback BPE converted from SentencePiece lists pieces in merge order, so minus
    the id ranks them the same way."""
    texts = _token_texts(tokenizer, n_vocab)
    model = spec["model"]
    if model["type"] == "Unigram":
        scores = [float(score) for _, score in model["vocab"]]
    else:
        scores = [-float(i) for i in range(len(texts))]
    scores += [-1e9] * (n_vocab - len(scores))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(texts)
    writer.add_token_scores(scores[:n_vocab])
    writer.add_token_types(_token_types(tokenizer, texts))
    writer.add_add_space_prefix(_adds_space_prefix(spec))
    return "built from the HF tokenizer (SentencePiece-style llama vocabulary)"


def _adds_space_prefix(spec: dict) -> bool:
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or '"prepend_scheme": "always"' in text


def bpe_pre_tokenizer(spec: dict) -> str:
    """llama.cpp names each pre-tokenizer regex it implements; recognise the common ones from tokenizer.json.
    GPT-2 splits with ByteLevel's own regex; SmolLM (like StarCoder) first splits digits one by one; Llama 3
    and Qwen2 give an explicit Split regex that keeps up to three digits together (Llama 3) or one (Qwen2)."""
    steps = _flatten(spec.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    byte_level_regex = any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps)
    if kinds == ["ByteLevel"] and byte_level_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level_regex:
        return "smollm"
    pattern = next((s.get("pattern", {}).get("Regex", "") for s in steps if s.get("type") == "Split"), "")
    if r"\p{N}{1,3}" in pattern:
        return "llama-bpe"
    if "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in pattern and r"|\p{N}|" in pattern:
        return "qwen2"
    return "default"


def _flatten(pre_tokenizer: dict | None) -> list[dict]:
    if not pre_tokenizer:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return [step for inner in pre_tokenizer.get("pretokenizers", []) for step in _flatten(inner)]
    return [pre_tokenizer]
