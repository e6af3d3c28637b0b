"""The search specification: a budget, the compression methods and ranges a search may combine, and how each
candidate is evaluated, read from YAML with errors that name the file and the field.

```yaml
schema_version: 1
name: SmolLM2 at 3.5 bits
budget: {kind: bits_per_weight, value: 3.5}   # or size_mb (compressed bytes), memory_mb (+ KV cache)
objective: perplexity                          # quality to minimise beside size: perplexity or kl
trials: 24
batch_size: 2                                  # candidates evaluated at once; also Optuna's ask/tell batch
seed: 0
space:
  quantization: {quantizer: [gptq], group_sizes: [32, 64], symmetric: [false], min_bits: [2, 3], max_bits: 8,
                 budget_fraction: [0.8, 1.0]}
  sparsity: {method: wanda, levels: [0.0, 0.1]}        # optional
  low_rank: {method: svd_llm, ratios: [0.0, 0.1]}      # optional
calibration: {text_file: c4-en-sample.txt, samples: 16, seq_len: 256}
evaluation: {text_file: wikitext-2-raw-test.txt, tokens: 4096, window: 1024, stride: 1024}
```
Relative paths are read from the spec file's folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, model_validator

from studio.core.calibration import CalibrationSettings
from studio.core.errors import RecipeError
from studio.core.recipe import read_yaml_file

SCHEMA_VERSION = 1
BUDGET_KINDS = ("bits_per_weight", "size_mb", "memory_mb")


class SearchSpecError(RecipeError):
    """A search specification that does not validate; the message names the file and the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Budget(_Section):
    kind: Annotated[
        Literal["bits_per_weight", "size_mb", "memory_mb"],
        Field(description="bits_per_weight: packed bits per weight of the decoder blocks' linear layers (codes, "
                          "scales and zero points); size_mb: the whole model's compressed bytes in MiB; memory_mb: "
                          "those plus the 16-bit KV cache at context_tokens."),
    ]
    value: Annotated[float, Field(gt=0, description="The limit no candidate may exceed.")]
    context_tokens: Annotated[int, Field(ge=1, le=1_048_576, description="memory_mb: tokens of KV cache counted.")] = 2048


class QuantizationSpace(_Section):
    """Per-layer bits by the mixed-precision method (sensitivity analysis, allocation under the budget)."""

    quantizer: Annotated[list[Literal["rtn", "gptq"]], Field(min_length=1, description="How layers are quantized at their width.")] = ["gptq"]
    group_sizes: Annotated[list[Annotated[int, Field(ge=0, le=8192)]], Field(min_length=1, description="Group sizes to try; 0 = per channel.")] = [64]
    symmetric: Annotated[list[bool], Field(min_length=1, description="Symmetric and/or asymmetric grids.")] = [False]
    min_bits: Annotated[
        list[Annotated[int, Field(ge=2, le=8)]], Field(min_length=1, description="Lowest widths a layer may get (searched).")
    ] = [2, 3]
    max_bits: Annotated[int, Field(ge=2, le=8, description="Highest width a layer may get.")] = 8
    budget_fraction: Annotated[
        list[Annotated[float, Field(gt=0, le=1)]],
        Field(min_length=2, max_length=2, description="[low, high] share of the budget a candidate may take."),
    ] = [0.75, 1.0]

    @model_validator(mode="after")
    def _ranges(self):
        if max(self.min_bits) > self.max_bits:
            raise ValueError("min_bits must not exceed max_bits")
        if self.budget_fraction[0] > self.budget_fraction[1]:
            raise ValueError("budget_fraction is [low, high] with low <= high")
        return self


class SparsitySpace(_Section):
    method: Annotated[Literal["magnitude", "wanda", "sparsegpt"], Field(description="The pruning method.")] = "wanda"
    levels: Annotated[list[Annotated[float, Field(ge=0, lt=0.95)]], Field(min_length=1, description="Sparsities to try (0: no pruning).")]


class LowRankSpace(_Section):
    method: Annotated[Literal["svd", "asvd", "svd_llm"], Field(description="The factorization.")] = "svd_llm"
    ratios: Annotated[list[Annotated[float, Field(ge=0, le=0.9)]], Field(min_length=1, description="Parameter ratios removed (0: none).")]


class SearchSpace(_Section):
    quantization: QuantizationSpace = QuantizationSpace()
    sparsity: SparsitySpace | None = None
    low_rank: LowRankSpace | None = None


class EvaluationSettings(_Section):
    """The quick evaluation of every candidate: perplexity and KL to the original on the same tokens."""

    text_file: Annotated[str, Field(min_length=1, description="Text for perplexity and KL.")]
    tokens: Annotated[int, Field(ge=16, description="Tokens of the text scored.")] = 4096
    window: Annotated[int, Field(ge=8, le=131072, description="Tokens per window.")] = 1024
    stride: Annotated[int, Field(ge=1, le=131072, description="Tokens the window moves by.")] = 1024

    @model_validator(mode="after")
    def _stride(self):
        if self.stride > self.window:
            raise ValueError("stride must not exceed window")
        return self

    def config(self):
        from studio.core.evaluation.perplexity import PerplexityConfig

        return PerplexityConfig(self.text_file, max_tokens=self.tokens, window=self.window, stride=self.stride)


class SearchSpec(_Section):
    schema_version: Literal[1] = 1
    name: str = ""
    budget: Budget
    objective: Annotated[Literal["perplexity", "kl"], Field(description="Quality minimised beside size.")] = "perplexity"
    trials: Annotated[int, Field(ge=1, le=10000, description="Candidates proposed in all.")] = 16
    batch_size: Annotated[int, Field(ge=1, le=1024, description="Candidates proposed and evaluated at once.")] = 2
    seed: Annotated[int, Field(ge=0, description="Seed of the sampler (the same seed gives the same search).")] = 0
    sampler: Annotated[Literal["tpe", "nsga2", "random"], Field(description="Optuna's sampler.")] = "tpe"
    space: SearchSpace = SearchSpace()
    calibration: CalibrationSettings | None = None
    evaluation: EvaluationSettings

    @model_validator(mode="after")
    def _calibration_when_needed(self):
        if self.calibration is None or not self.calibration.has_source:
            raise ValueError("'calibration' with a text_file (or dataset) is needed: mixed precision measures "
                             "each layer's sensitivity on calibration text (`studio search` takes --calib-text)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def _describe(err: dict) -> str:
    name = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal["))) or "spec"
    if err["type"] == "extra_forbidden":
        return f"field '{name}' is not a field of a search spec here."
    if err["type"] == "missing":
        hint = " (`studio search` takes --eval-text)" if name == "evaluation.text_file" else ""
        return f"field '{name}' is missing{hint}."
    message = err["msg"].removeprefix("Value error, ")
    return f"field '{name}': {message} (got {err.get('input')!r})." if name != "spec" else f"{message}."


def parse_search_spec(data: Any, where: str = "search spec", base: Path | None = None) -> SearchSpec:
    """A SearchSpec from a dict as read from YAML; relative text files are taken from `base`."""
    if not isinstance(data, dict):
        raise SearchSpecError(f"{where}: a search spec is a mapping with 'budget', 'evaluation' and 'space', "
                              f"not {type(data).__name__}.")
    version = data.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise SearchSpecError(f"{where}: field 'schema_version': this studio reads search specs up to version "
                              f"{SCHEMA_VERSION} (got {version!r}).")
    data = _with_paths_from(dict(data), base) if base is not None else data
    try:
        return SearchSpec(**data)
    except pydantic.ValidationError as exc:
        raise SearchSpecError(f"{where}: " + " ".join(_describe(e) for e in exc.errors())) from None
    except TypeError as exc:
        raise SearchSpecError(f"{where}: {exc}") from None


def _with_paths_from(data: dict, base: Path) -> dict:
    for section in ("calibration", "evaluation"):
        part = data.get(section)
        if isinstance(part, dict) and isinstance(part.get("text_file"), str):
            path = Path(part["text_file"]).expanduser()
            data[section] = {**part, "text_file": str(path if path.is_absolute() else base / path)}
    return data


def load_search_spec(path: str | os.PathLike, changes: dict[str, Any] | None = None) -> SearchSpec:
    """The spec in the YAML file `path`, with `changes` (e.g. {"trials": 8, "evaluation": {"text_file": …}}:
    a section's keys replace the file's) applied before it is checked."""
    path = Path(path)
    data = read_yaml_file(path, "search spec", SearchSpecError)
    if changes:
        if not isinstance(data, dict):
            data = {}
        data = {**data, **{k: {**(data.get(k) or {}), **v} if isinstance(v, dict) and isinstance(data.get(k), dict)
                           else v for k, v in changes.items()}}
    return parse_search_spec(data, str(path), base=path.resolve().parent)
