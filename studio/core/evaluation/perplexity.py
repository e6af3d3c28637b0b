"""Token-level perplexity with sliding windows, and the KL divergence / top-1 agreement of a model's
next-token distribution against a reference model on the very same tokens.

Windows follow the usual strided evaluation: a window of `window` tokens moves by `stride`; each window scores
only the tokens the previous one did not, so every scored token sees at least `window - stride` tokens of
context. With `bos`, each window starts with the BOS token (inside the window length). Every setting that
changes the number is returned with the result.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from studio.core.errors import EvaluationError
from studio.core.events import CancelToken


@dataclass(frozen=True)
class PerplexityConfig:
    text_file: str
    max_tokens: int | None = 4096  # None: the whole text
    window: int = 1024
    stride: int = 512
    join: str = "\n\n"  # how non-empty lines (rows) of the file are joined
    bos: Literal["auto", "always", "never"] = "auto"  # auto: when the tokenizer has a BOS token


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens_scored: int
    config: dict[str, Any] = field(default_factory=dict)  # the settings and the tokenizer, for the record
    kl: float | None = None  # mean KL(reference || model) per scored token, in nats
    top1_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_eval_tokens(tokenizer: Any, config: PerplexityConfig) -> torch.Tensor:
    if tokenizer is None:
        raise EvaluationError("The model has no tokenizer, so it cannot be evaluated on text.")
    path = Path(config.text_file)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvaluationError(f"Evaluation text '{path}' does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"Could not read evaluation text '{path}' as UTF-8: {exc}") from None
    rows = [line for line in raw.splitlines() if line.strip()]
    if not rows:
        raise EvaluationError(f"Evaluation text '{path}' is empty.")
    text = config.join.join(rows)
    if config.max_tokens:  # tokenizing a few MB when 4k tokens are wanted wastes seconds
        text = text[: config.max_tokens * 12]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = torch.tensor(ids[: config.max_tokens] if config.max_tokens else ids, dtype=torch.long)
    if tokens.numel() < 2:
        raise EvaluationError(f"Evaluation text '{path}' gives fewer than 2 tokens.")
    return tokens


def bos_id(tokenizer: Any, mode: str) -> int | None:
    if mode == "never":
        return None
    token = getattr(tokenizer, "bos_token_id", None)
    if token is None and mode == "always":
        raise EvaluationError("bos='always' was asked for but the tokenizer has no BOS token.")
    return token


def _windows(n: int, window: int, stride: int, bos: bool):
    """(begin, end, first_scored) over the token positions; positions before first_scored are context only."""
    width = window - 1 if bos else window
    stride = min(stride, width)  # with BOS a window holds one text token less; never leave a gap
    prev_end = 0 if bos else 1  # without BOS the first token has nothing to be predicted from
    begin = 0
    while prev_end < n:
        end = min(begin + width, n)
        yield begin, end, prev_end
        prev_end = end
        if end == n:
            break
        begin += stride


def _logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[None].to(_device(model))).logits[0]
    return F.log_softmax(logits.float(), dim=-1)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    config: PerplexityConfig,
    tokenizer: Any = None,
    reference: nn.Module | None = None,
    cancel: CancelToken | None = None,
    on_window: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on `tokens`; with `reference`, also KL(reference || model) and top-1 agreement.
    `on_window(done, total)` is called after each window."""
    if config.stride < 1 or config.stride > config.window:
        raise EvaluationError(f"stride must be between 1 and the window ({config.window}); got {config.stride}.")
    bos = bos_id(tokenizer, config.bos) if tokenizer is not None else None
    nll_sum, kl_sum, agree, scored = 0.0, 0.0, 0, 0
    windows = list(_windows(len(tokens), config.window, config.stride, bos is not None))
    for done, (begin, end, first) in enumerate(windows, 1):
        if cancel is not None:
            cancel.check()
        ids = tokens[begin:end]
        if bos is not None:
            ids = torch.cat([torch.tensor([bos]), ids])
        offset = 1 if bos is not None else 0
        # logits at input position p predict the token at p + 1; we score tokens first..end-1
        pred = slice(first - begin - 1 + offset, end - begin - 1 + offset)
        targets = tokens[first:end].to(_device(model))
        logp = _logprobs(model, ids)[pred]
        nll_sum -= logp.gather(1, targets[:, None]).sum().item()
        if reference is not None:
            ref = _logprobs(reference, ids)[pred]
            kl_sum += F.kl_div(logp, ref, log_target=True, reduction="sum").item()
            agree += (logp.argmax(-1) == ref.argmax(-1)).sum().item()
        scored += len(targets)
        if on_window is not None:
            on_window(done, len(windows))
    nll = nll_sum / scored
    record = asdict(config) | {
        "effective_stride": min(config.stride, config.window - 1 if bos is not None else config.window),
        "tokens_total": int(len(tokens)),
        "bos_token_id": bos,
        "tokenizer": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
    }
    return PerplexityResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens_scored=scored,
        config=record,
        kl=kl_sum / scored if reference is not None else None,
        top1_agreement=agree / scored if reference is not None else None,
    )
