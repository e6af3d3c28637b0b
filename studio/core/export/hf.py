"""Dense Hugging Face folder: safetensors weights, config and tokenizer, which plain transformers loads. The
weights keep the shapes that structured pruning and layer dropping left (the config was rewritten with them);
quantized and pruned weights are written as their dense values, and their integer codes and masks beside them
(studio.core.state_file) so the studio can export the folder again in a compressed format. Low-rank layers are
multiplied out, or kept as factors in the studio's own form when asked (what `studio run --out` writes)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.core.events import CancelToken
from studio.core.state_file import STATE_FILE, save_state

if TYPE_CHECKING:
    from torch import nn


def write_hf_folder(model: nn.Module, tokenizer: Any, folder: Path, provenance: dict[str, Any],
                    cancel: CancelToken | None = None, keep_factors: bool = False) -> dict[str, Any]:
    """Dense weights for plain transformers; a model with low-rank layers is multiplied out, or, with
    `keep_factors`, written in the studio's factored form (studio.core.factored), which only the studio loads."""
    summary: dict[str, Any] = {"dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    from studio.core.factored import low_rank_layers

    factored = list(low_rank_layers(model))
    if factored and keep_factors:
        from studio.core.factored import FACTORED_FILE, save_factored

        save_factored(model, folder)
        summary.update(weights="low-rank factors", low_rank_layers=len(factored),
                       how_to_load="Compression Studio only (studio.core.loading.load_model(PATH)); export with "
                                   f"--format hf-safetensors for plain transformers. {FACTORED_FILE} holds every "
                                   "weight, the factors under <layer>.down / <layer>.up")
    else:
        if factored:
            from studio.core.factored import densified

            model = densified(model)
            summary["low_rank"] = (f"{len(factored)} low-rank layers multiplied back into dense weights for plain "
                                   "transformers; the parameter saving of the factors is not kept in this format")
        model.save_pretrained(folder, safe_serialization=True)
        summary.update(weights="dense", how_to_load="from transformers import AutoModelForCausalLM\n"
                                                     "model = AutoModelForCausalLM.from_pretrained(PATH)")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if save_state(model, folder):
        summary["studio_state"] = f"{STATE_FILE}: the integer codes and masks, for a later `studio export`"
    return summary
