"""Layer dropping by Block Influence (ShortGPT: Men, Xu, Zhang, Wang, Lin, Lu, Han & Chen 2024, "ShortGPT:
Layers in Large Language Models are More Redundant Than You Expect").

The Block Influence of decoder block i, with x_i,t its input hidden state and x_i+1,t its output at token t:

    BI_i = 1 − E_t [ x_i,tᵀ x_i+1,t / (‖x_i,t‖ ‖x_i+1,t‖) ],

the expectation over every calibration token. A block that hardly turns the hidden state (BI near 0) is nearly
the identity. BI is measured once on the unmodified model, every block on the outputs of the one before, and
the `blocks` targeted blocks of lowest BI are deleted from the decoder's ModuleList. The config's
num_hidden_layers, its per-layer lists (such as layer_types) and the blocks' `layer_idx` (by which the KV
cache is indexed) are renumbered, so the saved model loads as an ordinary shallower one.

Records of earlier steps (studio_state) are keyed by layer name; those of later blocks are renamed to their
new block numbers, those of deleted blocks dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field

if TYPE_CHECKING:  # imported when used, so listing the methods does not load torch
    import torch
    from torch import nn

from studio.core.context import StepContext
from studio.core.errors import RecipeError
from studio.core.registry import Estimate, Family, LayerReport, Method, MethodParams, StepOutcome, register
from studio.core.state import compression_state
from studio.core.structure import find_decoder_blocks, iter_layers, text_config

from studio.core.calibration import CPU_FLOPS_PER_SECOND, DEFAULT_CALIBRATION_TOKENS
# GPT-2 can scale attention by 1/(layer_idx + 1), fixed when a block is built: renumbered blocks would change.
LAYER_INDEX_SCALING_FLAG = "scale_attn_by_inverse_layer_idx"


class LayerDropParams(MethodParams):
    blocks: Annotated[
        int, Field(ge=1, description="How many decoder blocks to remove: those of lowest Block Influence.")
    ] = 4


class InfluenceMeter:
    """Running mean over tokens of cos(x_in, x_out); BI = 1 − that mean."""

    def __init__(self) -> None:
        self.total = 0.0
        self.tokens = 0

    def add(self, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        import torch

        cosine = torch.nn.functional.cosine_similarity(x_in.double(), x_out.double(), dim=-1)
        self.total += float(cosine.sum())
        self.tokens += cosine.numel()

    @property
    def influence(self) -> float:
        return 1.0 - self.total / max(self.tokens, 1)


def block_influences(ctx: StepContext) -> dict[int, float]:
    """BI of every decoder block on the calibration data (the model is not changed while measuring)."""
    influences = {}
    for bp in ctx.layerwise(all_blocks=True):
        meter = InfluenceMeter()
        for x_in, x_out in zip(bp.inputs, bp.outputs()):
            meter.add(x_in, x_out)
        influences[bp.index] = meter.influence
    return influences


def least_influential(influences: dict[int, float], candidates: list[int], count: int) -> list[int]:
    """The `count` candidate blocks of lowest BI, ascending by index (ties: the earlier block)."""
    return sorted(sorted(candidates, key=lambda i: (influences[i], i))[:count])


def drop_blocks(model: nn.Module, removed: list[int]) -> dict:
    """Delete the blocks from the decoder's ModuleList and renumber what refers to block positions: each
    module's layer_idx, the config's layer count and per-layer lists, and the studio_state records."""
    decoder = find_decoder_blocks(model)
    blocks = model.get_submodule(decoder.path)
    before = len(blocks)
    for index in sorted(removed, reverse=True):
        del blocks[index]  # the working copy's own ModuleList; the original model keeps its own
    for position, block in enumerate(blocks):
        for module in block.modules():
            if type(getattr(module, "layer_idx", None)) is int:
                module.layer_idx = position
    lists = shorten_per_layer_lists(model, before, removed)
    renamed, dropped = renumber_records(model, decoder.path, before, removed)
    return {"config_lists": lists, "records_renamed": renamed, "records_dropped": dropped}


def shorten_per_layer_lists(model: nn.Module, before: int, removed: list[int]) -> list[str]:
    """Set num_hidden_layers and drop the removed entries of every config list with one entry per layer
    (layer_types, and their kind in other architectures); returns those lists' names."""
    config = text_config(model)
    shortened = []
    for key, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == before and key != "architectures":
            setattr(config, key, type(value)(v for i, v in enumerate(value) if i not in removed))
            shortened.append(key)
    config.num_hidden_layers = before - len(removed)
    return shortened


def renumber_records(model: nn.Module, path: str, before: int, removed: list[int]) -> tuple[int, int]:
    """Rename the records of blocks after a removed one to their new block numbers; drop the removed blocks'."""
    new_index = {}
    for old in range(before):
        if old not in removed:
            new_index[old] = len(new_index)
    state = compression_state(model)
    prefix = f"{path}."
    records, renamed, dropped = {}, 0, 0
    for name, record in state.items():
        head, _, rest = name[len(prefix):].partition(".")
        if not name.startswith(prefix) or not head.isdigit():
            records[name] = record
        elif int(head) in new_index:
            new_name = f"{prefix}{new_index[int(head)]}.{rest}" if rest else f"{prefix}{new_index[int(head)]}"
            records[new_name] = record
            renamed += new_name != name
        else:
            dropped += 1
    state.clear()
    state.update(records)
    return renamed, dropped


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in set(module.parameters()))


@register
class LayerDrop(Method):
    id = "layer_drop"
    title = "Layer dropping (ShortGPT)"
    family = Family.PRUNING
    summary = "Delete the decoder blocks that change the hidden state least (ShortGPT Block Influence)."
    needs_calibration = True
    Params = LayerDropParams

    def check(self, layers, params: LayerDropParams) -> list[str]:
        if params.blocks >= len(layers):
            return [f"field 'blocks': removing {params.blocks} blocks would leave none of the {len(layers)} "
                    f"targeted decoder blocks; at most {len(layers) - 1} can be removed."]
        return []

    def check_model(self, model: nn.Module, params: LayerDropParams) -> list[str]:
        """Problems only the model shows: removing every block, and blocks whose behaviour depends on their
        position."""
        problems = []
        count = len(find_decoder_blocks(model).blocks)
        if params.blocks >= count:
            problems.append(f"field 'blocks': the model has {count} decoder blocks; at most {count - 1} can be "
                            "removed.")
        if getattr(text_config(model), LAYER_INDEX_SCALING_FLAG, False):
            problems.append(f"the config's {LAYER_INDEX_SCALING_FLAG} makes each block depend on its position, so "
                            "blocks cannot be removed without changing the others.")
        return problems

    def estimate(self, layers, params: LayerDropParams) -> Estimate:
        weights = sum(m.weight.numel() for _, m in iter_layers(layers))
        return Estimate(extra_bytes=0, seconds=2 * DEFAULT_CALIBRATION_TOKENS * weights / CPU_FLOPS_PER_SECOND)

    def apply(self, ctx: StepContext, params: LayerDropParams) -> StepOutcome:
        problems = self.check(ctx.layers, params) + self.check_model(ctx.model, params)
        if problems:
            raise RecipeError("\n".join(f"step {ctx.index + 1} (layer_drop): {p}" for p in problems))
        influences = block_influences(ctx)
        removed = least_influential(influences, sorted(ctx.layers), params.blocks)
        decoder = find_decoder_blocks(ctx.model)
        before = parameter_count(ctx.model)
        for index in removed:
            ctx.reports.append(LayerReport(decoder.name(index), sparsity=1.0, parameters=0))
        ctx.cancel.check()
        changes = drop_blocks(ctx.model, removed)
        after = parameter_count(ctx.model)
        summary = {
            "block_influence": [round(influences[i], 6) for i in sorted(influences)],
            "removed": removed,
            "num_hidden_layers": [len(decoder.blocks), len(decoder.blocks) - len(removed)],
            "parameters_before": before,
            "parameters_after": after,
            "parameters_removed": before - after,
            **changes,
        }
        return StepOutcome(ctx.reports, summary)
