"""The compressed-tensors export: the studio's own codes written in the library's conventions (checked by
unpacking them with the library), the quantization config transformers reads, reloading with transformers to
the same logits as the model in memory, the token embedding quantized at export, and the errors."""

import json

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from conftest import tiny_model
from studio.core.calibration import CalibrationSettings
from studio.core.errors import Cancelled, ExportError
from studio.core.events import CancelToken
from studio.core.export import export_model
from studio.core.export import compressed_tensors as ct
from studio.core.export.compressed_tensors import (
    DEQUANTIZE_LOAD, PLAIN_LOAD, STUDIO_LOAD, compressed_tensors_problems, load_compressed_tensors,
    read_quantization_config,
)
from studio.core.loading import LoadedModel
from studio.core.recipe import Recipe, Step
from studio.core.runner import run_recipe
from studio.core.state import compression_state
from studio.core.structure import TargetSpec
from studio.methods.activation_quant import input_quantization
from studio.methods.grid import quantize_rtn

EXACT = {"embedding_bits": None, "dtype": "float32"}  # float32 scales: the reload is the model in memory, bit for bit
IDS = torch.arange(3, 40)[None]


def compress(kind, steps, tokenizer, text_file=None):
    calibration = CalibrationSettings(text_file=str(text_file), samples=4, seq_len=16) if text_file else None
    recipe = Recipe(steps, calibration=calibration) if calibration else Recipe(steps)
    result = run_recipe(recipe, LoadedModel(tiny_model(kind), tokenizer, {}))
    assert result.status == "finished", result.error
    return result.model, recipe


def export(model, tokenizer, out, **options):
    return export_model(model, tokenizer, out, format="compressed-tensors", options=options)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def quantization_config(folder):
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def layer_tensors(folder, name):
    tensors = load_file(folder / "model.safetensors")
    return {key.removeprefix(name + "."): value for key, value in tensors.items() if key.startswith(name + ".")}


CASES = {
    "rtn-w4-g32-sym": ("llama", [Step("rtn", {"bits": 4, "group_size": 32, "symmetric": True})], False),
    "rtn-w4-g32-asym": ("llama", [Step("rtn", {"bits": 4, "group_size": 32, "symmetric": False})], False),
    "rtn-w8-channel": ("qwen2", [Step("rtn", {"bits": 8, "group_size": 0, "symmetric": True})], False),
    "rtn-w4-channel-asym": ("qwen2", [Step("rtn", {"bits": 4, "group_size": 0, "symmetric": False})], False),
    "rtn-w3-g32-asym": ("qwen2", [Step("rtn", {"bits": 3, "group_size": 32, "symmetric": False})], False),
    "gptq-w4-g32-asym": ("llama", [Step("gptq", {"bits": 4, "group_size": 32, "symmetric": False})], True),
    "smoothquant-w8a8": ("llama", [Step("smoothquant", {})], True),
    "mixed-w4-w8": ("llama", [Step("rtn", {"bits": 4, "group_size": 32}, TargetSpec(("*.self_attn.*",))),
                              Step("rtn", {"bits": 8, "group_size": 0}, TargetSpec(("*.mlp.*",)))], False),
}


def assert_written_as_the_studio_quantized(model, folder):
    """Each layer's scheme has the studio's settings, and the library unpacks the studio's own codes."""
    qconfig = read_quantization_config(folder)
    schemes = {name: scheme for scheme in qconfig.config_groups.values() for name in scheme.targets}
    for name, record in compression_state(model).items():
        q = record.quant
        scheme = schemes.get(name) or schemes["Linear"]
        args = scheme.weights
        assert (args.num_bits, args.symmetric, args.type) == (q.bits, q.symmetric, "int")
        assert (args.strategy, args.group_size) == (("group", q.group_size) if q.group_size else ("channel", None))
        tensors = layer_tensors(folder, name)
        offset = 2 ** (q.bits - 1)
        if scheme.format == "pack-quantized":
            codes = unpack_from_int32(tensors["weight_packed"], q.bits, tensors["weight_shape"])
            assert tensors["weight_shape"].tolist() == list(q.codes.shape)
        else:
            codes = tensors["weight"]
            assert codes.dtype == torch.int8 and "weight_zero_point" not in tensors
        assert torch.equal(codes.int() + offset, q.codes.int())
        assert ("weight_zero_point" in tensors) == (not q.symmetric)
        if not q.symmetric:
            zeros = unpack_from_int32(tensors["weight_zero_point"], q.bits, q.zeros.shape, packed_dim=0)
            assert torch.equal(zeros.int() + offset, q.zeros.int())
        dense = BaseCompressor.get_value_from_registry(scheme.format).decompress(tensors, scheme)["weight"]
        assert torch.equal(dense, q.dequantize())


@pytest.mark.parametrize("case", list(CASES))
def test_the_reload_computes_what_the_model_in_memory_computes(case, tmp_path, tokenizer, text_file):
    kind, steps, calibrated = CASES[case]
    model, _ = compress(kind, steps, tokenizer, text_file if calibrated else None)
    out = export(model, tokenizer, tmp_path / "out", **EXACT).path

    assert_written_as_the_studio_quantized(model, out)
    reloaded = load_compressed_tensors(out)
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-5)
    assert input_quantization(reloaded).keys() == input_quantization(model).keys()
    assert (out / "tokenizer.json").exists() and (out / "report.json").exists()

    config = quantization_config(out)
    assert config["quant_method"] == "compressed-tensors" and config["quantization_status"] == "compressed"
    assert config["version"] and config["ignore"] == ["lm_head"]
    state = compression_state(model)
    groups = config["config_groups"]
    assert sum(len(g["targets"]) for g in groups.values()) == (1 if len(groups) == 1 else len(state))
    for group in groups.values():
        assert group["format"] == ("int-quantized" if group["input_activations"] else "pack-quantized")
    if case == "smoothquant-w8a8":
        (group,) = groups.values()
        assert group["weights"] | {"num_bits": 8, "strategy": "channel", "symmetric": True} == group["weights"]
        assert group["input_activations"] | {"num_bits": 8, "strategy": "token", "dynamic": True,
                                             "symmetric": True, "type": "int"} == group["input_activations"]


def test_plain_transformers_loads_a_symmetric_export_in_float16(tmp_path, tokenizer):
    model, recipe = compress("llama", CASES["rtn-w4-g32-sym"][1], tokenizer)
    result = export_model(model, tokenizer, tmp_path / "out", format="compressed-tensors", recipe=recipe,
                          options={"embedding_bits": None})
    assert result.export["how_to_load"] == PLAIN_LOAD
    assert result.export["quantization"]["dtype"] == "float16" and result.export["layers_packed"] == 21
    assert result.export["layers_dense"] == {"lm_head": "tied to the token embedding"}
    config = json.loads((result.path / "config.json").read_text())
    assert config["dtype"] == "float16" and (result.path / "generation_config.json").exists()

    reloaded = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32)
    out = logits(reloaded)  # the first forward decompresses the packed layers
    q = compression_state(model)["model.layers.1.mlp.down_proj"].quant
    expected = (q.codes.float().view(64, 4, 32) - q.zeros.float()[..., None]) * q.scales.half().float()[..., None]
    assert torch.equal(reloaded.model.layers[1].mlp.down_proj.weight, expected.view(64, 128))
    torch.testing.assert_close(out, logits(model), rtol=0, atol=2e-3)  # float16 scales, norms and embedding


def with_embedding_weight(model, weight):
    model.get_input_embeddings().weight.data = weight
    return model


@pytest.mark.parametrize("kind", ["llama", "opt"])  # OPT's learned positions are Embedding layers too
def test_the_token_embedding_is_quantized_at_export_and_the_tied_head_reads_it(kind, tmp_path, tokenizer):
    model, _ = compress(kind, CASES["rtn-w4-g32-asym"][1], tokenizer)
    written = export(model, tokenizer, tmp_path / "out", dtype="float32")
    assert "quantized at export to int8 groups of 64, asymmetric" in written.export["embedding"]
    assert written.export["how_to_load"] == STUDIO_LOAD
    groups = quantization_config(written.path)["config_groups"]
    embedding_target = "Embedding" if kind == "llama" else "model.decoder.embed_tokens"
    assert [g["targets"] for g in groups.values()] == [["Linear"], [embedding_target]]
    assert groups["group_1"]["weights"] | {"num_bits": 8, "strategy": "group", "group_size": 64,
                                           "symmetric": False} == groups["group_1"]["weights"]
    assert not any(key.startswith("lm_head") for key in load_file(written.path / "model.safetensors"))

    reloaded = load_compressed_tensors(written.path)
    assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight
    embedding = quantize_rtn(model.get_input_embeddings().weight.data, 8, 64, False).dequantize()
    assert torch.equal(reloaded.get_input_embeddings().weight, embedding)
    torch.testing.assert_close(logits(reloaded), logits(with_embedding_weight(model, embedding)), rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_one_scheme_for_the_layers_and_the_embedding_loads_with_plain_transformers(tmp_path, tokenizer):
    model, _ = compress("qwen2", [Step("rtn", {"bits": 8, "group_size": 64, "symmetric": False})], tokenizer)
    written = export(model, tokenizer, tmp_path / "out", dtype="float32")
    assert [g["targets"] for g in quantization_config(written.path)["config_groups"].values()] == \
        [["Linear", "Embedding"]]
    assert written.export["how_to_load"] == DEQUANTIZE_LOAD
    reloaded = AutoModelForCausalLM.from_pretrained(
        written.path, quantization_config=CompressedTensorsConfig(dequantize=True))
    embedding = quantize_rtn(model.model.embed_tokens.weight.data, 8, 64, False).dequantize()
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)  # untied: the head stays dense
    torch.testing.assert_close(logits(reloaded), logits(with_embedding_weight(model, embedding)), rtol=0, atol=1e-5)


def test_pruned_layers_are_written_dense_and_the_summary_says_why(tmp_path, tokenizer):
    steps = [Step("magnitude", {"sparsity": 0.5}),
             Step("rtn", {"bits": 8, "group_size": 0}, TargetSpec(exclude=("*.mlp.*",)))]
    model, _ = compress("llama", steps, tokenizer)
    written = export(model, tokenizer, tmp_path / "out", **EXACT)
    dense = written.export["layers_dense"]
    assert written.export["layers_packed"] == 3 * 4 and len(dense) == 3 * 3 + 1
    assert "no sparse formats" in dense["model.layers.0.mlp.up_proj"]
    assert "no sparse formats" in written.export["sparsity"]
    torch.testing.assert_close(logits(load_compressed_tensors(written.path)), logits(model), rtol=0, atol=1e-5)


def test_large_models_are_written_in_shards_with_an_index(tmp_path, tokenizer, monkeypatch):
    model, _ = compress("llama", CASES["rtn-w4-g32-asym"][1], tokenizer)
    monkeypatch.setattr(ct, "MAX_SHARD_BYTES", 40_000)
    out = export(model, tokenizer, tmp_path / "out", **EXACT).path
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    torch.testing.assert_close(logits(load_compressed_tensors(out)), logits(model), rtol=0, atol=1e-5)


# --- what cannot be written --------------------------------------------------------------------------------


def test_a_model_without_quantized_layers_is_refused_naming_a_recipe(tmp_path, tokenizer):
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="no quantized layer.*studio run rtn-w4-g64"):
        export(tiny_model(), tokenizer, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_float_zero_points_and_conv1d_layers_are_named_with_what_to_do(tokenizer):
    hqq, _ = compress("llama", [Step("hqq", {"bits": 4, "group_size": 32, "iterations": 2})], tokenizer)
    (problem,) = compressed_tensors_problems(hqq)
    assert "model.layers.0.self_attn.q_proj (and 20 more) has float zero points" in problem and "GGUF" in problem
    integer, _ = compress("llama", [Step("hqq", {"bits": 4, "group_size": 32, "iterations": 2,
                                                  "zero_point": "integer"})], tokenizer)
    assert compressed_tensors_problems(integer) == []
    gpt2, _ = compress("gpt2", CASES["rtn-w4-g32-sym"][1], tokenizer)
    (problem,) = compressed_tensors_problems(gpt2)
    assert "transformer.h.0.attn.c_attn (and 11 more) is Conv1D" in problem and "GGUF" in problem


def test_bad_options_are_refused(tmp_path, tokenizer):
    model, _ = compress("llama", CASES["rtn-w4-g32-sym"][1], tokenizer)
    with pytest.raises(ExportError, match="embedding_bits must be between 2 and 8"):
        export(model, tokenizer, tmp_path / "a", embedding_bits=12)
    with pytest.raises(ExportError, match="Unknown dtype 'int8'"):
        export(model, tokenizer, tmp_path / "b", dtype="int8")


class CancelAfter(CancelToken):
    def __init__(self, checks):
        super().__init__()
        self.left = checks

    def check(self):
        self.left -= 1
        if self.left == 0:
            self.cancel()
        super().check()


def test_cancelling_mid_way_leaves_nothing_at_the_destination(tmp_path, tokenizer):
    model, _ = compress("llama", CASES["rtn-w4-g32-sym"][1], tokenizer)
    cancel = CancelAfter(30)  # 22 checks while planning the layers, then writing
    with pytest.raises(Cancelled):
        export_model(model, tokenizer, tmp_path / "out", format="compressed-tensors", cancel=cancel)
    assert cancel.left == 0 and list(tmp_path.iterdir()) == []


# --- the real model ----------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_smollm2_w4_g64_is_a_third_of_fp16_and_reloads_to_the_same_perplexity(smollm, wikitext, tmp_path):
    from studio.core.evaluation.perplexity import PerplexityConfig, load_eval_tokens, perplexity

    recipe = Recipe([Step("rtn", {"bits": 4, "group_size": 64, "symmetric": False})])
    result = run_recipe(recipe, smollm, evaluate_each_step=False)
    model = result.model
    written = export_model(model, smollm.tokenizer, tmp_path / "out", format="compressed-tensors", recipe=recipe)
    parameters = sum(p.numel() for p in set(model.parameters()))
    on_disk = sum(f.stat().st_size for f in written.path.rglob("*") if f.is_file())  # tokenizer and card too
    assert on_disk <= 0.35 * 2 * parameters  # measured: 33.7% (the safetensors alone 32.4%)

    config = PerplexityConfig(str(wikitext), max_tokens=2048, window=1024, stride=1024)
    tokens = load_eval_tokens(smollm.tokenizer, config)
    in_memory = perplexity(model, tokens, config, smollm.tokenizer).perplexity
    reloaded = perplexity(load_compressed_tensors(written.path), tokens, config, smollm.tokenizer).perplexity
    assert abs(reloaded / in_memory - 1) <= 0.005
