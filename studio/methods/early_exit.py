"""Confidence-based early exit (CALM: Schuster, Fisch, Gupta, Dehghani, Bahri, Tran, Tay & Metzler 2022,
"Confident Adaptive Language Modeling"; the depth-adaptive decoder of Elbayad, Gu, Grave & Auli 2020,
"Depth-Adaptive Transformer", whose exits are classifiers sharing the output layer).

After decoder block i the token's hidden state d_t^i goes through the model's own final norm and LM head,
p_t^i = softmax(W norm(d_t^i)), and the token exits at the first block where its confidence c_t^i ≥ λ:

    top_probability:  c = max_w p_t^i(w)             (the confidence this step's threshold sweep is stated in)
    top2_margin:      c = p_(1) − p_(2)              (CALM's "softmax response": the gap between the top two)

The last block always exits, and λ = 1 never exits early (the full model, even where float32 saturates to 1).
The prediction of an exited token is its exit distribution p_t^i.

State propagation (CALM §3.2): the later tokens still attend to an exited token in the blocks it skipped, so
those blocks need its keys and values; they are computed from the copied exit state, d_t^j = d_t^i for j > i.
In generation a skipped block runs only up to the point where its attention writes the new keys and values to
the KV cache (the input norm and the projections) and stops there: its attention and MLP are skipped. Scoring a
text (teacher forcing) does the same for all tokens at once: a block runs on every position, the exited ones
carrying their copied state, and keeps the block's output only for the tokens still active. Both give the same
predictions, so the perplexity measured is that of the generation whose speed is timed.

Measured per threshold of the sweep: the mean number of blocks a scored token goes through, the perplexity of the
exited predictions (the sliding windows of studio.core.evaluation.perplexity, on the run's evaluation text, else
on the calibration samples), and the tokens per second of greedy generation with real skipping against plain
greedy decoding with the full model in the same process (the prompt itself is processed by the full model).
The weights are not changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, field_validator

if TYPE_CHECKING:  # imported when used, so listing the methods does not load torch
    import torch
    from torch import nn

from studio.core.calibration import CPU_FLOPS_PER_SECOND
from studio.core.context import StepContext
from studio.core.errors import RecipeError
from studio.core.events import Progress
from studio.core.registry import Estimate, Family, Method, MethodParams, StepOutcome, register
from studio.core.structure import find_decoder_blocks, iter_layers, text_config
from studio.methods.decoding import (
    OutputHead,
    OutputHeadNotFound,
    block_hidden,
    crop_layers_to,
    cut_prompts,
    find_output_head,
    forward_tokens,
    greedy_generate,
    hidden_argument,
    measuring_tokens,
    median_rate,
    model_device,
    patched_forwards,
    timed,
    with_block_hidden,
)

DEFAULT_THRESHOLDS = "0.5,0.7,0.8,0.9,0.95,0.99,1.0"
LOGITS_BYTES_PER_TOKEN = 4 * 65536 * 2  # float32 logits and their softmax over a vocabulary up to 64k


def parse_thresholds(text: str) -> list[float]:
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"'{part.strip()}' is not a number; give thresholds like '0.8,0.9,1.0'") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"threshold {value} is outside [0, 1]")
        values.append(value)
    return sorted(set(values))


class EarlyExitParams(MethodParams):
    thresholds: Annotated[
        str, Field(description="Comma-separated confidence thresholds in [0, 1] to sweep; 1.0 = the full model.")
    ] = DEFAULT_THRESHOLDS
    confidence: Annotated[
        Literal["top_probability", "top2_margin"],
        Field(description="top_probability: max softmax; top2_margin: top-1 minus top-2 probability (CALM)."),
    ] = "top_probability"
    exit_interval: Annotated[
        int, Field(ge=1, le=1024, description="A token may exit after every k-th block (and always the last).")
    ] = 1
    tokens: Annotated[int, Field(ge=16, le=10_000_000, description="At most this many tokens scored for perplexity.")] = 4096
    prompts: Annotated[int, Field(ge=1, le=256, description="Prompts cut from the text for the generation timing.")] = 4
    prompt_tokens: Annotated[int, Field(ge=1, le=8192, description="Tokens per prompt.")] = 64
    max_new_tokens: Annotated[int, Field(ge=1, le=4096, description="Tokens generated greedily per prompt.")] = 32
    repeats: Annotated[int, Field(ge=1, le=20, description="Timing repeats; tokens/s is the median over them.")] = 1

    @field_validator("thresholds")
    @classmethod
    def _parse(cls, text: str) -> str:
        parse_thresholds(text)
        return text

    @property
    def threshold_values(self) -> list[float]:
        return parse_thresholds(self.thresholds)


# --- the exit rule, applied inside the model's own forward ------------------------------------------------------


def confidence_of(logits: torch.Tensor, measure: str) -> torch.Tensor:
    probabilities = logits.float().softmax(dim=-1)
    if measure == "top2_margin":
        top = probabilities.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    return probabilities.amax(dim=-1)


class _StopAfterCacheUpdate(Exception):
    pass


def propagation_cache(model: nn.Module):
    """A DynamicCache that can stop a block's forward right after the block has written its keys and values:
    what state propagation needs from a skipped block."""
    from transformers import DynamicCache

    class PropagationCache(DynamicCache):
        stop_after_layer: int | None = None

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            result = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            if layer_idx == self.stop_after_layer:
                raise _StopAfterCacheUpdate
            return result

    return PropagationCache(config=model.config)


@dataclass
class ExitState:
    """The early-exit rule for one forward pass: which tokens have exited, and how many blocks each used."""

    output: OutputHead
    n_blocks: int
    measure: str
    threshold: float = 1.0
    interval: int = 1
    active: bool = False
    cache: Any = None  # in generation, the PropagationCache the skipped blocks write to
    exited: torch.Tensor | None = None  # (batch, tokens) bool
    blocks_used: torch.Tensor | None = None  # (batch, tokens)
    exit_logits: torch.Tensor | None = None  # generation: the raw head output at the exit, reused as the output
    tuple_output: bool = False
    full_prefix: int = 0  # scoring a text: positions before this one never exit (a prompt the full model reads)

    def may_exit_after(self, block: int) -> bool:
        return self.threshold < 1.0 and block < self.n_blocks - 1 and (block + 1) % self.interval == 0

    def start(self, hidden: torch.Tensor) -> None:
        import torch

        self.exited = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        self.blocks_used = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        self.exit_logits = None

    def test_exit(self, hidden: torch.Tensor) -> None:
        """Mark the active tokens whose exit distribution after this block is confident enough."""
        candidates = ~self.exited
        candidates[:, : self.full_prefix] = False
        batch, position = candidates.nonzero(as_tuple=True)
        raw = self.output.raw_logits(hidden[batch, position])
        leaving = confidence_of(self.output.cap(raw), self.measure) >= self.threshold
        self.exited[batch[leaving], position[leaving]] = True
        if self.cache is not None and bool(leaving.all()):  # generation: one token, now exited
            self.exit_logits = raw.reshape(*hidden.shape[:2], -1)


def exiting_block(state: ExitState, index: int):
    def make(original):
        def forward(*args, **kwargs):
            if not state.active:
                return original(*args, **kwargs)
            hidden_in = hidden_argument(args, kwargs)
            if index == 0:
                state.start(hidden_in)
            if bool(state.exited.all()):  # every token has exited: only the propagated keys and values
                propagate_state(state, index, original, args, kwargs)
                return (hidden_in,) if state.tuple_output else hidden_in
            output = original(*args, **kwargs)
            state.tuple_output = isinstance(output, tuple)
            hidden_out = block_hidden(output)
            if bool(state.exited.any()):
                import torch

                hidden_out = torch.where(state.exited[..., None], hidden_in, hidden_out)
                output = with_block_hidden(output, hidden_out)
            state.blocks_used += ~state.exited
            if state.may_exit_after(index):
                state.test_exit(hidden_out)
            return output

        return forward

    return make


def propagate_state(state: ExitState, index: int, original, args: tuple, kwargs: dict) -> None:
    """Run the skipped block on the copied exit state (already its input) until it has cached its keys and
    values. Without a cache (scoring a whole text) no later token needs them from this pass."""
    if state.cache is None:
        return
    state.cache.stop_after_layer = index
    try:
        original(*args, **kwargs)
    except _StopAfterCacheUpdate:
        pass
    finally:
        state.cache.stop_after_layer = None


def reused_head(state: ExitState):
    """The LM head returns the logits already computed at the exit instead of computing them again."""
    def make(original):
        def forward(hidden):
            if state.active and state.exit_logits is not None:
                return state.exit_logits
            return original(hidden)

        return forward

    return make


def exit_hooks(model: nn.Module, state: ExitState) -> patched_forwards:
    blocks = find_decoder_blocks(model).blocks
    replacements = {block: exiting_block(state, i) for i, block in enumerate(blocks)}
    replacements[state.output.head] = reused_head(state)
    return patched_forwards(replacements)


# --- perplexity of the exited predictions ------------------------------------------------------------------------


@dataclass
class Segment:
    ids: torch.Tensor  # what the model reads
    predicting: slice  # positions whose logits are scored
    targets: torch.Tensor


def scoring_segments(ctx: StepContext, max_tokens: int) -> list[Segment]:
    """The evaluation text's sliding windows (as studio.core.evaluation.perplexity cuts them), or the
    calibration samples whole, up to `max_tokens` tokens."""
    import torch

    if ctx.evaluation is None:
        rows = ctx.calibration.tokens
        count = max(1, min(len(rows), max_tokens // rows.shape[1]))
        return [Segment(row, slice(0, len(row) - 1), row[1:]) for row in rows[:count]]
    from studio.core.evaluation.perplexity import _windows, bos_id

    tokens = ctx.evaluation.tokens.reshape(-1)[:max_tokens]
    config = ctx.evaluation.config
    bos = bos_id(ctx.tokenizer, config.bos) if ctx.tokenizer is not None else None
    offset = 1 if bos is not None else 0
    segments = []
    for begin, end, first in _windows(len(tokens), config.window, config.stride, bos is not None):
        ids = tokens[begin:end]
        if bos is not None:
            ids = torch.cat([torch.tensor([bos]), ids])
        predicting = slice(first - begin - 1 + offset, end - begin - 1 + offset)
        segments.append(Segment(ids, predicting, tokens[first:end]))
    return segments


@dataclass
class ExitScore:
    perplexity: float
    avg_blocks: float
    tokens: int


def exit_perplexity(model: nn.Module, state: ExitState, segments: list[Segment], tick) -> ExitScore:
    import torch
    import torch.nn.functional as F

    device = model_device(model)
    nll, blocks, scored = 0.0, 0, 0
    state.active, state.cache = True, None
    try:
        with torch.inference_mode():
            for segment in segments:
                logits = model(input_ids=segment.ids[None].to(device), use_cache=False).logits[0]
                logp = F.log_softmax(logits.float(), dim=-1)[segment.predicting]
                nll -= logp.gather(1, segment.targets[:, None].to(device)).sum().item()
                blocks += int(state.blocks_used[0, segment.predicting].sum())
                scored += len(segment.targets)
                tick()
    finally:
        state.active = False
    return ExitScore(math.exp(nll / scored), blocks / scored, scored)


# --- generation with real skipping ---------------------------------------------------------------------------------


def early_exit_generate(model: nn.Module, state: ExitState, prompt: torch.Tensor, new_tokens: int,
                        blocks_used: list[int] | None = None) -> list[int]:
    """Greedy decoding where each new token exits at its first confident block; the prompt is processed by the
    full model. `blocks_used` collects the blocks each decoded token used."""
    import torch

    with torch.inference_mode():
        cache = propagation_cache(model)
        logits = forward_tokens(model, prompt, cache, 0)
        generated = [int(logits[-1].argmax())]
        state.active, state.cache = True, cache
        try:
            while len(generated) < new_tokens:
                logits = forward_tokens(model, [generated[-1]], cache, len(prompt) + len(generated) - 1)
                generated.append(int(logits[-1].argmax()))
                if blocks_used is not None:
                    blocks_used.append(int(state.blocks_used.sum()))
        finally:
            state.active, state.cache = False, None
    return generated


# --- the method ----------------------------------------------------------------------------------------------------


def head_problems(model: nn.Module) -> list[str]:
    """Whether the final norm and LM head can be found and reproduce the model's logits from its last block."""
    import torch

    try:
        output = find_output_head(model)
    except (OutputHeadNotFound, ValueError) as exc:
        return [f"early exit needs the model's final norm and LM head: {exc}"]
    blocks = find_decoder_blocks(model).blocks
    seen = {}
    handle = blocks[-1].register_forward_hook(lambda m, a, out: seen.setdefault("hidden", block_hidden(out)))
    try:
        with torch.inference_mode():
            ids = (torch.arange(3, 11)[None] % text_config(model).vocab_size).to(model_device(model))
            logits = model(input_ids=ids, use_cache=False).logits.float()
            ours = output.logits(seen["hidden"]).float()
    finally:
        handle.remove()
    if not torch.allclose(ours, logits, rtol=1e-4, atol=1e-4 * float(logits.abs().max())):
        return [f"the final norm and LM head found for {type(model).__name__} do not reproduce its logits from the "
                "last block's output, so the early exits would not be the model's own predictions."]
    return []


@register
class EarlyExit(Method):
    id = "early_exit"
    title = "Early exit (CALM)"
    family = Family.DYNAMIC
    summary = "Tokens leave the decoder at the first block whose LM-head prediction is confident; sweeps thresholds."
    needs_calibration = True
    changes_weights = False
    Params = EarlyExitParams

    def check_model(self, model: nn.Module, params: EarlyExitParams) -> list[str]:
        return head_problems(model)

    def estimate(self, layers, params: EarlyExitParams) -> Estimate:
        weights = sum(m.weight.numel() for _, m in iter_layers(layers))
        sweeps = len(params.threshold_values)
        generated = params.prompts * params.max_new_tokens * params.repeats * (sweeps + 1)
        # each threshold scores the text once; the LM head checked after every block costs about as much again
        flops = 2 * weights * (2 * sweeps * params.tokens + generated)
        return Estimate(extra_bytes=LOGITS_BYTES_PER_TOKEN * 1024, seconds=flops / CPU_FLOPS_PER_SECOND)

    def apply(self, ctx: StepContext, params: EarlyExitParams) -> StepOutcome:
        problems = self.check_model(ctx.model, params)
        if problems:
            raise RecipeError("\n".join(f"step {ctx.index + 1} (early_exit): {p}" for p in problems))
        model = ctx.model
        n_blocks = len(find_decoder_blocks(model).blocks)
        state = ExitState(find_output_head(model), n_blocks, params.confidence, interval=params.exit_interval)
        segments = scoring_segments(ctx, params.tokens)
        prompts = cut_prompts(measuring_tokens(ctx), params.prompts, params.prompt_tokens)
        thresholds = params.threshold_values
        progress = Ticker(ctx, len(thresholds) * (len(segments) + params.repeats) + params.repeats)
        with exit_hooks(model, state):
            rows = []
            greedy_timings = [[] for _ in range(params.repeats)]
            for threshold in thresholds:
                state.threshold = threshold
                progress.message = f"threshold {threshold}: perplexity"
                score = exit_perplexity(model, state, segments, progress.tick)
                progress.message = f"threshold {threshold}: generation"
                rows.append(self.generation_row(model, state, prompts, params, greedy_timings, progress, score))
        greedy_rate = median_rate(greedy_timings)
        for row in rows:
            row["speedup"] = row["tokens_per_second"] / greedy_rate
        summary = {
            "n_blocks": n_blocks,
            "confidence": params.confidence,
            "exit_interval": params.exit_interval,
            "tokens_scored": sum(len(segment.targets) for segment in segments),
            "greedy_tokens_per_second": greedy_rate,
            "prompts": len(prompts),
            "prompt_tokens": int(len(prompts[0])),
            "max_new_tokens": params.max_new_tokens,
            "rows": rows,
        }
        return StepOutcome(ctx.reports, summary)

    @staticmethod
    def generation_row(model, state: ExitState, prompts, params: EarlyExitParams, greedy_timings, progress,
                       score: ExitScore) -> dict[str, Any]:
        """Time early-exit generation at the state's threshold; plain greedy is timed alongside in the first
        sweep (interleaved per repeat, so both see the same machine load)."""
        timings, blocks = [], []
        for repeat in range(params.repeats):
            progress.ctx.cancel.check()
            if not greedy_timings[repeat]:
                greedy_timings[repeat] = [timed(lambda p=p: greedy_generate(model, p, params.max_new_tokens))[1]
                                          for p in prompts]
                progress.tick()
            timings.append([timed(lambda p=p: early_exit_generate(model, state, p, params.max_new_tokens,
                                                                  blocks if repeat == 0 else None))[1]
                            for p in prompts])
            progress.tick()
        return {
            "threshold": state.threshold,
            "avg_blocks": score.avg_blocks,
            "perplexity": score.perplexity,
            "tokens_per_second": median_rate(timings),
            "generation_avg_blocks": sum(blocks) / len(blocks) if blocks else float(state.n_blocks),
        }


@dataclass
class Ticker:
    """Progress over the whole sweep, one unit per scored window or timed repeat; checks cancellation."""

    ctx: StepContext
    total: int
    done: int = 0
    message: str = ""
    unit: str = field(default="pass")

    def tick(self) -> None:
        self.done += 1
        self.ctx.emit(Progress(self.ctx.index, self.done, self.total, self.unit, self.message))
        self.ctx.cancel.check()
