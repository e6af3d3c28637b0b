from conftest import tiny_model
from studio.core.prediction import dense_bytes, predict_compressed_bytes
from studio.core.recipe import Recipe, Step
from studio.core.runner import prepare, run_recipe
from studio.core.loading import LoadedModel


def _predict_and_run(steps):
    model = tiny_model("llama")
    recipe = Recipe([Step(m, p) for m, p in steps])
    predicted = predict_compressed_bytes(prepare(recipe, model), model)
    result = run_recipe(recipe, LoadedModel(model, None, {}))
    return predicted, result.report["size_after"]["compressed_bytes"], dense_bytes(model)


def test_predicted_size_of_rtn_matches_the_measured_packed_size():
    predicted, measured, dense = _predict_and_run([("rtn", {"bits": 4, "group_size": 32, "symmetric": False})])
    assert predicted == measured < dense


def test_pruning_keeps_dense_size_and_a_later_quantizer_decides():
    predicted, measured, dense = _predict_and_run([("magnitude", {"pattern": "2:4"})])
    assert predicted == measured == dense
    predicted, measured, _ = _predict_and_run([("magnitude", {"pattern": "2:4"}), ("rtn", {"bits": 8, "group_size": 0})])
    assert predicted == measured < dense
