import pytest
import yaml

from studio.core.errors import RecipeError
from studio.core.paths import PRESETS_DIR
from studio.core.recipe import SCHEMA_VERSION, load_recipe, parse_recipe, save_recipe, validate_recipe
from studio.core.registry import Family, all_methods, param_specs


def steps(*raw):
    return {"schema_version": 1, "steps": list(raw)}


def error_of(data) -> str:
    with pytest.raises(RecipeError) as info:
        validate_recipe(parse_recipe(data, "my.yaml"), "my.yaml")
    return str(info.value)


def test_every_preset_is_valid():
    presets = sorted(PRESETS_DIR.glob("*.yaml"))
    assert len(presets) >= 4
    for path in presets:
        recipe = load_recipe(path)
        assert recipe.name and validate_recipe(recipe)


def test_yaml_round_trip(tmp_path):
    recipe = parse_recipe(steps(
        {"method": "magnitude", "params": {"pattern": "2:4"}, "targets": {"include": ["*.mlp.*"], "exclude": ["*.down_proj"]}},
        {"method": "rtn", "params": {"bits": 3, "group_size": 64}, "enabled": False},
    ))
    path = tmp_path / "r.yaml"
    save_recipe(recipe, path)
    again = load_recipe(path)
    assert again == recipe
    assert yaml.safe_load(path.read_text())["schema_version"] == SCHEMA_VERSION
    assert [s.step.method for s in validate_recipe(again)] == ["magnitude"]  # disabled steps are skipped


@pytest.mark.parametrize("data,expected", [
    (steps({"method": "gptq-foo"}), ["step 1 (gptq-foo)", "unknown method", "rtn"]),
    (steps({"method": "rtn", "params": {"bits": "four"}}), ["step 1 (rtn)", "'bits'", "integer", "'four'"]),
    (steps({"method": "rtn", "params": {"bits": 4.5}}), ["'bits'", "integer"]),
    (steps({"method": "rtn"}, {"method": "rtn", "params": {"bits": 9}}), ["step 2 (rtn)", "'bits'", "less than or equal to 8", "9"]),
    (steps({"method": "magnitude", "params": {"sparsity": 1.5}}), ["step 1 (magnitude)", "'sparsity'", "less than 1"]),
    (steps({"method": "magnitude", "params": {"pattern": "3:4"}}), ["'pattern'", "2:4"]),
    (steps({"method": "rtn", "params": {"bitz": 4}}), ["step 1 (rtn)", "'bitz' is not a parameter"]),
    (steps({"method": "rtn", "param": {}}), ["step 1 (rtn)", "unknown key", "param"]),
])
def test_errors_name_step_method_and_field(data, expected):
    message = error_of(data)
    assert message.startswith("my.yaml")
    for part in expected:
        assert part in message


@pytest.mark.parametrize("data,expected", [
    ([1, 2], "a recipe is a mapping"),
    ({"steps": [{"method": "rtn"}]}, "schema_version"),
    ({"schema_version": 99, "steps": [{"method": "rtn"}]}, "newer Compression Studio"),
    ({"schema_version": 1, "steps": []}, "non-empty list"),
    ({"schema_version": 1, "steps": [{"method": "rtn"}], "stepz": 1}, "unknown key"),
    (steps({"method": "rtn", "targets": {"include": "x", "only": []}}), "targets"),
])
def test_structural_errors(data, expected):
    assert expected in error_of(data)


def test_yaml_is_never_executed(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_registry_declares_family_calibration_schema_and_estimate():
    methods = {m.id: m for m in all_methods()}
    assert {"rtn", "magnitude"} <= set(methods)
    assert methods["rtn"].family is Family.QUANTIZATION and methods["magnitude"].family is Family.PRUNING
    bits = next(s for s in param_specs(methods["rtn"].Params) if s.name == "bits")
    assert (bits.type, bits.minimum, bits.maximum, bits.default) == ("int", 2, 8, 4) and bits.help
    pattern = next(s for s in param_specs(methods["magnitude"].Params) if s.name == "pattern")
    assert pattern.choices == ("unstructured", "2:4", "4:8")
