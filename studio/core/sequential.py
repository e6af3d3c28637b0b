"""Compress a decoder block stage by stage in one pass over the calibration batches.

The GPTQ reference quantizes a LLaMA block "true sequentially": q/k/v first, then o_proj on the inputs the
quantized q/k/v give it, then gate/up, then down_proj, re-running the block on every sample for each group. Here
the block runs once: each calibration batch runs through the block in a thread of its own and pauses where the
next stage's input is ready; when every batch has paused there, the stage is compressed and the batches go on.
Only one thread computes at any moment (the others wait on a semaphore), so the block's own operations keep both
their thread pool and their order, and the block's outputs, with every stage compressed, come out of the same
pass.

A stage is a run of layers the block calls one after another on the very same input tensor (q/k/v, gate/up).
The stages are learned from one batch the first time a block of a given shape is met. A block that calls a
targeted layer twice, or skips one on that batch (mixture-of-experts routing), cannot be staged that way; it is
observed whole, compressed, and run again.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from studio.core.calibration import BlockPass, StageCompressor, StageObserver

Stage = tuple[str, ...]  # layer names, in the order the block calls them


class _Abort(Exception):
    pass


def learn_stages(block_pass: BlockPass, plans: dict) -> list[Stage] | None:
    """The block's stages, or None when it cannot be staged. Learned from its first batch, and remembered in
    `plans` under the layers' names inside the block, so a model's identical blocks are learned once."""
    inside = {id(m): n for n, m in block_pass.block.named_modules()}
    full_name = {inside.get(id(module), name): name for name, module in block_pass.layers.items()}
    key = tuple(full_name)
    if key not in plans:
        relative = {name: r for r, name in full_name.items()}
        stages = _stages_of_first_batch(block_pass)
        plans[key] = None if stages is None else [tuple(relative[n] for n in stage) for stage in stages]
    return None if plans[key] is None else [tuple(full_name[r] for r in stage) for stage in plans[key]]


def _stages_of_first_batch(block_pass: BlockPass) -> list[Stage] | None:
    import torch

    calls: list[tuple[str, Any]] = []  # the inputs are kept alive, so no address seen here is reused
    handles = [module.register_forward_pre_hook(lambda m, args, name=name: calls.append((name, args[0])))
               for name, module in block_pass.layers.items()]
    try:
        with torch.no_grad():
            block_pass.block(block_pass.inputs[0], *block_pass._call.args[0], **block_pass._call.kwargs[0])
    finally:
        for handle in handles:
            handle.remove()
    called = [name for name, _ in calls]
    if not len(called) == len(set(called)) == len(block_pass.layers):
        return None
    stages: list[Stage] = []
    previous = None
    for name, x in calls:
        same = previous is not None and (previous.data_ptr(), previous.shape, previous.stride()) == \
            (x.data_ptr(), x.shape, x.stride())
        stages = stages[:-1] + [stages[-1] + (name,)] if same else stages + [(name,)]
        previous = x
    return stages


@dataclass
class _Batch:
    """One calibration batch running through the block in its own thread."""

    index: int
    resume: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    stage: int = -1  # the stage it is paused at
    done: bool = False
    output: Any = None
    error: BaseException | None = None
    thread: threading.Thread | None = None


def run_in_stages(block_pass: BlockPass, stages: list[Stage], observe: StageObserver,
                  compress: StageCompressor) -> list[torch.Tensor]:
    """Observe and compress `stages` in order in one pass; returns the compressed block's outputs per batch."""
    import torch

    from studio.core.calibration import _block_output
    from studio.core.memory import share_one_malloc_arena

    first = {stage[0]: s for s, stage in enumerate(stages)}
    paused = threading.Semaphore(0)  # released by the running batch when it pauses or ends
    local = threading.local()
    aborting = False

    def pause_at(module, args, name):
        s = first.get(name)
        if s is None:  # a later layer of a stage already compressed
            return
        batch = local.batch
        x = args[0]
        observe(stages[s], x.reshape(-1, x.shape[-1]))
        batch.stage = s
        paused.release()
        batch.resume.acquire()
        if aborting:
            raise _Abort

    def run(batch: _Batch) -> None:
        local.batch = batch
        batch.resume.acquire()
        try:
            if not aborting:
                call = block_pass._call
                with torch.no_grad():  # grad mode is per thread
                    output = block_pass.block(block_pass.inputs[batch.index], *call.args[batch.index],
                                              **call.kwargs[batch.index])
                batch.output = _block_output(output)
        except _Abort:
            pass
        except BaseException as exc:  # handed to the main thread
            batch.error = exc
        finally:
            batch.done = True
            paused.release()

    def step(batch: _Batch) -> None:
        """Let `batch` compute until it pauses at a later stage or ends."""
        batch.resume.release()
        paused.acquire()
        if batch.error is not None:
            raise batch.error

    handles = [block_pass.layers[name].register_forward_pre_hook(lambda m, a, name=name: pause_at(m, a, name))
               for name in first]
    share_one_malloc_arena()
    batches = [_Batch(b) for b in range(len(block_pass.inputs))]
    for batch in batches:
        batch.thread = threading.Thread(target=run, args=(batch,), daemon=True, name=f"calibration batch {batch.index}")
        batch.thread.start()
    try:
        for s, stage in enumerate(stages):
            for batch in batches:
                if not batch.done and batch.stage < s:
                    block_pass._cancel.check()
                    step(batch)
            compress(stage)
        for batch in batches:
            if not batch.done:
                step(batch)
    finally:
        aborting = True
        for batch in batches:
            if not batch.done:
                batch.resume.release()
                paused.acquire()
            batch.thread.join()
        for handle in handles:
            handle.remove()
    return [batch.output for batch in batches]
