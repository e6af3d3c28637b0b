"""Methods and their registry: a method declares what it is and its typed parameters, then applies itself.

Each method's parameters are a pydantic model (strict types, ranges, defaults, one-line help in the
field's description); the GUI generates its form from `param_specs`, and a recipe step is validated by it.
"""

from __future__ import annotations

import enum
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import annotated_types
from pydantic import BaseModel, ConfigDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads lazily: the window must open fast
    from torch import nn


class Family(enum.StrEnum):
    QUANTIZATION = "quantization"
    PRUNING = "pruning"
    DISTILLATION = "distillation"
    COMPACT_ARCHITECTURE = "compact_architecture"
    DYNAMIC = "dynamic"


class MethodParams(BaseModel):
    """Base of every method's parameters: unknown keys and loose types are errors, not guesses."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: str  # "int", "float", "bool", "str", "choice"
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] = ()


def param_specs(params: type[MethodParams]) -> list[ParamSpec]:
    specs = []
    for name, info in params.model_fields.items():
        annotation = info.annotation
        choices: tuple[Any, ...] = ()
        if typing.get_origin(annotation) is typing.Literal:
            kind, choices = "choice", typing.get_args(annotation)
        else:
            kind = getattr(annotation, "__name__", str(annotation))
        lo = hi = None
        for meta in info.metadata:
            if isinstance(meta, annotated_types.Ge):
                lo = meta.ge
            elif isinstance(meta, annotated_types.Gt):
                lo = meta.gt
            elif isinstance(meta, annotated_types.Le):
                hi = meta.le
            elif isinstance(meta, annotated_types.Lt):
                hi = meta.lt
        specs.append(ParamSpec(name, kind, info.default, info.description or "", lo, hi, choices))
    return specs


@dataclass(frozen=True)
class Estimate:
    """What a step is expected to need, before it runs: extra memory over the loaded model, and time."""

    extra_bytes: int
    seconds: float


@dataclass
class LayerReport:
    """One layer's outcome; the fields that do not apply to a method stay None."""

    name: str
    error: float | None = None  # relative Frobenius error of the weight, ||W - W'|| / ||W||
    sparsity: float | None = None
    bits: int | None = None
    group_size: int | None = None
    parameters: int | None = None
    rank: int | None = None  # low-rank factorization: the rank kept (None: left dense)


@dataclass
class StepOutcome:
    layers: list[LayerReport] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


class Method(ABC):
    id: ClassVar[str]
    title: ClassVar[str]
    family: ClassVar[Family]
    summary: ClassVar[str]  # one line for the palette and `studio methods`
    needs_calibration: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False  # reads the uncompressed original while it runs (distillation)
    changes_weights: ClassVar[bool] = True  # False for methods that act at run time only (KV-cache quantization)
    # goes through its layers once, without calibration, each weight read and written back in its own shape
    # within moments (RTN, magnitude pruning): in an in-place run, what was read just before is replaced
    sweeps_weights_once: ClassVar[bool] = False
    Params: ClassVar[type[MethodParams]]

    def check(self, layers: dict[int, dict[str, nn.Module]], params: MethodParams) -> list[str]:
        """Problems that depend on the model (shapes), each a sentence naming the layer; empty if fine."""
        return []

    def check_model(self, model: nn.Module, params: MethodParams) -> list[str]:
        """Problems only the whole model shows (its config, head counts, number of blocks); empty if fine."""
        return []

    @abstractmethod
    def estimate(self, layers: dict[int, dict[str, nn.Module]], params: MethodParams) -> Estimate: ...

    def stored_bytes(self, module: nn.Module, params: MethodParams) -> int:
        """Bytes the layer's weight will take in its compressed form after this step. The default is a method
        that leaves dense weights (pruning stores zeros densely, and drops earlier quantization codes)."""
        return module.weight.numel() * module.weight.element_size()

    def rewritten_bytes(self, modules: list[nn.Module], params: MethodParams) -> int:
        """What a step that rewrites `modules` adds: new dense weights (the original keeps its own) plus what each
        layer stores in its compressed form."""
        return sum(m.weight.numel() * m.weight.element_size() + self.stored_bytes(m, params) for m in modules)

    def stored_bytes_by_layer(self, modules: dict[str, nn.Module], params: MethodParams) -> dict[str, int]:
        """`stored_bytes` of each of a step's layers; a method whose budget spans its layers overrides this."""
        return {name: self.stored_bytes(module, params) for name, module in modules.items()}

    @abstractmethod
    def apply(self, ctx: "StepContext", params: MethodParams) -> StepOutcome:  # noqa: F821
        """Compress `ctx.layers` block by block, iterating `ctx.blocks()` (progress and cancellation per block)."""


REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.id in REGISTRY:
        raise ValueError(f"Method id '{cls.id}' is registered twice")
    REGISTRY[cls.id] = cls()
    return cls


def get_method(method_id: str) -> Method:
    import studio.methods  # noqa: F401  (registers the built-in methods)

    try:
        return REGISTRY[method_id]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise KeyError(f"unknown method '{method_id}'; the methods are: {known}") from None


def all_methods() -> list[Method]:
    import studio.methods  # noqa: F401

    return sorted(REGISTRY.values(), key=lambda m: (list(Family).index(m.family), m.id))
