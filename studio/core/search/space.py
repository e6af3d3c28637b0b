"""From a trial's parameters to a candidate: a real recipe (low-rank factorization, pruning, then mixed-precision
quantization) and the size it will have, predicted from the layer shapes before anything runs.

The quantization step gets the widest average code width whose packed size (codes, 16-bit scales, zero points
counted at the widest width: an upper bound) keeps the candidate within its share of the budget; a candidate
that would not fit even at the narrowest width is rejected before it runs. Sizes follow the engine's accounting
(`studio.core.state.packed_size`): pruned weights are stored densely, so pruning buys no bytes, only FLOPs."""

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

    @property
    def target_bytes(self) -> int:
        return self.target_weights * self.element_size


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


def budget_measure(spec: SearchSpec, shape: ModelShape, compressed_bytes: int) -> float:
    """The budget's quantity for a model of `compressed_bytes` compressed bytes."""
    target = compressed_bytes - shape.other_bytes
    if spec.budget.kind == "bits_per_weight":
        return 8 * target / max(shape.target_weights, 1)
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
    from studio.methods.low_rank import budget_rank, dense_break_even

    if ratio <= 0:
        return [(out_f, in_f)]
    rank = min(budget_rank(out_f, in_f, ratio), out_f, in_f)
    rank = max(rank_multiple, rank - rank % rank_multiple)
    if rank >= dense_break_even(out_f, in_f):
        return [(out_f, in_f)]
    return [(out_f, rank), (rank, in_f)]


def scale_bytes(out_f: int, in_f: int, group_size: int, symmetric: bool, zero_bits: int) -> int:
    groups = out_f * (in_f // (group_size or in_f))
    return groups * 2 + (0 if symmetric else math.ceil(groups * zero_bits / 8))


def suggest(trial, spec: SearchSpec) -> dict[str, Any]:
    """Ask the Optuna trial for one candidate's parameters (a choice with one option is not searched)."""
    q = spec.space.quantization

    def pick(name: str, options: list):
        return options[0] if len(options) == 1 else trial.suggest_categorical(name, options)

    params: dict[str, Any] = {
        "quantizer": pick("quantizer", list(q.quantizer)),
        "group_size": pick("group_size", list(q.group_sizes)),
        "symmetric": pick("symmetric", list(q.symmetric)),
        "min_bits": pick("min_bits", list(q.min_bits)),
    }
    low, high = q.budget_fraction
    params["budget_fraction"] = high if low == high else trial.suggest_float("budget_fraction", low, high, step=0.01)
    if spec.space.sparsity is not None:
        params["sparsity"] = pick("sparsity", list(spec.space.sparsity.levels))
    if spec.space.low_rank is not None:
        params["low_rank_ratio"] = pick("low_rank_ratio", list(spec.space.low_rank.ratios))
    return params


def build_candidate(spec: SearchSpec, shape: ModelShape, trial: int, params: dict[str, Any]) -> Candidate:
    """The recipe for `params`, with the widest average width (in 1/1000 bit) that fits its share of the budget."""
    q = spec.space.quantization
    group, symmetric, min_bits = params["group_size"], params["symmetric"], params["min_bits"]
    ratio = params.get("low_rank_ratio", 0.0)
    matrices = [m for o, i in shape.layers.values() for m in factored_shapes(o, i, ratio, max(group, 1))]
    bad = [(o, i) for o, i in matrices if group and i % group]
    if bad:
        reason = f"group size {group} does not divide the input width {bad[0][1]}"
        return Candidate(trial, params, None, 0, math.inf, False, reason)
    weights = sum(o * i for o, i in matrices)
    fixed = shape.other_bytes + sum(scale_bytes(o, i, group, symmetric, q.max_bits) for o, i in matrices) \
        + len(matrices)  # codes round up to whole bytes per matrix
    allowed = allowed_total_bytes(spec, shape, params["budget_fraction"])
    bits = min(math.floor((allowed - fixed) * 8 / weights * 1000) / 1000, float(q.max_bits))
    predicted = fixed + math.ceil(weights * max(bits, min_bits) / 8)
    measure = budget_measure(spec, shape, predicted)
    if bits < min_bits:
        limit = spec.budget.value * params["budget_fraction"]
        reason = (f"even {min_bits} bits per layer would take {measure:.4g} > {limit:.4g} {_unit(spec)} "
                  f"({params['budget_fraction']:.0%} of the budget)")
        return Candidate(trial, params, None, predicted, measure, False, reason)
    steps = []
    if ratio > 0:
        steps.append(Step(spec.space.low_rank.method, {"ratio": ratio, "rank_multiple": max(group, 1)}))
    if params.get("sparsity", 0.0) > 0:
        steps.append(Step(spec.space.sparsity.method, {"sparsity": params["sparsity"]}))
    steps.append(Step("mixed_precision", {
        "min_bits": min_bits, "max_bits": q.max_bits, "target_bits": bits,
        "group_size": group, "symmetric": symmetric, "quantizer": params["quantizer"],
    }))
    recipe = Recipe(steps, name=candidate_name(params, bits, q.max_bits), calibration=spec.calibration,
                    description=f"Found by a search under {spec.budget.value:g} {_unit(spec)} (trial {trial}).")
    return Candidate(trial, params, recipe, predicted, measure, True)


def candidate_name(params: dict[str, Any], bits: float, max_bits: int) -> str:
    parts = [f"{params['quantizer'].upper()} mixed {bits:.2f} bit ({params['min_bits']}-{max_bits})",
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
        key = candidate.recipe.to_yaml().split("\nsteps:", 1)[-1] if candidate.recipe else ""
        if key in self.seen:
            return self.seen[key]
        self.seen[key] = candidate.trial
        return None
