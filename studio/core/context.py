"""What a method sees while it runs: its target layers by block, and the run's events, cancellation and records."""

from __future__ import annotations

from dataclasses import dataclass, field

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads lazily: the window must open fast
    import torch
    from torch import nn

    from studio.core.evaluation.perplexity import PerplexityConfig

from studio.core.calibration import CalibrationData, layerwise
from studio.core.errors import RecipeError
from studio.core.events import CancelToken, EventCallback, Metric, Progress, Warning
from studio.core.memory import return_free_memory
from studio.core.registry import LayerReport
from studio.core.state import compression_state, update_record
from studio.core.structure import set_weight_matrix, weight_matrix

BLOCKS_FREE_WORTH_RETURNING = 32 << 20  # bytes the heaps hold free before the blocks hand them back


@dataclass(frozen=True)
class Evaluation:
    """The evaluation tokens the run scores every step on, and how (window, stride)."""

    tokens: torch.Tensor  # (1, n) token ids
    config: PerplexityConfig


@dataclass
class StepContext:
    model: nn.Module
    layers: dict[int, dict[str, nn.Module]]  # block index -> {full layer name: module}
    index: int  # the step's position in the recipe
    emit: EventCallback
    cancel: CancelToken
    reports: list[LayerReport] = field(default_factory=list)
    calibration: CalibrationData | None = None  # set by the runner for methods that need calibration
    teacher: nn.Module | None = None  # the loaded original, read-only: distillation's teacher, a reference
    in_place: bool = False  # the run changes the loaded model itself: weights are written into their tensors
    tokenizer_or_loader: Any = None  # the model's tokenizer, or a TokenizerLoader that loads it when asked
    evaluation: Evaluation | None = None  # the run's evaluation text, when it has one

    @property
    def tokenizer(self) -> Any:
        from studio.core.loading import resolve_tokenizer  # loading imports torch; the window opens without it

        return resolve_tokenizer(self.tokenizer_or_loader)

    def layerwise(self, all_blocks: bool = False):
        """The layer-wise calibration engine over this step's targets (see studio.core.calibration)."""
        if self.calibration is None:
            raise RecipeError(f"step {self.index + 1} needs calibration text; add a 'calibration' section to the recipe.")
        return layerwise(self.model, self.calibration, self.layers, cancel=self.cancel, emit=self.emit,
                         step_index=self.index, all_blocks=all_blocks)

    def blocks(self):
        """(block index, layers) in order; checks for cancellation before each block and reports progress
        after it, so a method written as a plain loop gets both for free. What blocks freed goes back to the
        system once it adds up to BLOCKS_FREE_WORTH_RETURNING (return_free_memory), so the heap does not carry
        it to the end of the step, nor do blocks that free a few MiB fault the same pages in again each time."""
        total = len(self.layers)
        for done, (block, layers) in enumerate(self.layers.items()):
            self.cancel.check()
            yield block, layers
            return_free_memory(at_least=BLOCKS_FREE_WORTH_RETURNING)
            self.emit(Progress(self.index, done + 1, total, "block", f"block {block}"))

    def replace_weight(self, name: str, module: nn.Module, new: torch.Tensor, report: LayerReport, **record) -> None:
        """Give `module` its compressed (out, in) weight, record what exporters need, report the layer's
        relative error, and drop records a previous step made that no longer describe the weight."""
        old = weight_matrix(module)
        report.error = float((new.float() - old.float()).norm() / old.float().norm().clamp_min(1e-12))
        set_weight_matrix(module, new, in_place=self.in_place)
        if record.get("quant") is not None:  # the layer now holds the dequantized codes: read them back from it
            record["quant"] = record["quant"].on_weight(weight_matrix(module))
        previous = compression_state(self.model).get(name)
        if previous is not None and previous.quant is not None and "quant" not in record:
            record["quant"] = None
            self.warn(f"{name}: its quantization codes no longer match its weights after this step and were dropped")
        update_record(self.model, name, **record)
        self.reports.append(report)
        self.emit(Metric("layer_error", report.error, self.index, name))

    def warn(self, message: str) -> None:
        self.emit(Warning(message, self.index))
