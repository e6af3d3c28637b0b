"""Calibration data and the layer-wise engine shared by every method that looks at real activations.

The engine follows the sequential scheme of the GPTQ reference implementation: the inputs of decoder block 0
are captured once for all calibration samples; then, block by block, a method observes the block's layers on
those inputs (hooks on the linear layers), changes the block, and the block is run again so the next block
sees the inputs the compressed model will really give it. Methods that compress layer group by layer group
(GPTQ) do both with `BlockPass.compress_in_stages` (studio.core.sequential): in one pass when the paused batches
fit in memory, else re-running the block per stage as the reference does. Only one block's activations are
alive at a time, so memory stays near the model plus `samples × seq_len × hidden` floats twice.

Every argument a model passes to its blocks (rotary embeddings, masks, per-layer-type masks such as Gemma's
sliding windows) is captured per block in one cheap pass in which the blocks are replaced by the identity, so
no per-architecture code is needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from studio.core.errors import EvaluationError, RecipeError
from studio.core.events import CancelToken, EventCallback, Progress, ignore
from studio.core.memory import return_free_memory

if TYPE_CHECKING:  # torch loads lazily: the window must open fast
    import torch
    from torch import nn


CPU_FLOPS_PER_SECOND = 2e10  # sustained float32 matmul throughput assumed by the methods' time estimates


class CalibrationSettings(BaseModel):
    """The `calibration:` section of a recipe: where the text comes from and how it is cut into samples."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    text_file: Annotated[str | None, Field(description="Plain-text file to sample from (relative paths: from the working folder).")] = None
    dataset: Annotated[
        str | None,
        Field(description="Hub dataset as 'name[:config][@split]', e.g. 'allenai/c4:en@train' (needs `datasets` and a network)."),
    ] = None
    samples: Annotated[int, Field(ge=1, le=4096, description="Number of calibration samples.")] = 32
    seq_len: Annotated[int, Field(ge=8, le=16384, description="Tokens per sample.")] = 512
    seed: Annotated[int, Field(ge=0, description="Seed of the random choice of sample windows.")] = 0
    batch_size: Annotated[int, Field(ge=1, le=1024, description="Samples per forward pass through a block.")] = 8
    bos: Annotated[
        Literal["auto", "always", "never"],
        Field(description="Start each sample with the BOS token (auto: when the tokenizer has one), as evaluation does."),
    ] = "auto"
    stage_pass: Annotated[
        Literal["auto", "rerun", "one_pass"],
        Field(description=(
            "How methods that compress a block stage by stage (GPTQ, SparseGPT) get each stage's inputs. rerun: the "
            "block runs again from its inputs for every stage, as the GPTQ reference does; the least memory. "
            "one_pass: the block runs once, each batch waiting before each stage; about 40% faster, but every "
            "batch's activations at a stage are held together. auto: one_pass when those would add at most a tenth "
            "of the model's size and fit in a quarter of the free memory."
        )),
    ] = "auto"

    @model_validator(mode="after")
    def _one_source(self):
        if self.text_file and self.dataset:
            raise ValueError("give either 'text_file' or 'dataset', not both")
        return self

    @property
    def has_source(self) -> bool:
        return bool(self.text_file or self.dataset)

    def describe(self) -> str:
        source = self.text_file or self.dataset or "no text"
        return f"{self.samples} × {self.seq_len} tokens of {source} (seed {self.seed})"


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"Calibration text '{path}' does not exist; give an existing text file.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"Could not read calibration text '{path}' as UTF-8: {exc}") from None


def _read_hub_dataset(spec: str, characters: int) -> str:
    """Text of a hub dataset's 'text' column, streamed until `characters` are read."""
    try:
        import datasets
    except ImportError:
        raise RecipeError(
            f"Calibration dataset '{spec}' needs the `datasets` package (pip install datasets), or give a "
            "local 'text_file' instead."
        ) from None
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        stream = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
        parts, size = [], 0
        for row in stream:
            text = row.get("text") or ""
            parts.append(text)
            size += len(text)
            if size >= characters:
                break
    except Exception as exc:  # offline, unknown name, no 'text' column
        raise RecipeError(
            f"Could not read calibration dataset '{spec}' from the hub ({type(exc).__name__}: {exc}). "
            "Offline, give a local 'text_file' instead."
        ) from None
    return "\n\n".join(parts)


def load_calibration_tokens(tokenizer: Any, settings: CalibrationSettings) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens at random offsets (fixed seed) in the tokenized text, as (N, L).

    With BOS, each window is BOS + seq_len - 1 tokens of text. A model treats its first token as an attention
    sink with very large activations; calibrating on windows that start mid-text while the model is used (and
    evaluated) after BOS makes the quantizers fit sink activations the model never produces in use."""
    import torch

    if tokenizer is None:
        raise EvaluationError("The model has no tokenizer, so calibration text cannot be tokenized.")
    wanted = settings.samples * settings.seq_len
    # enough text for every window to be distinct, without tokenizing megabytes when little is needed
    characters = max(wanted * 24, 200_000)
    if settings.text_file:
        source = settings.text_file
        text = _read_text_file(Path(os.path.expanduser(settings.text_file)))[:characters]
    elif settings.dataset:
        source = settings.dataset
        text = _read_hub_dataset(settings.dataset, characters)
    else:
        raise RecipeError("The calibration section names no 'text_file' or 'dataset'.")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    del text
    return_free_memory()  # the tokenizer's working memory (tens of MiB) would otherwise stay with the heap
    if len(ids) < settings.seq_len + 1:
        raise RecipeError(
            f"Calibration text '{source}' has {len(ids)} tokens, fewer than one sample of seq_len "
            f"{settings.seq_len}; give a longer text or a smaller 'seq_len'."
        )
    bos = getattr(tokenizer, "bos_token_id", None) if settings.bos != "never" else None
    if settings.bos == "always" and bos is None:
        raise RecipeError("calibration bos 'always' was asked for but the tokenizer has no BOS token.")
    length = settings.seq_len - (bos is not None)
    stream = torch.tensor(ids, dtype=torch.long)
    generator = torch.Generator().manual_seed(settings.seed)
    starts = torch.randint(0, len(ids) - length, (settings.samples,), generator=generator)
    samples = torch.stack([stream[s : s + length] for s in starts.tolist()])
    if bos is not None:
        samples = torch.cat([torch.full((settings.samples, 1), bos, dtype=torch.long), samples], dim=1)
    return samples


# estimates are made before the recipe's calibration section is read, so they assume its defaults
DEFAULT_CALIBRATION_TOKENS = CalibrationSettings.model_fields["samples"].default * CalibrationSettings.model_fields["seq_len"].default


@dataclass
class CalibrationData:
    tokens: torch.Tensor  # (N, L)
    batch_size: int
    settings: CalibrationSettings | None = None


class _StopForward(Exception):
    pass


@dataclass
class _BlockCall:
    """What the model passes to one block besides the hidden states, one entry per batch."""

    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)


def _hidden_and_rest(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def capture_block_inputs(
    model: nn.Module, blocks: list[nn.Module], tokens: torch.Tensor, batch_size: int, cancel: CancelToken
) -> tuple[list[torch.Tensor], list[_BlockCall]]:
    """Hidden states entering block 0, per batch, and every block's other arguments.

    Each block's forward is swapped for one that records its arguments and hands the hidden states on
    unchanged; the last one stops the model, so the pass costs the embeddings and no block or LM head."""
    import torch

    calls = [_BlockCall() for _ in blocks]
    hidden: list[torch.Tensor] = []

    def recorder(i: int):
        def forward(*args, **kwargs):
            h, rest, kw = _hidden_and_rest(args, kwargs)
            calls[i].args.append(rest)
            calls[i].kwargs.append(kw)
            if i == 0:
                hidden.append(h)
            if i == len(blocks) - 1:
                raise _StopForward
            return h

        return forward

    device = next(model.parameters()).device
    try:
        for i, block in enumerate(blocks):
            block.forward = recorder(i)
        with torch.no_grad():
            for start in range(0, len(tokens), batch_size):
                cancel.check()
                try:
                    model(input_ids=tokens[start : start + batch_size].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
    return hidden, calls


def _signature(block: nn.Module) -> tuple:
    """Changes when a method gives the block new weights or new modules (both rebind tensors)."""
    return tuple((name, p.data_ptr(), tuple(p.shape), p._version) for name, p in block.named_parameters())


Hook = Callable[[str, "torch.Tensor", "torch.Tensor"], None]  # (layer name, input (tokens, in), output)
InputHook = Callable[[str, "torch.Tensor"], None]  # (layer name, input (tokens, in))
StageObserver = Callable[[tuple[str, ...], "torch.Tensor"], None]  # (stage, its input (tokens, in))
StageCompressor = Callable[[tuple[str, ...]], None]


@dataclass
class BlockPass:
    """One decoder block during a layer-wise run: its index, module, targeted layers and calibration inputs."""

    index: int
    block: nn.Module
    layers: dict[str, nn.Module]  # targeted linear layers of this block, by full name
    inputs: list[torch.Tensor]  # hidden states per batch
    _call: _BlockCall
    _cancel: CancelToken
    _outputs: list[torch.Tensor] | None = None
    _outputs_signature: tuple | None = None
    _stage_plans: dict = field(default_factory=dict)  # shared by the blocks of one walk
    _stage_pass: str = "auto"  # CalibrationSettings.stage_pass
    _model_bytes: int | None = None  # the whole model's weights, for choosing the stage runner

    def compress_in_stages(self, observe: StageObserver, compress: StageCompressor) -> None:
        """Compress the targeted layers group by group in the order the block calls them, each group seeing the
        inputs that the groups before it, already compressed, give it (studio.core.sequential): `observe(stage,
        x)` gets every batch's input of a stage (layers reading the same tensor, e.g. q/k/v), then `compress(
        stage)` changes those layers. The block's outputs, every stage compressed, become the next block's inputs.
        A re-run per stage, or one pass over the batches (CalibrationSettings.stage_pass)."""
        from studio.core.sequential import choose_stage_runner, learn_stages, run_in_stages, run_stage_by_stage

        stages = learn_stages(self, self._stage_plans)
        if stages is None:  # observe every layer, compress them all, run the block again for its outputs
            self.forward(lambda name, x, _output: observe((name,), x))
            for name in self.layers:
                compress((name,))
            return
        if choose_stage_runner(self, stages, self._stage_pass, self._model_bytes) == "rerun":
            run_stage_by_stage(self, stages, observe, compress)
            return
        outputs = run_in_stages(self, stages, observe, compress)
        self._outputs, self._outputs_signature = outputs, _signature(self.block)

    def forward(self, hook: Hook | None = None, layers: dict[str, nn.Module] | None = None) -> list[torch.Tensor]:
        """Run the block on every calibration batch. With `hook`, it is called for each of `layers` (default:
        the targeted ones) with the layer's input flattened to (tokens, in_features) and its output."""
        import torch

        handles = []
        if hook is not None:
            for name, module in (self.layers if layers is None else layers).items():
                def observe(module, args, output, name=name):
                    x = args[0]
                    hook(name, x.reshape(-1, x.shape[-1]), output)

                handles.append(module.register_forward_hook(observe))
        outputs = []
        try:
            with torch.no_grad():
                for b, h in enumerate(self.inputs):
                    self._cancel.check()
                    outputs.append(block_output(self.block(h, *self._call.args[b], **self._call.kwargs[b])))
        finally:
            for handle in handles:
                handle.remove()
        self._outputs, self._outputs_signature = outputs, _signature(self.block)
        return outputs

    def observe_inputs(self, hook: InputHook, layers: dict[str, nn.Module] | None = None) -> None:
        """Call `hook` with the input of each of `layers` (default: the targeted ones), flattened to
        (tokens, in_features), on every calibration batch. The block's outputs are not wanted, so a batch
        stops as soon as every layer has been reached: the last layer's own product and the rest of the block
        are skipped (for GPTQ, down_proj: a quarter of the block's work)."""
        import torch

        watched = self.layers if layers is None else layers
        waiting: set[str] = set()

        def observe(module, args, name):
            x = args[0]
            hook(name, x.reshape(-1, x.shape[-1]))
            waiting.discard(name)
            if not waiting:
                raise _StopForward

        handles = [module.register_forward_pre_hook(lambda m, a, name=name: observe(m, a, name))
                   for name, module in watched.items()]
        try:
            with torch.no_grad():
                for b, h in enumerate(self.inputs):
                    self._cancel.check()
                    waiting.update(watched)
                    try:
                        self.block(h, *self._call.args[b], **self._call.kwargs[b])
                    except _StopForward:
                        pass
        finally:
            for handle in handles:
                handle.remove()

    def outputs(self) -> list[torch.Tensor]:
        """The block's outputs as it is now: reused from the last pass when the block has not changed since."""
        if self._outputs is None or self._outputs_signature != _signature(self.block):
            return self.forward()
        return self._outputs


def layerwise(
    model: nn.Module,
    calibration: CalibrationData,
    targets: dict[int, dict[str, nn.Module]],
    *,
    cancel: CancelToken | None = None,
    emit: EventCallback = ignore,
    step_index: int = 0,
    all_blocks: bool = False,
) -> Iterator[BlockPass]:
    """Yield a BlockPass for each block that has targeted layers (every block with `all_blocks`), in order.
    After the caller is done with a block, its outputs become the next block's inputs. Stops after the
    last block needed. Reports progress per block and checks cancellation between batches."""
    from studio.core.structure import find_decoder_blocks

    cancel = cancel or CancelToken()
    blocks = list(find_decoder_blocks(model).blocks)
    last = len(blocks) - 1 if all_blocks else max(targets, default=-1)
    if last < 0:
        return
    emit(Progress(step_index, 0, last + 1, "block", "capturing calibration inputs"))
    stage_plans: dict = {}
    stage_pass = calibration.settings.stage_pass if calibration.settings is not None else "auto"
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    inputs, calls = capture_block_inputs(model, blocks, calibration.tokens, calibration.batch_size, cancel)
    for i in range(last + 1):
        cancel.check()
        current = BlockPass(i, blocks[i], targets.get(i, {}), inputs, calls[i], cancel, _stage_plans=stage_plans,
                            _stage_pass=stage_pass, _model_bytes=model_bytes)
        if all_blocks or i in targets:
            yield current
        if i < last:
            inputs = current.outputs()
        del current
        return_free_memory()  # the block's activations, freed, would otherwise stay in the process
        emit(Progress(step_index, i + 1, last + 1, "block", f"block {i}"))
