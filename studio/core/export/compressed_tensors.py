"""compressed-tensors: the checkpoint format llm-compressor writes and vLLM and transformers read. A Hugging Face
folder whose config.json carries a `quantization_config` (quant_method "compressed-tensors"): config groups,
each a scheme (weight and input-activation quantization args, a storage format) with the layers it targets,
plus an ignore list; the safetensors hold each quantized layer's tensors instead of its `weight`.

Conventions (compressed-tensors 0.20), all written from the studio's own codes, scales and zero points:
- integers are signed: q = code - 2^(b-1), zero_point = zero - 2^(b-1), so W = (q - zero_point) * scale, the
  same value as the studio's (code - zero) * scale; symmetric schemes store no zero point (it is 0);
- pack-quantized (weight-only, 1-8 bits): `weight_packed` int32 with 32 values in b words along the input
  dimension, `weight_shape` (out, in), `weight_scale` (out, groups); an asymmetric group/channel zero point is
  packed the same way along the output dimension (dim 0);
- int-quantized (W8A8, the inputs quantized at run time per token): `weight` int8 and `weight_scale` (out, 1);
- scales and every tensor that is not quantized are written in a 16-bit float (the model's, else float16);
- the token embedding may be quantized at export (an Embedding target; a tied LM head reads it). transformers
  5.24 with compressed-tensors 0.20 loads an asymmetric or embedding scheme only decompressing at load
  (dequantize=True), and then with one scheme for all layers: `load_compressed_tensors` gives each its own.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.core.errors import ExportError, ModelLoadError
from studio.core.events import CancelToken
from studio.core.state import STATE_ATTR, QuantizedWeight

if TYPE_CHECKING:  # torch and the library load when an export runs, not when the dialog lists formats
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from torch import nn

EXPORT_DTYPES = ("auto", "float16", "bfloat16", "float32")
# The token embedding is quantized asymmetric, per group of 64 columns (per row when that does not divide
# its width): on SmolLM2-135M (tied, so it is the LM head too) 8-bit symmetric per row cost +0.46% perplexity,
# asymmetric per row +0.15%, asymmetric groups of 64 nothing measurable, for 1.3 MB more than per row.
EMBEDDING_GROUP_SIZE = 64
MAX_SHARD_BYTES = 5 * 1024**3
NO_QUANTIZED_LAYER = (
    "compressed-tensors stores quantized weights, and this model has no quantized layer. Run a quantization "
    "recipe first, e.g. `studio run rtn-w4-g64` (or gptq-w4-g64, awq-w4-g64, smoothquant-w8a8), then export "
    "its result; for an unquantized model choose the Hugging Face folder instead."
)
NO_SPARSE_FORMAT = "compressed-tensors 0.20 writes no sparse formats"
PLAIN_LOAD = "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(PATH)"
DEQUANTIZE_LOAD = (
    "from transformers import AutoModelForCausalLM, CompressedTensorsConfig\n"
    "model = AutoModelForCausalLM.from_pretrained(\n"
    "    PATH, quantization_config=CompressedTensorsConfig(dequantize=True))"
)
STUDIO_LOAD = (
    "# several schemes with an asymmetric or embedding one: transformers 5.24 decompresses every layer with the\n"
    "# first scheme, so load it with the studio (transformers' own loader, each layer given its scheme)\n"
    "from studio.core.export.compressed_tensors import load_compressed_tensors\n"
    "model = load_compressed_tensors(PATH)"
)


@dataclass(frozen=True)
class PackedLayer:
    """A module written in quantized form: a studio-quantized linear layer, or the token embedding quantized
    at export."""

    name: str
    quant: QuantizedWeight
    kind: str  # "Linear" or "Embedding"
    input_bits: int | None = None  # per-token dynamic input quantization (SmoothQuant's W8A8)


# --- what can be written ------------------------------------------------------------------------------------


def compressed_tensors_problems(model: nn.Module) -> list[str]:
    """Why `model` cannot be written as compressed-tensors (empty if it can). Cheap: nothing is packed."""
    from torch import nn

    state = getattr(model, STATE_ATTR, None) or {}
    quantized = {name: record.quant for name, record in state.items() if record.quant is not None}
    if not quantized:
        return [NO_QUANTIZED_LAYER]
    modules = dict(model.named_modules())
    problems = []
    float_zeros = [name for name, q in quantized.items() if q.zeros.is_floating_point()]
    if float_zeros:
        problems.append(
            f"Layer {_first_of(float_zeros)} has float zero points (HQQ): compressed-tensors stores integer zero "
            "points only (packed as b-bit integers, the way vLLM's kernels read them), so these codes cannot be "
            "written exactly. Export it as GGUF (Q4_1 keeps a float offset per block) or as the dense Hugging Face "
            "folder, or quantize for compressed-tensors with HQQ's integer zero points (zero_point: integer), "
            "RTN, GPTQ or AWQ."
        )
    not_linear = [name for name in quantized if not isinstance(modules.get(name), nn.Linear)]
    if not_linear:
        name = not_linear[0]
        kind = type(modules[name]).__name__ if name in modules else "missing from the model"
        problems.append(
            f"Layer {_first_of(not_linear)} is {kind}, not a torch Linear layer: compressed-tensors quantizes "
            "Linear (and Embedding) layers only, so GPT-2 style Conv1D layers cannot be written. Export as GGUF or "
            "as the dense Hugging Face folder."
        )
    bad_zeros = [
        name for name, q in quantized.items()
        if not q.zeros.is_floating_point() and (int(q.zeros.min()) < 0 or int(q.zeros.max()) > 2**q.bits - 1)
    ]
    if bad_zeros:
        problems.append(
            f"Layer {_first_of(bad_zeros)} has zero points outside the {quantized[bad_zeros[0]].bits}-bit range, "
            "which compressed-tensors cannot store. Export as GGUF or as the dense Hugging Face folder."
        )
    return problems


def _first_of(names: list[str]) -> str:
    return names[0] + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


# --- the writer ---------------------------------------------------------------------------------------------


def write_compressed_tensors(model: nn.Module, tokenizer: Any, folder: Path, provenance: dict[str, Any],
                             cancel: CancelToken | None = None, *, embedding_bits: int | None = 8,
                             dtype: str = "auto") -> dict[str, Any]:
    """Write `model` into `folder` as compressed-tensors; returns the summary for the report.

    `embedding_bits` (2-8) quantizes the token embedding at export (round to nearest, asymmetric, groups of
    EMBEDDING_GROUP_SIZE columns); None or 16 keeps it unquantized. `dtype` is the float type of the scales
    and the unquantized tensors: "auto" keeps a 16-bit model's own and writes float32 models as float16."""
    if problems := compressed_tensors_problems(model):
        raise ExportError(" ".join(problems))
    export_dtype = _export_dtype(model, dtype)
    packed, dense = _plan_layers(model, _check_embedding_bits(embedding_bits), cancel)
    if not any(layer.kind == "Linear" for layer in packed):
        raise ExportError("No quantized layer's codes still match its weights (a later step changed them all), so "
                          "there is nothing to write as compressed-tensors. Export the dense Hugging Face folder.")
    qconfig, schemes = _quantization_config(model, packed)
    with _ShardWriter(folder) as shards:
        _write_tensors(model, packed, schemes, export_dtype, shards, cancel)
    _write_config(model, folder, qconfig, export_dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return _summary(model, packed, dense, qconfig, export_dtype)


def _check_embedding_bits(bits: int | None) -> int | None:
    if bits is None or bits == 16:
        return None
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ExportError(f"embedding_bits must be between 2 and 8, or 16 / None to keep the token embedding "
                          f"unquantized; got {bits!r}.")
    return bits


def _export_dtype(model: nn.Module, name: str) -> torch.dtype:
    import torch

    if name not in EXPORT_DTYPES:
        raise ExportError(f"Unknown dtype '{name}' for the compressed-tensors export: choose one of "
                          f"{', '.join(EXPORT_DTYPES)}.")
    if name != "auto":
        return getattr(torch, name)
    model_dtype = next(model.parameters()).dtype
    # float16 over bfloat16 for float32 models: three more mantissa bits for every scale
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16


def _plan_layers(model: nn.Module, embedding_bits: int | None, cancel: CancelToken | None
                 ) -> tuple[list[PackedLayer], dict[str, str]]:
    """The layers written quantized, and every other Linear layer with the reason it is written dense."""
    from torch import nn

    from studio.methods.activation_quant import input_quantization

    state = getattr(model, STATE_ATTR, None) or {}
    inputs = input_quantization(model)
    embedding_weight = model.get_input_embeddings().weight
    packed, dense = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        record = state.get(name)
        if cancel is not None:
            cancel.check()
        if record is not None and record.quant is not None and record.quant.describes(module.weight):
            bits = inputs.get(name, {}).get("bits")
            packed.append(PackedLayer(name, record.quant, "Linear", bits if bits is not None and bits < 16 else None))
        elif record is not None and record.quant is not None:
            dense[name] = "its weights changed after quantization (written dense)"
        elif record is not None and record.packed_mask is not None:
            dense[name] = f"pruned ({record.sparsity_pattern or 'unstructured'}), not quantized: {NO_SPARSE_FORMAT}"
        elif module.weight is embedding_weight:
            dense[name] = "tied to the token embedding"
        else:
            dense[name] = "not quantized by the recipe"
    if embedding_bits is not None:
        packed.append(_quantized_embedding(model, embedding_bits))
    return packed, dense


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _quantized_embedding(model: nn.Module, bits: int) -> PackedLayer:
    from studio.methods.grid import quantize_rtn

    embedding = model.get_input_embeddings()
    width = embedding.weight.shape[1]
    group_size = EMBEDDING_GROUP_SIZE if width % EMBEDDING_GROUP_SIZE == 0 else 0
    quant = quantize_rtn(embedding.weight.data, bits, group_size, symmetric=False)
    return PackedLayer(_module_name(model, embedding), quant, "Embedding")


# --- the quantization config --------------------------------------------------------------------------------


def _weight_args(quant: QuantizedWeight) -> QuantizationArgs:
    from compressed_tensors.quantization import QuantizationArgs

    if quant.group_size:
        return QuantizationArgs(num_bits=quant.bits, type="int", symmetric=quant.symmetric, strategy="group",
                                group_size=quant.group_size)
    return QuantizationArgs(num_bits=quant.bits, type="int", symmetric=quant.symmetric, strategy="channel")


def _input_args(bits: int | None) -> QuantizationArgs | None:
    from compressed_tensors.quantization import QuantizationArgs

    if bits is None:
        return None
    # the studio rounds each token's input on its own symmetric grid at run time (activation_quant)
    return QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="token", dynamic=True)


def _scheme_key(layer: PackedLayer) -> tuple:
    q = layer.quant
    return q.bits, q.group_size, q.symmetric, layer.input_bits


def _quantization_config(model: nn.Module, packed: list[PackedLayer]
                         ) -> tuple[QuantizationConfig, dict[str, QuantizationScheme]]:
    """Layers with identical settings share a config group. A group's Linear layers are targeted by class
    ("Linear", with the ignore list naming the others) when it is the only group holding Linear layers, else by
    exact name; the token embedding by class when it is the model's only Embedding, else by name (OPT's
    learned positions are Embedding layers too)."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from torch import nn

    grouped: dict[tuple, list[PackedLayer]] = {}
    for layer in packed:
        grouped.setdefault(_scheme_key(layer), []).append(layer)
    linear_groups = sum(any(layer.kind == "Linear" for layer in members) for members in grouped.values())
    embeddings = sum(isinstance(m, nn.Embedding) for m in model.modules())
    config_groups, schemes, formats = {}, {}, set()
    for index, members in enumerate(grouped.values()):
        targets = []
        linears = [layer.name for layer in members if layer.kind == "Linear"]
        if linears:
            targets += ["Linear"] if linear_groups == 1 else linears
        if any(layer.kind == "Embedding" for layer in members):
            targets += ["Embedding"] if embeddings == 1 else [next(m.name for m in members if m.kind == "Embedding")]
        first = members[0]
        scheme = QuantizationScheme(targets=targets, weights=_weight_args(first.quant),
                                    input_activations=_input_args(first.input_bits))
        module_type = nn.Linear if linears else nn.Embedding
        scheme.format = infer_module_format(module_type, scheme).value
        formats.add(scheme.format)
        config_groups[f"group_{index}"] = scheme
        schemes.update({layer.name: scheme for layer in members})
    qconfig = QuantizationConfig(
        config_groups=config_groups,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
        ignore=_ignored_linears(model, schemes),
    )
    return qconfig, schemes


def _ignored_linears(model: nn.Module, schemes: dict[str, QuantizationScheme]) -> list[str]:
    from torch import nn

    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in schemes]


# --- the tensors --------------------------------------------------------------------------------------------


def _signed(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The studio's unsigned codes (or integer zero points) in compressed-tensors' signed domain."""
    import torch

    return (values.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)


def compressed_layer_tensors(quant: QuantizedWeight, scheme: QuantizationScheme, dtype: torch.dtype
                             ) -> dict[str, torch.Tensor]:
    """One layer's tensors (names local to the layer) in the scheme's format, from the studio's codes."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = _signed(quant.codes, quant.bits)
    tensors = {"weight_scale": quant.scales.to(dtype).contiguous()}
    if scheme.format == "pack-quantized":
        tensors["weight_packed"] = pack_to_int32(codes, quant.bits)
        tensors["weight_shape"] = torch.tensor(tuple(quant.shape))
    else:  # int-quantized: one int8 per weight
        tensors["weight"] = codes.contiguous()
    if not quant.symmetric:
        zeros = _signed(quant.zeros, quant.bits)
        tensors["weight_zero_point"] = (
            pack_to_int32(zeros, quant.bits, packed_dim=0) if scheme.format == "pack-quantized" else zeros
        ).contiguous()
    return tensors


def _write_tensors(model: nn.Module, packed: list[PackedLayer], schemes: dict[str, QuantizationScheme],
                   dtype: torch.dtype, shards: _ShardWriter, cancel: CancelToken | None) -> None:
    """Every tensor of the state dict once, in its order: a quantized layer's weight replaced by its compressed
    tensors, tied duplicates (the LM head sharing the embedding) skipped, the rest cast to `dtype`."""
    layers = {layer.name: layer for layer in packed}
    seen: set[tuple] = set()
    for key, tensor in model.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        identity = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if leaf == "weight" and module_name in layers:
            if cancel is not None:
                cancel.check()
            layer = layers[module_name]
            for local, value in compressed_layer_tensors(layer.quant, schemes[layer.name], dtype).items():
                shards.add(f"{module_name}.{local}", value)
        elif identity not in seen or not tensor.numel():
            shards.add(key, tensor.to(dtype) if tensor.is_floating_point() else tensor)
        seen.add(identity)


class _ShardWriter:
    """safetensors files of at most MAX_SHARD_BYTES, written as they fill so only one shard is held in memory:
    `model.safetensors`, or `model-0000i-of-0000n.safetensors` with the index transformers reads."""

    def __init__(self, folder: Path, max_bytes: int | None = None):
        self.folder, self.max_bytes = folder, max_bytes or MAX_SHARD_BYTES
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.detach().cpu().contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f"model-part-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            self.files[0][0].rename(self.folder / "model.safetensors")
            return
        count, weight_map = len(self.files), {}
        for index, (path, names) in enumerate(self.files, 1):
            final = f"model-{index:05d}-of-{count:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index_file = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2), encoding="utf-8")


# --- config, summary ----------------------------------------------------------------------------------------


def _write_config(model: nn.Module, folder: Path, qconfig: QuantizationConfig, dtype: torch.dtype) -> None:
    """config.json from the model's config with `quantization_config` added by the library itself (version,
    quant_method, the config groups…), and the generation config when the model has one."""
    from compressed_tensors.compressors import ModelCompressor

    config = copy.deepcopy(model.config)
    config.dtype = dtype
    config.architectures = config.architectures or [type(model).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a model loaded from a quantized checkpoint: ours replaces it
    config.save_pretrained(folder)
    ModelCompressor(quantization_config=qconfig).update_config(str(folder))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)


def _describe_args(args: QuantizationArgs | None) -> str | None:
    if args is None:
        return None
    if args.strategy == "group":
        grid = f"groups of {args.group_size}"
    else:
        grid = {"channel": "per output channel", "token": "per token"}.get(args.strategy, args.strategy)
    symmetry = "symmetric" if args.symmetric else "asymmetric"
    return f"int{args.num_bits} {grid}, {symmetry}" + (", dynamic" if args.dynamic is True else "")


def _summary(model: nn.Module, packed: list[PackedLayer], dense: dict[str, str], qconfig: QuantizationConfig,
             dtype: torch.dtype) -> dict[str, Any]:
    import compressed_tensors

    groups = {
        name: {"weights": _describe_args(scheme.weights), "input_activations": _describe_args(scheme.input_activations),
               "format": scheme.format, "targets": scheme.targets if len(scheme.targets) <= 4 else
               f"{len(scheme.targets)} layers by name"}
        for name, scheme in qconfig.config_groups.items()
    }
    embedding = next((layer for layer in packed if layer.kind == "Embedding"), None)
    summary: dict[str, Any] = {
        "weights": "compressed-tensors",
        "quantization": {"format": qconfig.format, "library": f"compressed-tensors {compressed_tensors.__version__}",
                         "dtype": str(dtype).removeprefix("torch."), "groups": groups},
        "layers_packed": sum(layer.kind == "Linear" for layer in packed),
        "layers_dense": dense,
        "embedding": _embedding_note(model, embedding, dtype),
        "how_to_load": how_to_load(qconfig, quantized_embedding=embedding is not None),
    }
    records = getattr(model, STATE_ATTR, None) or {}
    pruned = [name for name, record in records.items() if record.packed_mask is not None]
    if pruned:
        summary["sparsity"] = (f"{len(pruned)} pruned layers are written without sparse compression "
                               f"({NO_SPARSE_FORMAT}); quantized ones keep their zeros as codes")
    return summary


def _embedding_note(model: nn.Module, embedding: PackedLayer | None, dtype: torch.dtype) -> str:
    tied = getattr(model.config, "tie_word_embeddings", False)
    if embedding is None:
        return f"token embedding kept in {str(dtype).removeprefix('torch.')}"
    q = embedding.quant
    grid = f"groups of {q.group_size}" if q.group_size else "per row"
    symmetry = "symmetric" if q.symmetric else "asymmetric"
    return (f"{embedding.name}: quantized at export to int{q.bits} {grid}, {symmetry}, round to nearest (no "
            "studio step quantized it)" + ("; the tied LM head reads the same codes" if tied else ""))


def how_to_load(qconfig: QuantizationConfig, quantized_embedding: bool) -> str:
    """The snippet that loads this checkpoint with transformers 5.24 and compressed-tensors 0.20. Their default
    path (layers compressed on load, decompressed on the first forward) loads symmetric Linear schemes only; an
    asymmetric zero point or a quantized embedding needs dequantize=True, which decompresses every layer with
    the first group's scheme, so several groups then need the studio's loader."""
    groups = list(qconfig.config_groups.values())
    if not quantized_embedding and all(group.weights.symmetric for group in groups):
        return PLAIN_LOAD
    return DEQUANTIZE_LOAD if len(groups) == 1 else STUDIO_LOAD


# --- the consumer path --------------------------------------------------------------------------------------


def load_compressed_tensors(folder: str | Path, dtype: str = "float32") -> nn.Module:
    """Load an export with transformers' compressed-tensors support, decompressed to dense weights
    (`dequantize=True`, what `run_compressed=False` meant before transformers 5 deprecated it; without it the
    layers keep their packed tensors and decompress on the first forward, which transformers 5.24 with
    compressed-tensors 0.20 cannot do for asymmetric zero points or a quantized embedding). Each layer is
    decompressed with its own config group's scheme, and layers whose scheme quantizes their inputs get the
    studio's per-token rounding (what vLLM's int8 kernels compute), so the model computes what was exported.
    `dtype`: "float32" (CPU), "float16", "bfloat16" or "auto" (the checkpoint's)."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    folder = Path(folder)
    qconfig = read_quantization_config(folder)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        with _schemes_resolved_per_layer():
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch_dtype, quantization_config=CompressedTensorsConfig(dequantize=True)
            )
    _quantize_inputs_as_exported(model, qconfig)
    return model.eval().requires_grad_(False)


def read_quantization_config(folder: Path) -> QuantizationConfig:
    from compressed_tensors.quantization import QuantizationConfig

    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"'{folder}' is not a compressed-tensors folder: its config.json has no readable "
                             f"quantization_config ({exc}).") from exc
    return QuantizationConfig.model_validate(data)


@contextmanager
def _schemes_resolved_per_layer() -> Iterator[None]:
    """transformers 5.24's dequantize-on-load picks the first config group's scheme for every layer; while
    this is active each layer gets the scheme of the group that targets it (the library's own matching)."""
    from compressed_tensors.utils.match import is_match
    from transformers.integrations.compressed_tensors import CompressedTensorsDequantize
    from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer

    class PerLayerDequantize(CompressedTensorsDequantize):
        def convert(self, input_dict, source_patterns, target_patterns, full_layer_name=None, **kwargs):
            if self.scheme is not None or full_layer_name is None or "model" not in kwargs:
                return super().convert(input_dict, source_patterns, target_patterns,
                                       full_layer_name=full_layer_name, **kwargs)
            qconfig = self.hf_quantizer.compressor.quantization_config
            name = full_layer_name.rpartition(".")[0]
            module = kwargs["model"].get_submodule(name)
            self.scheme = next((s for s in qconfig.config_groups.values()
                                if is_match(name, module, s.targets, qconfig.ignore)), None)
            try:
                return super().convert(input_dict, source_patterns, target_patterns,
                                       full_layer_name=full_layer_name, **kwargs)
            finally:
                self.scheme = None

    original = CompressedTensorsHfQuantizer.get_load_operations
    CompressedTensorsHfQuantizer.get_load_operations = lambda self: {"dequantize": PerLayerDequantize}
    try:
        yield
    finally:
        CompressedTensorsHfQuantizer.get_load_operations = original


def _quantize_inputs_as_exported(model: nn.Module, qconfig: QuantizationConfig) -> None:
    from compressed_tensors.utils.match import match_named_modules

    from studio.methods.activation_quant import quantize_inputs

    for scheme in qconfig.config_groups.values():
        args = scheme.input_activations
        if args is None:
            continue
        if not (args.type == "int" and args.symmetric and args.dynamic is True and args.strategy == "token"):
            raise ModelLoadError(f"The input quantization {_describe_args(args)} of config group {scheme.targets} "
                                 "is not one the studio can simulate (int, symmetric, dynamic, per token).")
        for _, module in match_named_modules(model, scheme.targets, qconfig.ignore):
            quantize_inputs(module, args.num_bits)
