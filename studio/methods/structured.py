"""Structured pruning that really shrinks the model: whole MLP channels and whole attention heads are removed,
the layers replaced by smaller ones and the config rewritten, in the style of FLAP (An, Zhao, Yu, Tang & Wang
2024, "Fluctuation-based Adaptive Structured Pruning for Large Language Models") and LLM-Pruner (Ma, Fang &
Wang 2023, "LLM-Pruner: On the Structural Pruning of Large Language Models").

For every decoder block, with X the calibration inputs of the layer that reads the pruned units (the MLP's
down projection; the attention's output projection) and W that layer's weight (out, in):

1. Importance of input channel j.
   - "fluctuation" (FLAP's fluctuation metric, WIFV): S_j = Var_n(X_nj) · ‖W[:, j]‖², the sample variance over
     calibration tokens times the squared norm of the weight column. A channel whose input barely fluctuates
     can be replaced by its mean (step 3), so its removal costs little whatever its size.
   - "magnitude" (LLM-Pruner's l2 weight importance of a coupled group): the sum of the squared weights of
     every row and column that leave with the channel (gate/up rows and the down column).
   A head's importance is the sum over its head_dim channels (and, for "magnitude", its q/k/v rows). With
   grouped-query attention a key/value head and its query heads form one group, removed or kept together.
2. The same number of channels (round(mlp_ratio · intermediate)) and heads (round(head_ratio · heads)) with the
   lowest importance is removed in every block: uniform widths (FLAP's uniform setting), which is what one
   `intermediate_size` / `num_attention_heads` in a Hugging Face config can describe.
3. Baseline bias compensation (FLAP): the removed channels' mean contribution is folded into the bias,
   b ← b + W[:, removed] · mean_n(X_n,removed), so the output is unchanged on average.
4. The block's layers are replaced by new, smaller ones holding the kept rows / columns, and the model config
   gets the new widths, so `save_pretrained` writes a model that plain transformers rebuilds.

The layer roles are found by structure: the attention module is the block's submodule with a `head_dim`;
outside it, the linears reading the hidden state (out = intermediate) are the MLP's inputs and the one
writing it (in = intermediate) the MLP's output. Only the attention output projection is known by name
(OUTPUT_PROJECTION_NAMES). Whether the config can describe the result is tested, not assumed: block 0 is
pruned on the meta device and compared with a block built from the changed config.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

if TYPE_CHECKING:  # imported when used, so listing the methods does not load torch
    import torch
    from torch import nn

from studio.core.context import StepContext
from studio.core.errors import RecipeError
from studio.core.events import Metric
from studio.core.registry import Estimate, Family, LayerReport, Method, MethodParams, StepOutcome, register
from studio.core.state import QuantizedWeight, compression_state
from studio.core.structure import (
    find_decoder_blocks,
    in_out_features,
    is_linear,
    iter_layers,
    set_submodule,
    text_config,
    weight_matrix,
)

# The attention output projection of Llama/Qwen2/Gemma/Mistral (o_proj), OPT (out_proj) and GPT-2 (c_proj).
OUTPUT_PROJECTION_NAMES = ("o_proj", "out_proj", "c_proj")
# The config field holding the MLP width: Llama/Qwen2/Gemma/Mistral, OPT, GPT-2 (None there means 4 · hidden).
INTERMEDIATE_SIZE_KEYS = ("intermediate_size", "ffn_dim", "n_inner")
# Config flags that give every MLP / attention linear a bias (Llama-style); without one, a new bias cannot be saved.
MLP_BIAS_FLAG = "mlp_bias"
ATTENTION_BIAS_FLAG = "attention_bias"

from studio.core.calibration import CPU_FLOPS_PER_SECOND, DEFAULT_CALIBRATION_TOKENS


class StructuredParams(MethodParams):
    mlp_ratio: Annotated[
        float, Field(ge=0.0, le=0.9, description="Fraction of MLP intermediate channels removed in every block.")
    ] = 0.2
    head_ratio: Annotated[
        float, Field(ge=0.0, le=0.9, description="Fraction of attention heads removed in every block.")
    ] = 0.0
    score: Annotated[
        Literal["fluctuation", "magnitude"],
        Field(description="FLAP's input fluctuation × weight column norm, or the weights' l2 magnitude."),
    ] = "fluctuation"
    bias_compensation: Annotated[
        bool, Field(description="Fold the removed channels' mean contribution into the output bias (FLAP).")
    ] = True


# --- statistics and scores ---------------------------------------------------------------------------------


class ChannelStatistics:
    """Running mean and sample variance of each input channel over calibration tokens (Chan et al.'s pairwise
    update, in float64 so millions of tokens do not lose the variance to cancellation)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        n = x.shape[0]
        batch_mean = x.mean(dim=0)
        batch_m2 = (x - batch_mean).pow(2).sum(dim=0)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, batch_mean, batch_m2
            return
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta.pow(2) * (self.count * n / total)
        self.count = total

    @property
    def variance(self) -> torch.Tensor:
        return self.m2 / max(self.count - 1, 1)


def fluctuation_scores(w: torch.Tensor, stats: ChannelStatistics) -> torch.Tensor:
    """FLAP's S_j = Var(X_j) · ‖W[:, j]‖² for each input column j of `w` (out, in)."""
    return stats.variance.float() * w.float().pow(2).sum(dim=0)


def compensated_bias(w: torch.Tensor, bias: torch.Tensor | None, removed: torch.Tensor,
                     mean: torch.Tensor) -> torch.Tensor:
    """b + W[:, removed] · mean(X_removed): what the removed columns added to the output on average."""
    import torch

    shift = w[:, removed].double() @ mean[removed].to(device=w.device, dtype=torch.float64)
    base = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if bias is None else bias.double()
    return base + shift


def lowest(scores: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, removed) indices, each ascending: the `count` lowest scores are removed."""
    import torch

    order = torch.argsort(scores.float(), stable=True)
    return order[count:].sort().values, order[:count].sort().values


# --- the parts of a block ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Heads:
    """Attention geometry: `heads` query heads of `head_dim`, sharing `kv_heads` key/value heads in groups."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def segments(self, width: int) -> list[tuple[int, int]]:
        """(offset, size of one group) of each part of a projection `width` wide along its head axis: query
        rows (or output projection columns), key or value rows, or fused query-key-value rows (GPT-2)."""
        queries, keys = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if width == queries:
            return [(0, self.group * self.head_dim)]
        if width == keys:
            return [(0, self.head_dim)]
        if width == queries + 2 * keys:
            return [(0, self.group * self.head_dim), (queries, self.head_dim), (queries + keys, self.head_dim)]
        raise ValueError(f"a projection of width {width} is not made of {self.heads} query heads of "
                         f"{self.head_dim} with {self.kv_heads} key/value heads")

    def index(self, width: int, groups: torch.Tensor) -> torch.Tensor:
        """Row (or column) indices of the given head groups, in the projection's own order."""
        import torch

        parts = []
        for offset, size in self.segments(width):
            within = torch.arange(size, device=groups.device)
            parts.append(offset + (groups[:, None] * size + within).flatten())
        return torch.cat(parts)

    def per_group(self, width: int, values: torch.Tensor) -> torch.Tensor:
        """Sum of per-row values over each group's rows, across all segments: (kv_heads,)."""
        return sum(values[offset:offset + self.kv_heads * size].reshape(self.kv_heads, size).sum(dim=1)
                   for offset, size in self.segments(width))


@dataclass
class Anatomy:
    """The linears of one block by role, as names relative to the block."""

    mlp_inputs: list[str]  # gate/up, fc1, c_fc: one output row per MLP channel
    mlp_output: str  # down, fc2, c_proj: one input column per MLP channel
    attention_inputs: list[str]  # q/k/v or a fused qkv: rows per head
    attention_output: str  # o_proj, out_proj, c_proj: columns per head


def block_anatomy(block: nn.Module, hidden: int, intermediate: int | None) -> Anatomy:
    attention_path = next(
        (name for name, m in block.named_modules()
         if isinstance(getattr(m, "head_dim", None), int) and any(is_linear(c) for c in m.modules())),
        None,
    )
    if attention_path is None:
        raise ValueError("no attention module (a submodule with a head_dim) in the decoder block")
    prefix = f"{attention_path}." if attention_path else ""
    linears = {name: m for name, m in block.named_modules() if is_linear(m)}
    attention = [name for name in linears if name.startswith(prefix)]
    outputs = [name for name in attention if name.rsplit(".", 1)[-1] in OUTPUT_PROJECTION_NAMES]
    if len(outputs) != 1:
        raise ValueError(f"expected one attention output projection named one of {OUTPUT_PROJECTION_NAMES} in "
                         f"{attention_path}, found {outputs or 'none'}")
    mlp = {name: in_out_features(m) for name, m in linears.items() if name not in attention}
    if intermediate is None:  # GPT-2's n_inner: None; the width of the layer writing the hidden state
        widths = {i for i, o in mlp.values() if o == hidden and i != hidden}
        intermediate = widths.pop() if len(widths) == 1 else None
    if intermediate is None or intermediate == hidden:
        raise ValueError("cannot tell the MLP's input and output layers apart by their widths")
    mlp_inputs = [name for name, (i, o) in mlp.items() if (i, o) == (hidden, intermediate)]
    mlp_outputs = [name for name, (i, o) in mlp.items() if (i, o) == (intermediate, hidden)]
    others = set(mlp) - set(mlp_inputs) - set(mlp_outputs)
    if len(mlp_outputs) != 1 or not mlp_inputs or others:
        raise ValueError(f"the MLP linears {sorted(mlp)} are not layers {hidden}→{intermediate} followed by one "
                         f"{intermediate}→{hidden}")
    return Anatomy(mlp_inputs, mlp_outputs[0], [n for n in attention if n != outputs[0]], outputs[0])


# --- replacing layers --------------------------------------------------------------------------------------


def new_linear(like: nn.Module, w: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A new layer of `like`'s kind (nn.Linear or GPT-2's Conv1D) holding the (out, in) weight `w`."""
    import torch
    from torch import nn

    out_f, in_f = w.shape
    with torch.device("meta"):  # no memory or time spent initializing weights that are replaced at once
        layer = nn.Linear(in_f, out_f, bias=False) if isinstance(like, nn.Linear) else type(like)(out_f, in_f)
    grad = like.weight.requires_grad
    weight = w.contiguous() if isinstance(like, nn.Linear) else w.t().contiguous()
    layer.weight = nn.Parameter(weight, requires_grad=grad)
    layer.bias = None if bias is None else nn.Parameter(bias.to(like.weight.dtype).contiguous(), requires_grad=grad)
    return layer.train(like.training)


def slice_layer(layer: nn.Module, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> nn.Module:
    """A new layer with the kept rows and/or columns; `bias` replaces the (row-sliced) old bias."""
    w = weight_matrix(layer)
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if columns is not None:
        w = w.index_select(1, columns.to(w.device))
    if bias is None and layer.bias is not None:
        bias = layer.bias.data if rows is None else layer.bias.data.index_select(0, rows.to(w.device))
    return new_linear(layer, w, bias)


@dataclass
class Cut:
    """What one block loses: kept MLP channels and head groups, and the input means for compensation."""

    channels: torch.Tensor | None = None  # kept MLP channels; None: the MLP is not pruned
    channel_means: torch.Tensor | None = None  # mean input of every MLP channel, when compensating
    groups: torch.Tensor | None = None  # kept key/value groups; None: attention is not pruned
    head_means: torch.Tensor | None = None  # mean input of every output-projection column, when compensating


def removed_from(kept: torch.Tensor, size: int) -> torch.Tensor:
    import torch

    mask = torch.ones(size, dtype=torch.bool, device=kept.device)
    mask[kept] = False
    return mask.nonzero().flatten()


def shrink_block(block: nn.Module, anatomy: Anatomy, heads: Heads, cut: Cut) -> dict[str, tuple[Any, Any]]:
    """Replace the block's pruned layers by smaller ones; {relative name: (kept rows, kept columns)}."""
    changed: dict[str, tuple[Any, Any]] = {}
    layers = dict(block.named_modules())
    if cut.channels is not None:
        for name in anatomy.mlp_inputs:
            set_submodule(block, name, slice_layer(layers[name], rows=cut.channels))
            changed[name] = (cut.channels, None)
        down = layers[anatomy.mlp_output]
        bias = None
        if cut.channel_means is not None:
            w = weight_matrix(down)
            bias = compensated_bias(w, down.bias, removed_from(cut.channels, w.shape[1]), cut.channel_means)
        set_submodule(block, anatomy.mlp_output, slice_layer(down, columns=cut.channels, bias=bias))
        changed[anatomy.mlp_output] = (None, cut.channels)
    if cut.groups is not None:
        for name in anatomy.attention_inputs:
            rows = heads.index(in_out_features(layers[name])[1], cut.groups)
            set_submodule(block, name, slice_layer(layers[name], rows=rows))
            changed[name] = (rows, None)
        out = layers[anatomy.attention_output]
        width = in_out_features(out)[0]
        columns = heads.index(width, cut.groups)
        bias = None
        if cut.head_means is not None:
            w = weight_matrix(out)
            bias = compensated_bias(w, out.bias, removed_from(columns, width), cut.head_means)
        set_submodule(block, anatomy.attention_output, slice_layer(out, columns=columns, bias=bias))
        changed[anatomy.attention_output] = (None, columns)
    return changed


def conform_to(block: nn.Module, reference: nn.Module) -> None:
    """Make `block` what its config rebuilds: zero biases where the rebuilt block has biases (a config flag such
    as mlp_bias gives gate and up one too) and the rebuilt modules' integer sizes (e.g. LlamaMLP's
    intermediate_size, OPT's num_heads)."""
    import torch
    from torch import nn

    ours = dict(block.named_modules())
    for name, ref in reference.named_modules():
        module = ours.get(name)
        if module is None:
            continue
        if is_linear(module) and getattr(ref, "bias", None) is not None and module.bias is None:
            out_f = in_out_features(module)[1]
            w = module.weight
            zeros = torch.zeros(out_f, dtype=w.dtype, device=w.device)
            module.bias = nn.Parameter(zeros, requires_grad=w.requires_grad)
        for attr, value in vars(ref).items():
            if type(value) is int and attr != "layer_idx" and type(vars(module).get(attr)) is int:
                setattr(module, attr, value)


def shape_mismatches(block: nn.Module, reference: nn.Module) -> list[str]:
    ours = {n: tuple(p.shape) for n, p in block.named_parameters()}
    theirs = {n: tuple(p.shape) for n, p in reference.named_parameters()}
    return [f"{n} {ours.get(n, 'missing')} where the config builds {theirs.get(n, 'none')}"
            for n in sorted(set(ours) | set(theirs)) if ours.get(n) != theirs.get(n)]


# --- the plan: widths, config changes, and whether the config can describe them ---------------------------


def model_heads(config) -> Heads:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Heads(heads, kv_heads, head_dim)


def ratio_list(values: list[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in values) or "none"


@dataclass
class Plan:
    heads: Heads
    anatomy: Anatomy
    channels: int  # MLP width before
    remove_channels: int
    remove_groups: int  # key/value groups (each a key/value head with its query heads)
    compensate_mlp: bool
    compensate_attention: bool
    config_changes: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # warnings for the user (skipped compensation)
    problems: list[str] = field(default_factory=list)  # why the step cannot run on this model

    @property
    def changes_nothing(self) -> bool:
        return not self.remove_channels and not self.remove_groups

    def cut_template(self) -> Cut:
        """A cut that keeps the first channels and groups: what the config must describe, whatever is kept."""
        import torch

        cut = Cut()
        if self.remove_channels:
            cut.channels = torch.arange(self.channels - self.remove_channels)
            cut.channel_means = torch.zeros(self.channels) if self.compensate_mlp else None
        if self.remove_groups:
            cut.groups = torch.arange(self.heads.kv_heads - self.remove_groups)
            width = self.heads.heads * self.heads.head_dim
            cut.head_means = torch.zeros(width) if self.compensate_attention else None
        return cut


def plan_pruning(model: nn.Module, params: StructuredParams) -> Plan:
    config = text_config(model)
    blocks = find_decoder_blocks(model).blocks
    heads = model_heads(config)
    key = next((k for k in INTERMEDIATE_SIZE_KEYS if hasattr(config, k)), None)
    try:
        anatomy = block_anatomy(blocks[0], config.hidden_size, getattr(config, key) if key else None)
    except ValueError as exc:
        layout = type(blocks[0]).__name__
        raise RecipeError(f"structured pruning does not know this block layout ({layout}): {exc}.") from None
    layers = dict(blocks[0].named_modules())
    channels = in_out_features(layers[anatomy.mlp_output])[0]
    plan = Plan(heads, anatomy, channels, round(params.mlp_ratio * channels), 0, False, False)
    if plan.remove_channels:
        if key is None:
            plan.problems.append(f"field 'mlp_ratio': {type(config).__name__} has none of the fields "
                                 f"{INTERMEDIATE_SIZE_KEYS} that hold the MLP width; use mlp_ratio 0.")
        elif plan.remove_channels >= channels:
            plan.problems.append(f"field 'mlp_ratio': {params.mlp_ratio} would remove all {channels} MLP channels.")
        else:
            plan.config_changes[key] = channels - plan.remove_channels
    _plan_heads(plan, params, config)
    width = in_out_features(layers[anatomy.attention_output])[0]
    if plan.remove_groups and width != heads.heads * heads.head_dim:
        plan.problems.append(f"field 'head_ratio': the attention output projection reads {width} columns, not "
                             f"{heads.heads} heads of {heads.head_dim} as the config says; use head_ratio 0.")
    if params.bias_compensation and not plan.changes_nothing:
        _plan_compensation(plan, config, layers, model)
    if not plan.problems and not plan.changes_nothing:
        _check_config_describes(plan, blocks[0], config)
    return plan


def _plan_heads(plan: Plan, params: StructuredParams, config) -> None:
    heads = plan.heads
    removed = round(params.head_ratio * heads.heads)
    if not removed:
        return
    possible = [g * heads.group / heads.heads for g in range(1, heads.kv_heads) if g * heads.group / heads.heads <= 0.9]
    if heads.heads % heads.kv_heads or removed % heads.group:
        plan.problems.append(
            f"field 'head_ratio': {params.head_ratio} would remove {removed} of {heads.heads} attention heads, but "
            f"with grouped-query attention heads go in whole groups of {heads.group} (a key/value head with its "
            f"query heads). Possible head ratios: {ratio_list(possible)}, or 0."
        )
        return
    plan.remove_groups = removed // heads.group
    if plan.remove_groups >= heads.kv_heads:
        plan.problems.append(f"field 'head_ratio': {params.head_ratio} would remove every attention head; "
                             f"possible head ratios: {ratio_list(possible)}.")
        return
    plan.config_changes["num_attention_heads"] = heads.heads - removed
    if hasattr(config, "num_key_value_heads"):
        plan.config_changes["num_key_value_heads"] = heads.kv_heads - plan.remove_groups
    if getattr(config, "head_dim", None) is None:  # else it would be derived from the smaller head count
        plan.config_changes["head_dim"] = heads.head_dim


def _plan_compensation(plan: Plan, config, layers: dict[str, nn.Module], model: nn.Module) -> None:
    """Compensate where the saved config can hold the bias: the layer has one, or a flag can give it one."""
    parts = [("mlp", plan.remove_channels, plan.anatomy.mlp_output, MLP_BIAS_FLAG),
             ("attention", plan.remove_groups, plan.anatomy.attention_output, ATTENTION_BIAS_FLAG)]
    for part, removing, layer, flag in parts:
        if not removing:
            continue
        possible = layers[layer].bias is not None or hasattr(config, flag)
        if layers[layer].bias is None and possible:
            plan.config_changes[flag] = True
        if part == "mlp":
            plan.compensate_mlp = possible
        else:
            plan.compensate_attention = possible
        if not possible:
            plan.notes.append(
                f"bias compensation skipped for the {part} of {type(model).__name__}: its {layer.rsplit('.', 1)[-1]} "
                f"has no bias and {type(config).__name__} has no option ('{flag}') to give it one, so a saved "
                "model could not hold it."
            )


def rebuild_block(block: nn.Module, config, index: int) -> nn.Module:
    """The block as transformers builds it from `config`, on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        return type(block)(config=config, layer_idx=index)


def changed_config(config, changes: dict[str, Any]):
    new = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(new, key, value)
    return new


def _check_config_describes(plan: Plan, block: nn.Module, config) -> None:
    """Prune a meta copy of block 0 as planned and compare it with the block the changed config builds."""
    new_config = changed_config(config, plan.config_changes)
    what = f"{type(config).__name__} with {plan.config_changes}"
    try:
        probe = rebuild_block(block, config, 0)
        reference = rebuild_block(block, new_config, 0)
    except Exception as exc:  # e.g. GPT-2/OPT refuse a hidden size not divisible by the head count
        reason = str(exc).rstrip(". ")
        plan.problems.append(f"{what} does not build a decoder block ({type(exc).__name__}: {reason}); "
                             + _advice(plan))
        return
    shrink_block(probe, plan.anatomy, plan.heads, plan.cut_template())
    conform_to(probe, reference)
    mismatches = shape_mismatches(probe, reference)
    if mismatches:
        plan.problems.append(f"{what} cannot describe the pruned block ({mismatches[0]}); "
                             + _advice(plan))


def _advice(plan: Plan) -> str:
    if plan.remove_groups:
        return ("this architecture derives its head size from the hidden size, so heads cannot be removed: "
                "use field 'head_ratio' 0.")
    return "use field 'bias_compensation' false, or another method for this architecture."


# --- records of earlier steps ------------------------------------------------------------------------------


def carry_record(ctx: StepContext, name: str, rows, columns) -> None:
    """Keep an earlier step's record valid for the smaller layer: masks and per-row quantization codes are
    sliced like the weight; codes whose groups the cut splits are dropped (the dense weight stays exact)."""
    state = compression_state(ctx.model)
    record = state.get(name)
    if record is None:
        return
    changes: dict[str, Any] = {}
    if record.packed_mask is not None:
        changes["mask"] = _take(record.mask, rows, columns)
    quant = record.quant
    if quant is not None:
        if columns is None or quant.group_size == 0:
            changes["quant"] = QuantizedWeight.from_codes(
                _take(quant.codes, rows, columns), _take(quant.scales, rows, None), _take(quant.zeros, rows, None),
                quant.bits, quant.group_size, quant.symmetric)
        else:
            changes["quant"] = None
            ctx.warn(f"{name}: its quantization groups are split by the removed channels, so its codes were "
                     "dropped (the weights stay as they were)")
    state[name] = record.with_changes(**changes)


def _take(t: torch.Tensor, rows, columns) -> torch.Tensor:
    if rows is not None:
        t = t.index_select(0, rows.to(t.device))
    if columns is not None:
        t = t.index_select(1, columns.to(t.device))
    return t


# --- the method ----------------------------------------------------------------------------------------------


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in set(module.parameters()))


def choose_cut(plan: Plan, params: StructuredParams, block: nn.Module, stats: dict[str, ChannelStatistics]) -> Cut:
    layers = dict(block.named_modules())
    cut = Cut()
    if plan.remove_channels:
        down = weight_matrix(layers[plan.anatomy.mlp_output])
        if params.score == "fluctuation":
            scores = fluctuation_scores(down, stats["mlp"])
        else:
            scores = down.float().pow(2).sum(dim=0)
            for name in plan.anatomy.mlp_inputs:
                scores = scores + weight_matrix(layers[name]).float().pow(2).sum(dim=1)
        cut.channels, _ = lowest(scores, plan.remove_channels)
        cut.channel_means = stats["mlp"].mean if plan.compensate_mlp else None
    if plan.remove_groups:
        out = weight_matrix(layers[plan.anatomy.attention_output])
        width = out.shape[1]
        if params.score == "fluctuation":
            scores = plan.heads.per_group(width, fluctuation_scores(out, stats["attention"]))
        else:
            scores = plan.heads.per_group(width, out.float().pow(2).sum(dim=0))
            for name in plan.anatomy.attention_inputs:
                w = weight_matrix(layers[name])
                scores = scores + plan.heads.per_group(w.shape[0], w.float().pow(2).sum(dim=1))
        cut.groups, _ = lowest(scores, plan.remove_groups)
        cut.head_means = stats["attention"].mean if plan.compensate_attention else None
    return cut


def layer_report(name: str, old: nn.Module, new: nn.Module, rows, columns) -> LayerReport:
    """Parameters after, the fraction of the weight removed, and the removed weights' share of its norm
    (the relative error of the weight had the removed rows/columns been zeroed)."""
    w = weight_matrix(old).float()
    kept = _take(w, rows, columns)
    error = ((w.norm() ** 2 - kept.norm() ** 2).clamp_min(0).sqrt() / w.norm().clamp_min(1e-12)).item()
    after = weight_matrix(new).numel()
    return LayerReport(name, error=error, sparsity=1 - after / w.numel(), parameters=after)


def all_blocks_targeted(ctx: StepContext) -> None:
    count = len(find_decoder_blocks(ctx.model).blocks)
    missing = sorted(set(range(count)) - set(ctx.layers))
    if missing:
        raise RecipeError(
            f"step {ctx.index + 1} (structured): blocks {missing} are not targeted, but a Hugging Face config has "
            "one MLP width and one head count for every block; target every decoder block."
        )


@register
class StructuredPruning(Method):
    id = "structured"
    title = "Structured pruning (FLAP)"
    family = Family.PRUNING
    summary = "Remove whole MLP channels and attention heads (FLAP fluctuation score, bias compensation)."
    needs_calibration = True
    Params = StructuredParams

    def check(self, layers, params: StructuredParams) -> list[str]:
        gaps = sorted(set(range(max(layers, default=-1) + 1)) - set(layers))
        if gaps:
            return [f"blocks {gaps} are not targeted, but one config width applies to every block; "
                    "target every decoder block."]
        return []

    def check_model(self, model: nn.Module, params: StructuredParams) -> list[str]:
        """Problems only the model shows: head ratios that whole groups cannot meet, configs that cannot
        describe the pruned blocks."""
        try:
            return plan_pruning(model, params).problems
        except RecipeError as exc:
            return [str(exc)]

    def estimate(self, layers, params: StructuredParams) -> Estimate:
        weights = sum(m.weight.numel() for _, m in iter_layers(layers))
        weight_bytes = sum(m.weight.numel() * m.weight.element_size() for _, m in iter_layers(layers))
        # the kept rows/columns become new tensors (the original keeps its own): at most every targeted weight
        seconds = 2 * 2 * DEFAULT_CALIBRATION_TOKENS * weights / CPU_FLOPS_PER_SECOND  # observe, then propagate
        return Estimate(extra_bytes=weight_bytes, seconds=seconds)

    def apply(self, ctx: StepContext, params: StructuredParams) -> StepOutcome:
        plan = plan_pruning(ctx.model, params)
        if plan.problems:
            raise RecipeError("\n".join(f"step {ctx.index + 1} (structured): {p}" for p in plan.problems))
        all_blocks_targeted(ctx)
        before = parameter_count(ctx.model)
        if plan.changes_nothing:
            return StepOutcome(ctx.reports, self._summary(plan, params, before, before, {}))
        for note in plan.notes:
            ctx.warn(note)
        config = text_config(ctx.model)
        new_config = changed_config(config, plan.config_changes)
        decoder = find_decoder_blocks(ctx.model)
        block_sizes = {}
        for bp in ctx.layerwise():
            stats = self._observe(bp, plan, params)
            ctx.cancel.check()
            block_sizes.setdefault("before", parameter_count(bp.block))
            old = dict(bp.block.named_modules())
            cut = choose_cut(plan, params, bp.block, stats)
            changed = shrink_block(bp.block, plan.anatomy, plan.heads, cut)
            reference = rebuild_block(bp.block, new_config, bp.index)
            conform_to(bp.block, reference)
            mismatches = shape_mismatches(bp.block, reference)
            if mismatches:
                raise RuntimeError(f"block {bp.index} does not match its new config: {mismatches[:3]}")
            block_sizes.setdefault("after", parameter_count(bp.block))
            new = dict(bp.block.named_modules())
            for name, (rows, columns) in changed.items():
                full = f"{decoder.name(bp.index)}.{name}"
                report = layer_report(full, old[name], new[name], rows, columns)
                carry_record(ctx, full, rows, columns)
                ctx.reports.append(report)
                ctx.emit(Metric("layer_error", report.error, ctx.index, full))
        for key, value in plan.config_changes.items():
            setattr(config, key, value)
        return StepOutcome(ctx.reports, self._summary(plan, params, before, parameter_count(ctx.model), block_sizes))

    @staticmethod
    def _observe(bp, plan: Plan, params: StructuredParams) -> dict[str, ChannelStatistics]:
        """Input statistics of the layers reading the pruned channels, over every calibration token."""
        layers = dict(bp.block.named_modules())
        watched = {}
        if plan.remove_channels:
            watched[plan.anatomy.mlp_output] = "mlp"
        if plan.remove_groups:
            watched[plan.anatomy.attention_output] = "attention"
        stats = {part: ChannelStatistics() for part in watched.values()}
        if params.score == "magnitude" and not (plan.compensate_mlp or plan.compensate_attention):
            return stats  # nothing to observe: the engine runs the pruned block afterwards anyway
        by_module = {name: layers[name] for name in watched}
        bp.observe_inputs(lambda name, x: stats[watched[name]].add(x), layers=by_module)
        return stats

    @staticmethod
    def _summary(plan: Plan, params: StructuredParams, before: int, after: int, block_sizes: dict) -> dict:
        heads = plan.heads
        summary = {
            "score": params.score,
            "parameters_before": before,
            "parameters_after": after,
            "parameters_removed": before - after,
            "mlp_channels": [plan.channels, plan.channels - plan.remove_channels],
            "attention_heads": [heads.heads, heads.heads - plan.remove_groups * heads.group],
            "key_value_heads": [heads.kv_heads, heads.kv_heads - plan.remove_groups],
            "bias_compensation": {"mlp": plan.compensate_mlp, "attention": plan.compensate_attention},
            "config": dict(plan.config_changes),
        }
        if block_sizes:
            summary["block_parameters"] = [block_sizes["before"], block_sizes["after"]]
        return summary
