import pytest
import torch

from conftest import tiny_model
from studio.core.errors import RecipeError
from studio.core.loading import LoadedModel
from studio.core.recipe import parse_recipe
from studio.core.runner import prepare, run_recipe
from studio.core.state import compression_state
from studio.core.structure import weight_matrix
from studio.methods.magnitude import layer_mask, nm_mask


def prune(model, **params):
    recipe = parse_recipe({"schema_version": 1, "steps": [{"method": "magnitude", "params": params}]})
    result = run_recipe(recipe, LoadedModel(model, None, {}))
    assert result.status == "finished", result.error
    return result


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_layer_mask_removes_exactly_the_smallest(sparsity):
    w = torch.randn(32, 64)
    keep = layer_mask(w, sparsity)
    assert (~keep).sum().item() == round(sparsity * w.numel())
    assert w.abs()[~keep].max() <= w.abs()[keep].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_mask_keeps_exactly_n_in_every_m(n, m):
    w = torch.randn(16, 64)
    keep = nm_mask(w, n, m).reshape(16, -1, m)
    assert torch.all(keep.sum(-1) == n)
    kept_min = torch.where(keep, w.abs().reshape(16, -1, m), torch.inf).min(-1).values
    dropped_max = torch.where(~keep, w.abs().reshape(16, -1, m), -torch.inf).max(-1).values
    assert torch.all(kept_min >= dropped_max)


def test_unstructured_per_layer_sparsity_in_every_targeted_layer():
    result = prune(tiny_model("opt"), sparsity=0.5)
    layers = dict(result.model.named_modules())
    for name, record in compression_state(result.model).items():
        w = weight_matrix(layers[name])
        assert abs((w == 0).float().mean().item() - 0.5) < 0.005
        assert record.sparsity_pattern == "unstructured"


def test_global_threshold_hits_overall_sparsity_with_uneven_layers():
    result = prune(tiny_model("llama"), sparsity=0.6, scope="global")
    per_layer = [layer["sparsity"] for layer in result.report["steps"][0]["layers"]]
    assert abs(result.report["steps"][0]["summary"]["sparsity"] - 0.6) < 0.005
    assert max(per_layer) - min(per_layer) > 0.01


def test_two_four_in_the_model_weights():
    result = prune(tiny_model("gpt2"), pattern="2:4")
    layers = dict(result.model.named_modules())
    for name, record in compression_state(result.model).items():
        w = weight_matrix(layers[name])
        assert torch.all((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2)
        assert torch.all(record.mask.reshape(w.shape[0], -1, 4).sum(-1) == 2)


def test_nm_on_a_width_it_does_not_divide_is_a_validation_error():
    model = tiny_model("llama")
    recipe = parse_recipe({"schema_version": 1, "steps": [{"method": "magnitude", "params": {"pattern": "4:8"}}]})
    prepare(recipe, model)  # 64 and 128 are multiples of 8
    model.model.layers[0].mlp.down_proj = torch.nn.Linear(130, 64)
    with pytest.raises(RecipeError, match="down_proj has 130"):
        prepare(recipe, model)
