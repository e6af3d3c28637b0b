import pytest
import torch

from conftest import ARCHS, tiny_model
from studio.core.clone import clone_sharing_weights
from studio.core.structure import TargetSpec, find_decoder_blocks, set_weight_matrix, target_layers, weight_matrix
from studio.core.summary import summarize

BLOCK_PATHS = {"llama": "model.layers", "qwen2": "model.layers", "opt": "model.decoder.layers", "gpt2": "transformer.h"}


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_blocks_found_without_per_architecture_code(arch):
    model = tiny_model(arch)
    decoder = find_decoder_blocks(model)
    assert decoder.path == BLOCK_PATHS[arch]
    assert len(decoder.blocks) == 3


@pytest.mark.parametrize("arch", ARCHS)
def test_default_targets_are_block_linears_not_embeddings_or_head(arch):
    model = tiny_model(arch)
    layers = target_layers(model, TargetSpec())
    names = [n for block in layers.values() for n in block]
    assert sorted(layers) == [0, 1, 2]
    assert all(n.startswith(BLOCK_PATHS[arch]) for n in names)
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in names)
    assert len(names) == 3 * {"llama": 7, "qwen2": 7, "opt": 6, "gpt2": 4}[arch]


def test_patterns_include_and_exclude():
    model = tiny_model("llama")
    spec = TargetSpec(include=("*.mlp.*",), exclude=("*.down_proj",))
    names = [n for block in target_layers(model, spec).values() for n in block]
    assert names and all(n.endswith(("gate_proj", "up_proj")) for n in names)


def test_gpt2_conv1d_weight_is_seen_as_out_by_in():
    model = tiny_model("gpt2")
    c_fc = model.transformer.h[0].mlp.c_fc  # Conv1D 64 -> 256, stored (64, 256)
    assert weight_matrix(c_fc).shape == (256, 64)
    new = torch.randn(256, 64)
    set_weight_matrix(c_fc, new)
    assert torch.equal(weight_matrix(c_fc), new)


def test_clone_shares_weights_until_replaced_and_keeps_ties():
    model = tiny_model("llama")
    clone = clone_sharing_weights(model)
    layer, original_layer = clone.model.layers[0].mlp.up_proj, model.model.layers[0].mlp.up_proj
    assert layer.weight.data_ptr() == original_layer.weight.data_ptr()
    assert clone.lm_head.weight is clone.model.embed_tokens.weight  # tied weights stay tied
    before = original_layer.weight.clone()
    set_weight_matrix(layer, torch.zeros_like(layer.weight))
    assert torch.equal(original_layer.weight, before)


def test_summary_counts_parameters_and_bytes():
    model = tiny_model("qwen2")
    summary = summarize(model)
    assert summary.parameters == sum(p.numel() for p in model.parameters())
    assert summary.bytes_by_dtype["float32"] >= summary.parameters * 4
    assert summary.num_blocks == 3 and summary.hidden_size == 64
    assert [layer.name for layer in summary.block_layers][:3] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert "decoder blocks 3" in summary.format()
