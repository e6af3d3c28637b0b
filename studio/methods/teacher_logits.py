"""The teacher's next-token distributions for distillation: computed on the fly at every step, or computed once
and cached as the top-k logits per token (sparse knowledge distillation).

The cache keeps, for every token of every training and held-out window, the k largest teacher logits and their
vocabulary indices in two numpy memmaps in a temporary folder, so the teacher's full-vocabulary logits never
sit in memory during training (a window of 256 tokens of a 49k vocabulary is 50 MB of float32; its top-64 is
64 KB). The folder is deleted when the cache is closed, also after a cancelled or failed run.

On the top-k support S of a token the teacher distribution is the renormalized softmax of its cached logits,
p̃_T(v) = exp(z_v / T) / Σ_{u∈S} exp(z_u / T), and the student's log-probabilities are its full-vocabulary
log-softmax gathered at S (see studio.methods.distillation.support_log_probs). With k equal to the vocabulary
both are the full distributions, so the loss equals the on-the-fly loss.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # imported when used, so listing the methods does not load torch
    import torch


class TopKTeacherCache:
    """Top-k teacher logits and indices for `count` windows of `seq_len` tokens, on disk."""

    def __init__(self, count: int, seq_len: int, k: int):
        import numpy as np

        self.folder = Path(tempfile.mkdtemp(prefix="studio-distill-"))
        shape = (count, seq_len, k)
        self.values = np.lib.format.open_memmap(self.folder / "values.npy", mode="w+", dtype=np.float32, shape=shape)
        self.indices = np.lib.format.open_memmap(self.folder / "indices.npy", mode="w+", dtype=np.int32, shape=shape)
        self.k = k

    def fill(self, windows: torch.Tensor, teacher_logits: Callable[[torch.Tensor], torch.Tensor],
             batch_size: int, check_cancel: Callable[[], None]) -> None:
        """Run the teacher over every window once and keep each token's top-k logits."""
        for start in range(0, len(windows), batch_size):
            check_cancel()
            logits = teacher_logits(windows[start:start + batch_size])
            top = logits.float().topk(self.k, dim=-1)
            stop = start + len(logits)
            self.values[start:stop] = top.values.cpu().numpy()
            self.indices[start:stop] = top.indices.to(dtype=top.indices.dtype).cpu().numpy()
            del logits, top

    def read(self, rows: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k logits, their vocabulary indices as int64) of the windows `rows`."""
        import torch

        values = torch.from_numpy(self.values[rows]).to(device)
        indices = torch.from_numpy(self.indices[rows].astype("int64")).to(device)
        return values, indices

    def close(self) -> None:
        self.values = self.indices = None  # release the memmaps before the files go
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "TopKTeacherCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
