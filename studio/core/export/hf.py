"""Dense Hugging Face folder: safetensors weights, config and tokenizer, which plain transformers loads. The
weights keep the shapes that structured pruning and layer dropping left (the config was rewritten with them);
quantized and pruned weights are written as their dense values, and their integer codes and masks beside them
(studio.core.state_file) so the studio can export the folder again in a compressed format."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.core.events import CancelToken
from studio.core.state_file import STATE_FILE, save_state

if TYPE_CHECKING:
    from torch import nn


def write_hf_folder(model: nn.Module, tokenizer: Any, folder: Path, provenance: dict[str, Any],
                    cancel: CancelToken | None = None) -> dict[str, Any]:
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    summary = {"weights": "dense", "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
               "how_to_load": "from transformers import AutoModelForCausalLM\n"
                              "model = AutoModelForCausalLM.from_pretrained(PATH)"}
    if save_state(model, folder):
        summary["studio_state"] = f"{STATE_FILE}: the integer codes and masks, for a later `studio export`"
    return summary
