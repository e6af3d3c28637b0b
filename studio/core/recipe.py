"""Recipes: an ordered list of steps (method id, parameters, targeted modules), saved as YAML.

```yaml
schema_version: 2
name: GPTQ W4 g64
calibration: {text_file: c4-sample.txt, samples: 32, seq_len: 512}   # only for methods that need it
steps:
  - method: gptq
    params: {bits: 4, group_size: 64, symmetric: true}
    targets: {include: ["*"], exclude: ["*.mlp.down_proj"]}   # optional; default: every linear
                                                              # layer of the decoder blocks
```
Loading never evaluates anything (`yaml.safe_load`). An unknown key, a wrong type or an out-of-range value is
an error that names the step number, the method and the field. Older schema versions are migrated. The optional `calibration`
section says where methods that look at activations (GPTQ, AWQ, Wanda…) take their text from.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pydantic
import yaml
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads lazily: the window must open fast
    from torch import nn

from studio.core.calibration import CalibrationSettings
from studio.core.errors import RecipeError
from studio.core.registry import Method, MethodParams, get_method
from studio.core.structure import TargetSpec, target_layers

SCHEMA_VERSION = 2
RECIPE_KEYS = {"schema_version", "name", "description", "calibration", "steps"}
STEP_KEYS = {"method", "params", "targets", "enabled"}
TARGET_KEYS = {"include", "exclude"}

# version -> function turning a recipe dict of that version into the next version
MIGRATIONS: dict[int, Callable[[dict], dict]] = {
    1: lambda data: {**data, "schema_version": 2},  # 2 added the optional 'calibration' section
}


@dataclass
class Step:
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    targets: TargetSpec = field(default_factory=TargetSpec)
    enabled: bool = True

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"method": self.method, "params": dict(self.params)}
        if self.targets != TargetSpec():
            data["targets"] = {"include": list(self.targets.include), "exclude": list(self.targets.exclude)}
        if not self.enabled:
            data["enabled"] = False
        return data


@dataclass
class Recipe:
    steps: list[Step] = field(default_factory=list)
    name: str = ""
    description: str = ""
    calibration: CalibrationSettings | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        if self.name:
            data["name"] = self.name
        if self.description:
            data["description"] = self.description
        if self.calibration is not None:
            data["calibration"] = self.calibration.model_dump(exclude_defaults=True)
        data["steps"] = [s.to_dict() for s in self.steps]
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


@dataclass(frozen=True)
class ValidatedStep:
    index: int
    step: Step
    method: Method
    params: MethodParams

    @property
    def label(self) -> str:
        return f"step {self.index + 1} ({self.step.method})"


def _fail(where: str, problems: list[str]) -> RecipeError:
    return RecipeError(f"{where}: " + " ".join(problems))


def parse_recipe(data: Any, where: str = "recipe") -> Recipe:
    """Build a Recipe from a dict as read from YAML, migrating older versions. Checks structure only;
    `validate_recipe` checks each step's parameters against its method."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a mapping with 'schema_version' and 'steps', not {type(data).__name__}.")
    version = data.get("schema_version")
    if not isinstance(version, int):
        raise RecipeError(f"{where}: 'schema_version' is missing or not an integer; this studio writes {SCHEMA_VERSION}.")
    if version > SCHEMA_VERSION:
        raise RecipeError(
            f"{where}: schema_version {version} was written by a newer Compression Studio (this one reads up to "
            f"{SCHEMA_VERSION}); upgrade the studio."
        )
    while version < SCHEMA_VERSION:
        if version not in MIGRATIONS:
            raise RecipeError(f"{where}: schema_version {version} is not one this studio can migrate.")
        data = MIGRATIONS[version](dict(data))
        version = data["schema_version"]
    unknown = set(data) - RECIPE_KEYS
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {sorted(unknown)}; a recipe has {sorted(RECIPE_KEYS)}.")
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise RecipeError(f"{where}: 'steps' must be a non-empty list of steps.")
    return Recipe(
        steps=[_parse_step(raw, i, where) for i, raw in enumerate(steps)],
        name=str(data.get("name", "")),
        description=str(data.get("description", "")),
        calibration=parse_calibration(data.get("calibration"), where),
    )


def parse_calibration(raw: Any, where: str) -> CalibrationSettings | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: 'calibration' must be a mapping such as {{text_file: c4.txt, samples: 32}}.")
    try:
        return CalibrationSettings(**raw)
    except pydantic.ValidationError as exc:
        problems = [_describe(err).replace("field '", "field 'calibration.", 1) for err in exc.errors()]
        raise _fail(where, problems) from None


def _parse_step(raw: Any, index: int, where: str) -> Step:
    label = f"{where}, step {index + 1}"
    if not isinstance(raw, dict) or "method" not in raw:
        raise RecipeError(f"{label}: each step is a mapping with at least 'method' (e.g. 'method: rtn').")
    label += f" ({raw['method']})"
    unknown = set(raw) - STEP_KEYS
    if unknown:
        raise RecipeError(f"{label}: unknown key(s) {sorted(unknown)}; a step has {sorted(STEP_KEYS)}.")
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise RecipeError(f"{label}: 'params' must be a mapping of parameter names to values.")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise RecipeError(f"{label}: 'enabled' must be true or false.")
    return Step(str(raw["method"]), dict(params), _parse_targets(raw.get("targets"), label), enabled)


def _parse_targets(raw: Any, label: str) -> TargetSpec:
    if raw is None:
        return TargetSpec()
    if isinstance(raw, str):
        raw = [raw]
    if isinstance(raw, list):
        raw = {"include": raw}
    if not isinstance(raw, dict) or set(raw) - TARGET_KEYS:
        raise RecipeError(f"{label}: 'targets' must be a list of name patterns or a mapping with 'include'/'exclude'.")
    include, exclude = raw.get("include", ["*"]), raw.get("exclude", [])
    for key, value in (("include", include), ("exclude", exclude)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RecipeError(f"{label}: 'targets.{key}' must be a list of strings such as '*.mlp.*'.")
    return TargetSpec(tuple(include), tuple(exclude))


def validate_step(step: Step, index: int, where: str = "recipe") -> ValidatedStep:
    label = f"{where}, step {index + 1} ({step.method})"
    try:
        method = get_method(step.method)
    except KeyError as exc:
        raise RecipeError(f"{label}: {exc.args[0]}.") from None
    try:
        params = method.Params(**step.params)
    except pydantic.ValidationError as exc:
        raise _fail(label, [_describe(err) for err in exc.errors()]) from None
    return ValidatedStep(index, step, method, params)


def _describe(err: dict) -> str:
    name = ".".join(str(p) for p in err["loc"]) or "params"
    if err["type"] == "extra_forbidden":
        return f"field '{name}' is not a parameter of this method."
    return f"field '{name}': {err['msg']} (got {err.get('input')!r})."


def validate_recipe(recipe: Recipe, where: str = "recipe") -> list[ValidatedStep]:
    """Every enabled step checked against its method's schema."""
    return [validate_step(s, i, where) for i, s in enumerate(recipe.steps) if s.enabled]


def check_calibration(steps: list[ValidatedStep], calibration: CalibrationSettings | None, where: str = "recipe") -> None:
    """A step that needs calibration text needs a recipe that says where the text comes from."""
    needing = [vs.label for vs in steps if vs.method.needs_calibration]
    if needing and (calibration is None or not calibration.has_source):
        raise RecipeError(
            f"{where}: {', '.join(needing)} needs calibration text. Add a section such as "
            "'calibration: {text_file: my-text.txt, samples: 32, seq_len: 512}' to the recipe, or give "
            "--calib-text FILE on the command line (the GUI: the Calibration text field of the Pipeline)."
        )


def check_against_model(steps: list[ValidatedStep], model: nn.Module, where: str = "recipe") -> None:
    """Checks that need the model: targets that match nothing, shapes a method cannot handle."""
    problems = [p for vs in steps for p in step_problems(vs, model, where)]
    if problems:
        raise RecipeError("\n".join(problems))


def step_problems(vs: ValidatedStep, model: nn.Module, where: str = "recipe") -> list[str]:
    """One step's checks against the model as it is (the runner repeats them before the step runs, when earlier
    steps may have changed the shapes: low-rank factors, pruned channels)."""
    layers = target_layers(model, vs.step.targets)
    if not layers:
        return [f"{where}, {vs.label}: the targets {list(vs.step.targets.include)} match no linear layer of the "
                "decoder blocks."]
    return [f"{where}, {vs.label}: {p}" for p in vs.method.check(layers, vs.params) + vs.method.check_model(model, vs.params)]


def read_yaml_file(path: Path, what: str, error: type[RecipeError] = RecipeError) -> Any:
    """The YAML document in `path` (a `what`, e.g. "recipe file", for the messages), or `error` saying why not."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what[:1].upper()}{what[1:]} '{path}' does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"Could not read {what} '{path}': {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"'{path}' is not valid YAML: {exc}") from None


def load_recipe(path: str | os.PathLike) -> Recipe:
    path = Path(path)
    return parse_recipe(read_yaml_file(path, "recipe file"), where=str(path))


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write through a temporary file in the same folder, then rename, so a failure never leaves half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(recipe.to_yaml())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
