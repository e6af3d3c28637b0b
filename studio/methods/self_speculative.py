"""Self-speculative decoding with layer skipping (Draft & Verify: Zhang, Wang, Li, Chen, Chen & Mehrotra 2024,
"Draft & Verify: Lossless Large Language Model Acceleration via Self-Speculative Decoding", ACL 2024; arXiv 2023).

The draft model is the model itself with a set S of decoder blocks skipped (each skipped block passes its input
on unchanged). Each round, with the full model's KV cache valid for positions < n and x_n the last token:

1. draft: the draft model greedily proposes d_1..d_K, one token per forward, reading and extending the cache of
   the blocks it runs (the skipped blocks' caches are not touched);
2. verify: the cache is cut back to n positions in every layer, and the full model reads [x_n, d_1..d_K] in
   one forward, giving its own greedy choices g_0..g_K (g_i follows x_n, d_1..d_i);
3. accept the longest prefix with d_i = g_(i-1), i = 1..a, then the full model's own next token g_a; the cache
   keeps positions < n + a + 1, all written by the full model in step 2.

Every emitted token is the full model's greedy choice given the tokens before it, so the output equals plain
greedy decoding (up to the floating-point difference between a one-token and a (K+1)-token forward, which the
step checks and reports: `identical_to_greedy`, and for any difference the full model's top-1 − top-2 logit gap
there).

Which blocks are skipped: the paper searches the skipped attention and MLP sub-layers by Bayesian optimisation
of the draft's speed and acceptance. This step instead skips whole blocks ranked by ShortGPT's Block Influence on
the calibration text, BI_i = 1 − E_t cos(x_i,t, x_i+1,t) (Men et al. 2024, as studio.methods.layer_drop measures
it): the `skip_blocks` blocks that change the hidden state least. Block 0 is never skipped (it turns embeddings
into hidden states, and the draft's cache length is read from it). The draft length K is fixed (the paper's
adaptive draft-exiting threshold is not used).

Measured on prompts cut from the run's evaluation text (else the calibration samples): acceptance rate (accepted
draft tokens / drafted), mean accepted draft tokens per round, and tokens per second against plain greedy
decoding with the KV cache on the same prompts in the same process. The weights are not changed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

if TYPE_CHECKING:  # imported when used, so listing the methods does not load torch
    import torch
    from torch import nn

from studio.core.calibration import CPU_FLOPS_PER_SECOND
from studio.core.context import StepContext
from studio.core.errors import RecipeError
from studio.core.events import Progress
from studio.core.registry import Estimate, Family, Method, MethodParams, StepOutcome, register
from studio.core.structure import find_decoder_blocks, iter_layers
from studio.methods.decoding import (
    crop_layers_to,
    cut_prompts,
    forward_tokens,
    greedy_generate,
    greedy_margin,
    hidden_argument,
    measuring_tokens,
    median_rate,
    new_cache,
    patched_forwards,
    timed,
)
from studio.methods.layer_drop import block_influences, least_influential


class SelfSpeculativeParams(MethodParams):
    skip_blocks: Annotated[
        int, Field(ge=0, le=1024, description="Blocks the draft skips: those of lowest Block Influence (never block 0).")
    ] = 4
    draft_tokens: Annotated[int, Field(ge=1, le=64, description="Tokens the draft proposes per verification.")] = 4
    max_new_tokens: Annotated[int, Field(ge=1, le=4096, description="Tokens generated per prompt.")] = 64
    prompts: Annotated[int, Field(ge=1, le=256, description="Prompts cut from the text.")] = 4
    prompt_tokens: Annotated[int, Field(ge=1, le=8192, description="Tokens per prompt.")] = 64
    repeats: Annotated[int, Field(ge=1, le=20, description="Timing repeats; tokens/s is the median over them.")] = 1


class BlockSkipper:
    """Patches the skipped blocks so that, while drafting, they hand their input on unchanged."""

    def __init__(self, model: nn.Module, skipped: list[int]):
        blocks = find_decoder_blocks(model).blocks
        self.active = False
        self.patch = patched_forwards({blocks[i]: self.skippable for i in skipped})

    def skippable(self, original):
        def forward(*args, **kwargs):
            return hidden_argument(args, kwargs) if self.active else original(*args, **kwargs)

        return forward

    @contextmanager
    def drafting(self):
        self.active = True
        try:
            yield
        finally:
            self.active = False


@dataclass
class DraftStats:
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0


def speculative_generate(model: nn.Module, skipper: BlockSkipper, prompt: torch.Tensor, new_tokens: int,
                         draft_tokens: int, stats: DraftStats | None = None) -> list[int]:
    """Greedy decoding by draft (skipped blocks) and verify (full model) rounds; exactly `new_tokens` ids."""
    import torch

    stats = stats if stats is not None else DraftStats()
    with torch.inference_mode():
        cache = new_cache(model, croppable=True)
        generated = [int(forward_tokens(model, prompt, cache, 0)[-1].argmax())]
        while len(generated) < new_tokens:
            cached = len(prompt) + len(generated) - 1  # positions the full model has cached; the last token is next
            count = min(draft_tokens, new_tokens - len(generated) - 1)
            draft = draft_greedy(model, skipper, cache, generated[-1], cached, count)
            crop_layers_to(cache, cached)
            verified = forward_tokens(model, [generated[-1], *draft], cache, cached, keep=count + 1).argmax(-1).tolist()
            accepted = accepted_length(draft, verified)
            generated += draft[:accepted] + [verified[accepted]]
            crop_layers_to(cache, cached + accepted + 1)
            stats.drafted += count
            stats.accepted += accepted
            stats.rounds += 1
    return generated[:new_tokens]


def draft_greedy(model: nn.Module, skipper: BlockSkipper, cache, token: int, position: int, count: int) -> list[int]:
    draft = []
    with skipper.drafting():
        for i in range(count):
            token = int(forward_tokens(model, [token], cache, position + i)[-1].argmax())
            draft.append(token)
    return draft


def accepted_length(draft: list[int], verified: list[int]) -> int:
    """The longest prefix of the draft that the full model would have chosen itself."""
    accepted = 0
    while accepted < len(draft) and draft[accepted] == verified[accepted]:
        accepted += 1
    return accepted


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


@register
class SelfSpeculative(Method):
    id = "self_speculative"
    title = "Self-speculative decoding (Draft & Verify)"
    family = Family.DYNAMIC
    summary = "The model drafts tokens with its least influential blocks skipped and verifies them in one pass."
    needs_calibration = True
    changes_weights = False
    Params = SelfSpeculativeParams

    def check_model(self, model: nn.Module, params: SelfSpeculativeParams) -> list[str]:
        count = len(find_decoder_blocks(model).blocks)
        if params.skip_blocks > count - 1:
            return [f"field 'skip_blocks': the model has {count} decoder blocks and block 0 is always kept; at most "
                    f"{count - 1} can be skipped."]
        return []

    def estimate(self, layers, params: SelfSpeculativeParams) -> Estimate:
        weights = sum(m.weight.numel() for _, m in iter_layers(layers))
        tokens = params.prompts * params.repeats * (params.prompt_tokens + params.max_new_tokens)
        return Estimate(extra_bytes=0, seconds=2 * weights * 3 * tokens / CPU_FLOPS_PER_SECOND)

    def apply(self, ctx: StepContext, params: SelfSpeculativeParams) -> StepOutcome:
        problems = self.check_model(ctx.model, params)
        if problems:
            raise RecipeError("\n".join(f"step {ctx.index + 1} (self_speculative): {p}" for p in problems))
        model = ctx.model
        count = len(find_decoder_blocks(model).blocks)
        influences = block_influences(ctx) if params.skip_blocks else {}
        skipped = least_influential(influences, list(range(1, count)), params.skip_blocks) if influences else []
        prompts = cut_prompts(measuring_tokens(ctx), params.prompts, params.prompt_tokens)
        stats = DraftStats()
        greedy_times, speculative_times, mismatches = [], [], []
        total = params.repeats * len(prompts)
        skipper = BlockSkipper(model, skipped)
        with skipper.patch:
            for repeat in range(params.repeats):
                greedy_times.append([])
                speculative_times.append([])
                for number, prompt in enumerate(prompts):
                    ctx.cancel.check()
                    greedy, greedy_time = timed(lambda: greedy_generate(model, prompt, params.max_new_tokens))
                    drafted, speculative_time = timed(lambda: speculative_generate(
                        model, skipper, prompt, params.max_new_tokens, params.draft_tokens,
                        stats if repeat == 0 else None))
                    greedy_times[-1].append(greedy_time)
                    speculative_times[-1].append(speculative_time)
                    if repeat == 0:
                        mismatches += self.mismatch(model, number, prompt, greedy, drafted)
                    done = repeat * len(prompts) + number + 1
                    ctx.emit(Progress(ctx.index, done, total, "prompt", f"prompt {number + 1}, repeat {repeat + 1}"))
        greedy_rate, speculative_rate = median_rate(greedy_times), median_rate(speculative_times)
        summary = {
            "skipped_blocks": skipped,
            "block_influence": [round(influences[i], 6) for i in sorted(influences)],
            "n_blocks": count,
            "draft_tokens": params.draft_tokens,
            "acceptance_rate": stats.accepted / stats.drafted if stats.drafted else None,
            "mean_accepted_length": stats.accepted / stats.rounds if stats.rounds else 0.0,
            "tokens_per_verification": (stats.accepted + stats.rounds) / stats.rounds if stats.rounds else 0.0,
            "tokens_per_second": speculative_rate,
            "greedy_tokens_per_second": greedy_rate,
            "speedup": speculative_rate / greedy_rate,
            "identical_to_greedy": not mismatches,
            "mismatches": mismatches,
            "prompts": len(prompts),
            "prompt_tokens": int(len(prompts[0])),
            "max_new_tokens": params.max_new_tokens,
        }
        return StepOutcome(ctx.reports, summary)

    @staticmethod
    def mismatch(model, number: int, prompt, greedy: list[int], drafted: list[int]) -> list[dict]:
        """Where the speculative output leaves plain greedy's, and how near a tie greedy's choice was there."""
        position = first_difference(greedy, drafted)
        if position is None:
            return []
        ids = prompt.tolist() + greedy
        margin = greedy_margin(model, ids, len(prompt) + position)
        return [{"prompt": number, "position": position, "greedy_top2_logit_gap": margin}]
