"""Compress a decoder block stage by stage, each stage on the inputs the compressed stages before it give.

The GPTQ reference quantizes a LLaMA block "true sequentially": q/k/v first, then o_proj on the inputs the
quantized q/k/v give it, then gate/up, then down_proj, re-running the block on every sample for each group
(`run_stage_by_stage`). The block can also run once (`run_in_stages`): each calibration batch runs through the
block as a greenlet (a call stack that can be paused) and pauses where the next stage's input is ready; when
every batch has paused there, the stage is compressed and the batches go on. Everything stays in the calling
thread, one batch computing at a time, and the block's outputs, with every stage compressed, come out of the same
pass. Both give the same inputs to every stage, bit for bit. The one pass saves the re-runs (on SmolLM2-135M
with 32 × 512 tokens, GPTQ W4 took 64 s against 103 s) but keeps every paused batch's activations alive (peak
RSS 1,321 against 1,197 MiB there; on a 7B model with 128 × 2048 tokens, gigabytes): the recipe chooses
(`stage_pass`), and by default `choose_stage_runner` takes it only where those are small beside the model.

A stage is a run of layers the block calls one after another on the very same input tensor (q/k/v, gate/up).
The stages are learned from one batch the first time a block of a given shape is met. A block that calls a
targeted layer twice, or skips one on that batch (mixture-of-experts routing), cannot be staged that way; it is
observed whole, compressed, and run again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from studio.core.calibration import BlockPass, StageCompressor, StageObserver

Stage = tuple[str, ...]  # layer names, in the order the block calls them


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


def run_in_stages(block_pass: BlockPass, stages: list[Stage], observe: StageObserver,
                  compress: StageCompressor) -> list[torch.Tensor]:
    """Observe and compress `stages` in order in one pass; returns the compressed block's outputs per batch."""
    import torch
    from greenlet import getcurrent, greenlet

    from studio.core.calibration import block_output

    first = {stage[0]: s for s, stage in enumerate(stages)}
    main = getcurrent()
    paused_at: dict[greenlet, int] = {}

    def pause_at(name: str, x: torch.Tensor) -> None:
        s, batch = first.get(name), getcurrent()
        if s is None or batch is main:  # a later layer of a stage already compressed, or not a batch
            return
        observe(stages[s], x.reshape(-1, x.shape[-1]))
        paused_at[batch] = s
        main.switch()

    def run(b: int) -> torch.Tensor:
        call = block_pass._call
        return block_output(block_pass.block(block_pass.inputs[b], *call.args[b], **call.kwargs[b]))

    batches = [greenlet(lambda b=b: run(b)) for b in range(len(block_pass.inputs))]
    outputs: list[torch.Tensor | None] = [None] * len(batches)

    def go_on(b: int) -> None:
        """Let batch b compute until it pauses at a later stage or ends; its errors are raised here."""
        result = batches[b].switch()
        if batches[b].dead:
            outputs[b] = result

    handles = [block_pass.layers[name].register_forward_pre_hook(lambda m, args, name=name: pause_at(name, args[0]))
               for name in first]
    try:
        with torch.no_grad():  # grad mode belongs to the thread, which every batch shares
            for s, stage in enumerate(stages):
                for b, batch in enumerate(batches):
                    if not batch.dead and paused_at.get(batch, -1) < s:
                        block_pass._cancel.check()
                        go_on(b)
                compress(stage)
            for b, batch in enumerate(batches):
                if not batch.dead:
                    go_on(b)
    finally:
        for batch in batches:
            if not batch.dead:
                batch.throw()  # GreenletExit unwinds the paused batch quietly
        for handle in handles:
            handle.remove()
    return outputs


def run_stage_by_stage(block_pass: BlockPass, stages: list[Stage], observe: StageObserver,
                       compress: StageCompressor) -> list[torch.Tensor]:
    """The reference's way: for each stage, run every batch from the block's input up to the stage (and no
    further), observe, compress; then run the compressed block whole for its outputs. Only the block's inputs
    and outputs stay alive between batches, at the price of re-running the block's earlier stages."""
    for stage in stages:
        block_pass.observe_inputs(lambda _name, x, stage=stage: observe(stage, x),
                                  layers={stage[0]: block_pass.layers[stage[0]]})
        compress(stage)
    return block_pass.forward()


PAUSED_SHARE_OF_AVAILABLE = 0.25  # the one pass's paused activations may take this share of the free memory
PAUSED_SHARE_OF_MODEL = 0.10  # and add at most this share of the model's weights to the peak


def paused_bytes(block_pass: BlockPass, stages: list[Stage]) -> int:
    """A lower bound on the memory the one pass keeps alive while every batch waits at the widest stage: each
    batch's block input, its residual copy and that stage's input."""
    from studio.core.structure import in_out_features

    element = block_pass.inputs[0].element_size()
    widest = max(in_out_features(block_pass.layers[stage[0]])[0] for stage in stages)
    return sum(x.numel() // x.shape[-1] * (2 * x.shape[-1] + widest) * element for x in block_pass.inputs)


def choose_stage_runner(block_pass: BlockPass, stages: list[Stage], wanted: str = "auto",
                        model_bytes: int | None = None) -> str:
    """`wanted` ("one_pass" or "rerun"), or for "auto": "one_pass" when its paused batches add at most a tenth
    of the model's weights (`model_bytes`) and fit in a quarter of the memory available now, else "rerun".

    The tenth keeps the one pass where it costs little: on SmolLM2-135M with 32 × 512 tokens the paused batches
    (168 MiB estimated, a third of the model) raised GPTQ's peak RSS from 1,197 to 1,321 MiB for 103 → 64 s;
    on a 7B model with 32 × 512 tokens they are about 5 % of its weights."""
    if wanted != "auto":
        return wanted
    from studio.core.memory import available_memory_bytes

    paused = paused_bytes(block_pass, stages)
    small = model_bytes is None or paused <= PAUSED_SHARE_OF_MODEL * model_bytes
    fits = paused <= PAUSED_SHARE_OF_AVAILABLE * available_memory_bytes()
    return "one_pass" if small and fits else "rerun"
