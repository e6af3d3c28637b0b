"""From a trial's parameters to a candidate: a real recipe (low-rank factorization, pruning, then mixed-precision
quantization) and the size it will have, predicted from the layer shapes before anything runs.

The quantization step gets its share of the budget as an exact packed size of the targeted layers (codes at each
layer's width, 16-bit scales, zero points at the same width: `studio.core.state.packed_size`), which the
mixed-precision allocation never exceeds; a candidate whose layers would not fit even at the narrowest width is
rejected before it runs. Sizes follow the engine's accounting: pruned weights are stored densely, so pruning buys
no bytes, only FLOPs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from studio.core.recipe import Recipe, Step
from studio.core.search.spec import SearchSpec
from studio.core.structure import TargetSpec, in_out_features, iter_layers, target_layers, text_config

if TYPE_CHECKING:
    from torch import nn

MiB = 2**20


@dataclass(frozen=True)
class ModelShape:
    """What size prediction needs from the model, measured once in the driver."""

    layers: dict[str, tuple[int, int]]  # targeted linear layers of the decoder blocks: name -> (out, in)
    element_size: int  # bytes per dense weight element
    other_bytes: int  # compressed bytes of everything else (embeddings, norms, lm_head)
    kv_bytes_per_token: int  # a 16-bit KV cache

    @property
    def target_weights(self) -> int:
        return sum(o * i for o, i in self.layers.values())



def model_shape(model: nn.Module) -> ModelShape:
    from studio.core.evaluation.size import compressed_bytes

    modules = dict(iter_layers(target_layers(model, TargetSpec())))
    layers = {name: in_out_features(m)[::-1] for name, m in modules.items()}
    element = next(iter(modules.values())).weight.element_size() if modules else 4
    dense_targets = sum(m.weight.numel() * m.weight.element_size() for m in modules.values())
    config = text_config(model)
    heads = getattr(config, "num_attention_heads", 1) or 1
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // heads
    blocks = getattr(config, "num_hidden_layers", 0) or 0
    return ModelShape(layers, element, compressed_bytes(model) - dense_targets,
                      2 * blocks * kv_heads * head_dim * 2)


@dataclass(frozen=True)
class Candidate:
    trial: int
    params: dict[str, Any]  # the trial's parameters, as Optuna proposed them
    recipe: Recipe | None  # None when nothing fits the budget
    predicted_bytes: int  # the whole model's compressed bytes (an upper bound)
    predicted_measure: float  # in the budget's unit
    fits: bool
    reason: str = ""


def bits_per_weight(shape: ModelShape, compressed_bytes: int) -> float:
    """Packed bits per weight of the targeted layers in a model of `compressed_bytes` compressed bytes."""
    return 8 * (compressed_bytes - shape.other_bytes) / max(shape.target_weights, 1)


def budget_measure(spec: SearchSpec, shape: ModelShape, compressed_bytes: int) -> float:
    """The budget's quantity for a model of `compressed_bytes` compressed bytes."""
    if spec.budget.kind == "bits_per_weight":
        return bits_per_weight(shape, compressed_bytes)
    extra = shape.kv_bytes_per_token * spec.budget.context_tokens if spec.budget.kind == "memory_mb" else 0
    return (compressed_bytes + extra) / MiB


def allowed_total_bytes(spec: SearchSpec, shape: ModelShape, fraction: float) -> int:
    """The whole model's compressed bytes that `fraction` of the budget allows."""
    limit = spec.budget.value * fraction
    if spec.budget.kind == "bits_per_weight":
        return shape.other_bytes + math.floor(limit * shape.target_weights / 8)
    extra = shape.kv_bytes_per_token * spec.budget.context_tokens if spec.budget.kind == "memory_mb" else 0
    return math.floor(limit * MiB) - extra


def factored_shapes(out_f: int, in_f: int, ratio: float, rank_multiple: int) -> list[tuple[int, int]]:
    """The (out, in) matrices a layer becomes after the low-rank step (as studio.methods.low_rank chooses)."""
    from studio.methods.low_rank import budget_rank, kept_rank

    rank = kept_rank(min(budget_rank(out_f, in_f, ratio), out_f, in_f), out_f, in_f, rank_multiple) if ratio > 0 else None
    return [(out_f, in_f)] if rank is None else [(out_f, rank), (rank, in_f)]


@dataclass(frozen=True)
class Layout:
    """A quantization grid a candidate may use, and the share of the budget its narrowest widths need."""

    group_size: int
    symmetric: bool
    min_bits: int
    needed_fraction: float  # of the budget, with the space's largest low-rank ratio

    @property
    def label(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "per channel"
        return f"{group} {'sym' if self.symmetric else 'asym'} from {self.min_bits} bits"


def target_matrices(shape: ModelShape, ratio: float, group: int) -> list[tuple[int, int]]:
    return [m for o, i in shape.layers.values() for m in factored_shapes(o, i, ratio, max(group, 1))]


def packed_bytes(matrices: list[tuple[int, int]], bits: int, group: int, symmetric: bool) -> int:
    from studio.core.state import packed_size

    return sum(packed_size(o, i, bits, group, symmetric) for o, i in matrices)


def needed_fraction(spec: SearchSpec, shape: ModelShape, matrices, bits: int, group: int, symmetric: bool) -> float:
    """The smallest share of the budget (rounded up to 1/10000) that `matrices` at `bits` everywhere fit in."""
    packed = packed_bytes(matrices, bits, group, symmetric)
    return math.ceil(budget_measure(spec, shape, shape.other_bytes + packed) / spec.budget.value * 10_000) / 10_000


def layouts(spec: SearchSpec, shape: ModelShape) -> list[Layout]:
    """The space's (group size, grid, narrowest width) combinations that can fit the budget's highest share; all
    of them when none can (each candidate is then rejected with the size it would take)."""
    q = spec.space.quantization
    ratio = max(spec.space.low_rank.ratios) if spec.space.low_rank is not None else 0.0
    every = []
    for group in q.group_sizes:
        matrices = target_matrices(shape, ratio, group)
        if group and any(i % group for _, i in matrices):
            every += [Layout(group, sym, b, math.inf) for sym in q.symmetric for b in q.min_bits]
            continue
        every += [Layout(group, sym, b, needed_fraction(spec, shape, matrices, b, group, sym))
                  for sym in q.symmetric for b in q.min_bits]
    fitting = [layout for layout in every if layout.needed_fraction <= q.budget_fraction[1]]
    return fitting or every


def suggest(trial, spec: SearchSpec, options: list[Layout]) -> dict[str, Any]:
    """Ask the Optuna trial for one candidate's parameters (a choice with one option is not searched). The share
    of the budget is searched between the layout's needs and the space's highest share, so no proposal is
    rejected for a layout that cannot fit that low."""
    q = spec.space.quantization

    def pick(name: str, choices: list):
        return choices[0] if len(choices) == 1 else trial.suggest_categorical(name, choices)

    params: dict[str, Any] = {"quantizer": pick("quantizer", list(q.quantizer))}
    by_label = {layout.label: layout for layout in options}
    layout = by_label[pick("layout", list(by_label))]
    params.update(group_size=layout.group_size, symmetric=layout.symmetric, min_bits=layout.min_bits)
    high = q.budget_fraction[1]
    low = min(max(q.budget_fraction[0], layout.needed_fraction), high)
    position = 1.0 if low == high else trial.suggest_float("budget_position", 0.0, 1.0, step=0.01)
    params["budget_fraction"] = round(low + position * (high - low), 4)
    if spec.space.sparsity is not None:
        params["sparsity"] = pick("sparsity", list(spec.space.sparsity.levels))
    if spec.space.low_rank is not None:
        params["low_rank_ratio"] = pick("low_rank_ratio", list(spec.space.low_rank.ratios))
    return params


def build_candidate(spec: SearchSpec, shape: ModelShape, trial: int, params: dict[str, Any]) -> Candidate:
    """The recipe for `params`: mixed precision with the packed size of the targeted layers that the candidate's
    share of the budget leaves (at most what the widest width everywhere would take)."""
    q = spec.space.quantization
    group, symmetric, min_bits = params["group_size"], params["symmetric"], params["min_bits"]
    ratio = params.get("low_rank_ratio", 0.0)
    matrices = target_matrices(shape, ratio, group)
    bad = [(o, i) for o, i in matrices if group and i % group]
    if bad:
        reason = f"group size {group} does not divide the input width {bad[0][1]}"
        return Candidate(trial, params, None, 0, math.inf, False, reason)

    def packed(bits: int) -> int:
        return packed_bytes(matrices, bits, group, symmetric)

    allowed = allowed_total_bytes(spec, shape, params["budget_fraction"]) - shape.other_bytes
    target = min(allowed, packed(q.max_bits))
    if packed(min_bits) > target:
        measure = budget_measure(spec, shape, shape.other_bytes + packed(min_bits))
        limit = spec.budget.value * params["budget_fraction"]
        reason = (f"even {min_bits} bits per layer would take {measure:.4g} > {limit:.4g} {_unit(spec)} "
                  f"({params['budget_fraction']:.0%} of the budget)")
        return Candidate(trial, params, None, shape.other_bytes + packed(min_bits), measure, False, reason)
    predicted = shape.other_bytes + target
    steps = []
    if ratio > 0:
        steps.append(Step(spec.space.low_rank.method, {"ratio": ratio, "rank_multiple": max(group, 1)}))
    if params.get("sparsity", 0.0) > 0:
        steps.append(Step(spec.space.sparsity.method, {"sparsity": params["sparsity"]}))
    steps.append(Step("mixed_precision", {
        "min_bits": min_bits, "max_bits": q.max_bits, "target_mb": target / MiB,
        "group_size": group, "symmetric": symmetric, "quantizer": params["quantizer"],
    }))
    measure = budget_measure(spec, shape, predicted)
    recipe = Recipe(steps, name=candidate_name(params, measure, spec, q.max_bits), calibration=spec.calibration,
                    description=f"Found by a search under {spec.budget.value:g} {_unit(spec)} (trial {trial}).")
    return Candidate(trial, params, recipe, predicted, measure, True)


def candidate_name(params: dict[str, Any], measure: float, spec: SearchSpec, max_bits: int) -> str:
    size = f"{measure:.2f} bpw" if spec.budget.kind == "bits_per_weight" else f"{measure:.1f} MiB"
    parts = [f"{params['quantizer'].upper()} mixed {size} ({params['min_bits']}-{max_bits} bit)",
             f"g{params['group_size']}" if params["group_size"] else "per channel",
             "sym" if params["symmetric"] else "asym"]
    if params.get("low_rank_ratio"):
        parts.append(f"rank -{params['low_rank_ratio']:.0%}")
    if params.get("sparsity"):
        parts.append(f"sparsity {params['sparsity']:.0%}")
    return " ".join(parts)


def _unit(spec: SearchSpec) -> str:
    return {"bits_per_weight": "bits per weight", "size_mb": "MiB", "memory_mb": "MiB of memory"}[spec.budget.kind]


@dataclass
class CandidateKey:
    """Identical recipes are evaluated once; a repeat reuses the first result."""

    seen: dict[str, int] = field(default_factory=dict)

    def first_with(self, candidate: Candidate) -> int | None:
        """The trial that first had this recipe, or None (and this one is remembered as the first)."""
        earlier = self.earlier(candidate)
        if earlier is None:
            self.seen[self._key(candidate)] = candidate.trial
        return earlier

    def earlier(self, candidate: Candidate) -> int | None:
        return self.seen.get(self._key(candidate))

    @staticmethod
    def _key(candidate: Candidate) -> str:
        return candidate.recipe.to_yaml().split("\nsteps:", 1)[-1] if candidate.recipe else ""
