"""Mixed precision: sensitivities from the Hessian equal measured output errors, the allocation meets its
budget and favours sensitive layers, and the method runs from a recipe."""

import itertools

import pytest
import torch

from conftest import tiny_model
from studio.core.calibration import CalibrationSettings
from studio.core.loading import LoadedModel
from studio.core.recipe import Recipe, Step
from studio.core.runner import run_recipe
from studio.core.state import compression_state
from studio.methods.mixed_precision import allocate_bits, relative_output_error
from studio.methods.hessian import HessianAccumulator


def test_the_hessian_sensitivity_is_the_relative_output_error():
    x = torch.randn(500, 32)
    w, w_hat = torch.randn(8, 32), torch.randn(8, 32)
    acc = HessianAccumulator(32)
    acc.add(x)
    measured = float(((x @ (w - w_hat).T).norm() / (x @ w.T).norm()) ** 2)
    assert relative_output_error(w, w_hat, acc.hessian) == pytest.approx(measured, rel=1e-4)


def test_allocation_fits_the_budget_and_gives_bits_to_the_sensitive_layer():
    widths = [2, 3, 4, 8]
    weights = {"sensitive": 100, "robust": 100, "big": 400}
    errors = {
        "sensitive": {b: 10.0 * 4.0**-b for b in widths},
        "robust": {b: 0.1 * 4.0**-b for b in widths},
        "big": {b: 1.0 * 4.0**-b for b in widths},
    }
    sizes = {n: {b: n_w * b for b in widths} for n, n_w in weights.items()}

    def cost(bits):
        return sum(weights[n] * errors[n][b] for n, b in bits.items())

    for average in (2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.5, 8.0):
        budget = int(average * sum(weights.values()))
        bits = allocate_bits(sizes, errors, weights, budget)
        assert sum(sizes[n][b] for n, b in bits.items()) <= budget
        assert bits["sensitive"] >= bits["big"]
        feasible = [dict(zip(weights, combo)) for combo in itertools.product(widths, repeat=3)
                    if sum(sizes[n][b] for n, b in zip(weights, combo)) <= budget]
        assert cost(bits) <= 1.25 * min(cost(c) for c in feasible)  # near the exhaustive optimum
    assert set(allocate_bits(sizes, errors, weights, 8 * 600).values()) == {8}
    with pytest.raises(ValueError):
        allocate_bits(sizes, errors, weights, 600)


def test_mixed_precision_meets_the_average_and_reports_the_table(tokenizer, text_file):
    loaded = LoadedModel(tiny_model("llama"), tokenizer, {"kind": "test"})
    recipe = Recipe(
        [Step("mixed_precision", {"min_bits": 2, "max_bits": 8, "target_bits": 3.5, "group_size": 32})],
        calibration=CalibrationSettings(text_file=str(text_file), samples=4, seq_len=16, batch_size=2),
    )
    result = run_recipe(recipe, loaded)
    assert result.status == "finished", result.error
    summary = result.report["steps"][0]["summary"]
    assert 3.0 < summary["average_bits"] <= 3.5
    state = compression_state(result.model)
    layers = {row["layer"]: row for row in summary["sensitivity"]}
    assert set(layers) == set(state)
    for name, record in state.items():
        assert record.quant.bits == layers[name]["bits"]
        errors = [layers[name]["error"][str(b)] for b in range(2, 9)]
        assert errors == sorted(errors, reverse=True)  # more bits, less error
    assert len({r.quant.bits for r in state.values()}) > 1


def test_a_packed_size_budget_is_predicted_before_the_run_and_kept_by_it(tokenizer, text_file):
    from studio.core.prediction import dense_bytes, predict_compressed_bytes
    from studio.core.runner import prepare

    model = tiny_model("llama")
    dense = dense_bytes(model)
    target_bytes = 50_000  # about 3.6 bits per weight with g32 scales and zero points
    recipe = Recipe(
        [Step("mixed_precision", {"min_bits": 2, "max_bits": 8, "target_mb": target_bytes / 2**20, "group_size": 32,
                                  "quantizer": "rtn"})],
        calibration=CalibrationSettings(text_file=str(text_file), samples=4, seq_len=16, batch_size=2),
    )
    targeted = sum(m.weight.numel() * 4 for name, m in model.named_modules()
                   if name.startswith("model.layers.") and isinstance(m, torch.nn.Linear))
    predicted = predict_compressed_bytes(prepare(recipe, model), model)
    assert 0 <= dense - targeted + target_bytes - predicted < 28  # the budget split over 28 layers, rounded down
    result = run_recipe(recipe, LoadedModel(model, tokenizer, {"kind": "test"}))
    assert result.status == "finished", result.error
    assert predicted - 2_000 < result.report["size_after"]["compressed_bytes"] <= predicted
