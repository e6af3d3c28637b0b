"""Zero-shot multiple-choice accuracy by log-likelihood, on jsonl task files.

Each choice is scored by the summed log-probability of its continuation given the context; `acc` takes the
best sum, `acc_norm` the best sum per byte of continuation (the length normalisation of lm-evaluation-harness).
Formats (one JSON object a line): `query`/`choices`/`gold` (ARC, PIQA, BoolQ); `context_options`/
`continuation`/`gold` (Winogrande: the contexts differ); `context`/`continuation` (LAMBADA: correct when
greedy decoding reproduces the continuation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from studio.core.errors import EvaluationError
from studio.core.events import CancelToken


@dataclass(frozen=True)
class Item:
    pairs: list[tuple[str, str]]  # (context, continuation) per choice
    gold: int
    greedy: bool = False  # LAMBADA-style: one pair, judged by greedy match


def parse_item(obj: dict, where: str) -> Item:
    if "choices" in obj and "query" in obj:
        return Item([(obj["query"], " " + c) for c in obj["choices"]], int(obj["gold"]))
    if "context_options" in obj:
        return Item([(c, " " + obj["continuation"]) for c in obj["context_options"]], int(obj["gold"]))
    if "context" in obj and "continuation" in obj:
        return Item([(obj["context"], " " + obj["continuation"])], 0, greedy=True)
    raise EvaluationError(
        f"{where}: unknown task format with keys {sorted(obj)}; expected query/choices/gold, "
        "context_options/continuation/gold, or context/continuation."
    )


def read_items(path: Path, limit: int | None) -> list[Item]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise EvaluationError(f"Task file '{path}' does not exist.") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvaluationError(f"{path}, line {n}: not valid JSON ({exc.msg}).") from None
        items.append(parse_item(obj, f"{path}, line {n}"))
        if limit and len(items) >= limit:
            break
    if not items:
        raise EvaluationError(f"Task file '{path}' has no items.")
    return items


def _encode(tokenizer: Any, context: str, continuation: str, bos: int | None) -> tuple[list[int], int]:
    """Token ids of context+continuation and how many of them belong to the continuation. Trailing spaces
    of the context move to the continuation so both tokenize as they would in running text."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    ctx = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    whole = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    prefix = [bos] if bos is not None else []
    n_cont = max(len(whole) - len(ctx), 1)
    return prefix + whole, n_cont


@torch.inference_mode()
def _score(model: nn.Module, seqs: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
    """(sum log p of the continuation, whether greedy decoding reproduces it) for each sequence, one batch."""
    device = next(model.parameters()).device
    width = max(len(ids) for ids, _ in seqs)
    batch = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, (ids, _) in enumerate(seqs):
        batch[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    logp = F.log_softmax(model(batch.to(device), attention_mask=mask.to(device)).logits.float(), dim=-1)
    out = []
    for row, (ids, n_cont) in enumerate(seqs):
        targets = torch.tensor(ids[-n_cont:], device=device)
        lp = logp[row, len(ids) - n_cont - 1 : len(ids) - 1]
        out.append((lp.gather(1, targets[:, None]).sum().item(), bool((lp.argmax(-1) == targets).all())))
    return out


def zero_shot_accuracy(
    model: nn.Module,
    tokenizer: Any,
    task_file: str | Path,
    limit: int | None = 200,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """acc and acc_norm on the first `limit` items of one task file (all of them with limit=None)."""
    if tokenizer is None:
        raise EvaluationError("The model has no tokenizer, so it cannot be evaluated on tasks.")
    path = Path(task_file)
    items = read_items(path, limit)
    bos = getattr(tokenizer, "bos_token_id", None)
    correct = correct_norm = 0
    for item in items:
        if cancel is not None:
            cancel.check()
        seqs = [_encode(tokenizer, c, k, bos) for c, k in item.pairs]
        scores = _score(model, seqs)
        if item.greedy:
            correct += scores[0][1]
            correct_norm += scores[0][1]
            continue
        lengths = [len(k.encode("utf-8")) for _, k in item.pairs]
        sums = [s for s, _ in scores]
        correct += max(range(len(sums)), key=sums.__getitem__) == item.gold
        normed = [s / n for s, n in zip(sums, lengths)]
        correct_norm += max(range(len(normed)), key=normed.__getitem__) == item.gold
    n = len(items)
    return {"task": path.stem, "file": str(path), "items": n, "acc": correct / n, "acc_norm": correct_norm / n}
