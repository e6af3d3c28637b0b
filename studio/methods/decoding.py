"""What the dynamic (inference-time) methods share: the model's output head applied to any hidden state, the
decoder blocks' outputs, a per-layer-cropped KV cache, greedy decoding with the cache, prompts cut from the
run's text, and the timing of generation.

The output head is the norm the model applies after its last decoder block (Llama/Qwen2/Gemma `model.norm`, OPT
`model.decoder.final_layer_norm`, GPT-2 `transformer.ln_f`), then the LM head (`get_output_embeddings()`), with
what some architectures add around them: OPT's `project_out`, Gemma's final logit soft-capping. The norm is found
structurally: the one normalization module beside the decoder blocks' list in the module that owns the list.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # imported when used, so listing the methods does not load torch
    import torch
    from torch import nn

    from studio.core.context import StepContext

from studio.core.calibration import block_output as block_hidden
from studio.core.structure import find_decoder_blocks, text_config


class OutputHeadNotFound(ValueError):
    pass


def _is_norm(module: nn.Module) -> bool:
    from torch import nn

    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.lower().endswith("norm")


@dataclass
class OutputHead:
    """head(project_out(norm(h))), soft-capped when the config says so: the model's logits from a hidden state."""

    norm: nn.Module | None
    head: nn.Module
    project_out: nn.Module | None = None
    softcap: float | None = None

    def raw_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the LM head module itself returns for this hidden state."""
        if self.norm is not None:
            hidden = self.norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return self.head(hidden)

    def cap(self, raw: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.tanh(raw / self.softcap) * self.softcap if self.softcap else raw

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cap(self.raw_logits(hidden))


def find_output_head(model: nn.Module) -> OutputHead:
    """The model's final norm and LM head; OutputHeadNotFound with the reason when they cannot be identified."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise OutputHeadNotFound(f"{type(model).__name__} has no output embeddings (LM head).")
    path = find_decoder_blocks(model).path
    owner = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    if hasattr(owner, "final_layer_norm") and hasattr(owner, "project_out"):  # OPT: the norm may be absent
        return OutputHead(owner.final_layer_norm, head, owner.project_out)
    norms = [m for name, m in owner.named_children() if m is not None and _is_norm(m)]
    if len(norms) != 1:
        found = "none" if not norms else f"{len(norms)} of them"
        raise OutputHeadNotFound(
            f"cannot tell which norm {type(model).__name__} applies after its decoder blocks: the module holding "
            f"'{path}' has {found}.")
    return OutputHead(norms[0], head, softcap=getattr(text_config(model), "final_logit_softcapping", None))


def with_block_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """The block's output with its hidden state replaced, in the structure the block returned."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


def hidden_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def with_hidden_argument(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class patched_forwards:
    """Context manager giving modules replacement forwards ({module: make(original_forward) -> forward}); the
    originals are restored on exit, whatever happens."""

    def __init__(self, replacements: dict[nn.Module, Callable[[Callable], Callable]]):
        self.replacements = replacements

    def __enter__(self):
        for module, make in self.replacements.items():
            module.forward = make(module.forward)
        return self

    def __exit__(self, *exc):
        for module in self.replacements:
            module.__dict__.pop("forward", None)
        return False


# --- the KV cache ---------------------------------------------------------------------------------------------


def new_cache(model: nn.Module, croppable: bool = False):
    """A DynamicCache; `croppable` makes sliding-window layers keep the states they would drop, so the cache can
    be cut back after tokens are rejected."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if croppable:
        for layer in cache.layers:
            if hasattr(layer, "activate_past_recording"):
                layer.activate_past_recording()
    return cache


def crop_layers_to(cache, length: int) -> None:
    """Every layer of the cache keeps its first `length` positions (layers holding fewer keep theirs)."""
    for layer in cache.layers:
        extra = layer.get_seq_length() - length
        if extra > 0:
            layer.crop(-extra)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def forward_tokens(model: nn.Module, ids: list[int] | torch.Tensor, cache, start: int, keep: int = 1) -> torch.Tensor:
    """Run `ids` at positions start.. with the cache; the float32 logits of the last `keep` positions, (keep, V)."""
    import torch

    device = model_device(model)
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1).to(device)
    positions = torch.arange(start, start + ids.shape[1], device=device).unsqueeze(0)
    out = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=keep)
    return out.logits[0, -keep:].float()


def greedy_generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """Plain greedy decoding with the KV cache, one token per forward after the prompt; exactly `new_tokens` ids
    (an end-of-text token does not stop it, so every method generates the same number)."""
    import torch

    with torch.inference_mode():
        cache = new_cache(model)
        logits = forward_tokens(model, prompt, cache, 0)
        generated = [int(logits[-1].argmax())]
        while len(generated) < new_tokens:
            position = len(prompt) + len(generated) - 1
            logits = forward_tokens(model, [generated[-1]], cache, position)
            generated.append(int(logits[-1].argmax()))
    return generated


# --- prompts and timing -----------------------------------------------------------------------------------------


def measuring_tokens(ctx: StepContext) -> torch.Tensor:
    """The text the dynamic methods measure on, (rows, length): the run's evaluation text when it has one, else
    the calibration samples."""
    if ctx.evaluation is not None:
        return ctx.evaluation.tokens.reshape(1, -1)
    return ctx.calibration.tokens


def cut_prompts(tokens: torch.Tensor, count: int, length: int) -> list[torch.Tensor]:
    """`count` prompts of `length` tokens: evenly spaced slices of one long text, or the start of each sample."""
    rows, width = tokens.shape
    length = min(length, width)
    if rows >= count:
        return [tokens[r, :length].clone() for r in range(count)]
    stream = tokens.reshape(-1)
    room = len(stream) - length
    starts = [round(i * room / max(count - 1, 1)) for i in range(count)] if room > 0 else [0] * count
    return [stream[s : s + length].clone() for s in starts]


@dataclass
class Timing:
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def timed(run: Callable[[], list[int]]) -> tuple[list[int], Timing]:
    begin = time.perf_counter()
    ids = run()
    return ids, Timing(len(ids), time.perf_counter() - begin)


def median_rate(timings: list[list[Timing]]) -> float:
    """Tokens per second: each repeat's total over every prompt, then the median over repeats."""
    rates = [sum(t.tokens for t in rep) / max(sum(t.seconds for t in rep), 1e-9) for rep in timings]
    return statistics.median(rates)


def greedy_margin(model: nn.Module, ids: list[int], position: int) -> float:
    """Top-1 minus top-2 logit of the model's prediction of ids[position] from all the ids before it, in one
    forward (how near a tie the greedy choice there is)."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids[:position]], device=model_device(model))).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])
