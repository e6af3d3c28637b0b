"""Knowledge distillation: train the compressed model (the student) to give the next-token distributions of the
original (the teacher) on the calibration text.

Losses, per token, between temperature-softened distributions p = softmax(z / T), averaged over tokens and
multiplied by T² so that gradient magnitudes do not depend on T (Hinton et al., Sec. 2):

- forward KL, KL(p_T ‖ p_S) (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network");
- reverse KL, KL(p_S ‖ p_T), mode-seeking (Gu, Dong, Wei & Huang 2024, "MiniLLM: Knowledge Distillation of
  Large Language Models"). Only the token-level divergence is used: MiniLLM's policy-gradient optimization over
  student-generated sequences is not;
- generalized Jensen-Shannon divergence (Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist & Bachem 2024,
  "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes", GKD, Sec. 3):

      JSD(β)(p_T ‖ p_S) = β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M),    M = β p_T + (1 − β) p_S,

  with JSD(β)/β → KL(p_T ‖ p_S) as β → 0 and JSD(β)/(1 − β) → KL(p_S ‖ p_T) as β → 1. Here on the fixed
  calibration text (GKD's supervised setting, student data fraction λ = 0): no sequences are sampled.

Optional hidden-state loss (`hidden_weight` > 0): the mean squared error between the output hidden states of
matched decoder blocks. After layer dropping the student has fewer blocks; student block j of S is matched to
teacher block ⌈(j + 1) · T_blocks / S⌉ − 1, the last teacher block of the even stretch it stands for, so the
matches are spread evenly and the last blocks are paired.

What trains: every parameter of the targeted linear layers and every normalization layer ("all"), only the
normalization weights/biases and the targeted linears' biases ("norms_biases"), or LoRA adapters on the targeted
linears (studio.methods.lora, merged at the end). Records of earlier steps stay valid: a sparse layer keeps its
mask (gradients and weights are masked after every optimizer step; LoRA updates are masked), and a layer with
quantization codes is frozen. Training windows of `seq_len` tokens are cut from the calibration samples (each
starting with BOS when the samples do); whole samples are held out to measure the loss, and training stops when
it has not improved for `patience` evaluations; the best weights seen on the held-out windows are kept.
AdamW with a linear warm-up over the first 5% of steps, cosine decay to 10% of the rate, and gradient norm
clipping at 1. The defaults (12 steps of 4 × 128 tokens, LoRA rank 8) are sized for a few minutes on a 2-core CPU
with a 135M-parameter model (bench/bench_distill.py); larger models and machines afford more steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, model_validator

if TYPE_CHECKING:  # imported when used, so listing the methods does not load torch
    import torch
    from torch import nn

from studio.core.calibration import CPU_FLOPS_PER_SECOND
from studio.core.context import StepContext
from studio.core.errors import RecipeError
from studio.core.events import Metric, Progress
from studio.core.registry import Estimate, Family, LayerReport, Method, MethodParams, StepOutcome, register
from studio.core.state import compression_state
from studio.core.structure import find_decoder_blocks, in_out_features, iter_layers, weight_matrix
from studio.methods.lora import LoraAdapter, lora_parameter_count
from studio.methods.teacher_logits import TopKTeacherCache

GRADIENT_CLIP_NORM = 1.0
WARMUP_FRACTION = 0.05
FINAL_LR_FRACTION = 0.1
ASSUMED_VOCAB = 50_000  # estimate() sees the targeted layers only, not the LM head


class DistillParams(MethodParams):
    loss: Annotated[
        Literal["forward_kl", "reverse_kl", "gkd"],
        Field(description="KL(teacher‖student) (Hinton), KL(student‖teacher) (MiniLLM), or generalized JSD (GKD)."),
    ] = "forward_kl"
    beta: Annotated[
        float, Field(gt=0.0, lt=1.0, description="GKD's β: near 0 behaves like forward KL, near 1 like reverse KL.")
    ] = 0.5
    temperature: Annotated[
        float, Field(gt=0.0, le=20.0, description="Softmax temperature of both distributions; the loss is scaled by T².")
    ] = 1.0
    hidden_weight: Annotated[
        float, Field(ge=0.0, le=100.0, description="Weight of the hidden-state MSE between matched blocks (0: off).")
    ] = 0.0
    trainable: Annotated[
        Literal["all", "norms_biases", "lora"],
        Field(description="Train the targeted linears and norms, only norms and biases, or LoRA adapters."),
    ] = "lora"
    lora_rank: Annotated[int, Field(ge=1, le=1024, description="Rank r of the LoRA adapters.")] = 8
    lora_alpha: Annotated[float, Field(gt=0.0, le=4096.0, description="LoRA scale numerator: updates are (alpha/r)·BA.")] = 16.0
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0, description="AdamW peak learning rate.")] = 2e-3
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0, description="AdamW decoupled weight decay.")] = 0.0
    steps: Annotated[int, Field(ge=1, le=1_000_000, description="Optimizer steps (at most; early stopping may end sooner).")] = 12
    batch_size: Annotated[int, Field(ge=1, le=1024, description="Training windows per optimizer step.")] = 4
    seq_len: Annotated[int, Field(ge=8, le=16384, description="Tokens per training window cut from the calibration samples.")] = 128
    holdout: Annotated[
        float, Field(ge=0.0, lt=1.0, description="Fraction of calibration samples held out to measure the loss (0: none).")
    ] = 0.03
    eval_every: Annotated[int, Field(ge=1, le=1_000_000, description="Optimizer steps between held-out evaluations.")] = 6
    patience: Annotated[
        int, Field(ge=0, le=1000, description="Stop after this many evaluations without improvement (0: never early).")
    ] = 3
    teacher_logits: Annotated[
        Literal["on_the_fly", "cached_topk"],
        Field(description="Run the teacher at every step, or cache its top-k logits on disk once before training."),
    ] = "on_the_fly"
    top_k: Annotated[int, Field(ge=1, le=1_000_000, description="Teacher logits kept per token when cached.")] = 64
    seed: Annotated[int, Field(ge=0, description="Seed of the window order and the LoRA initialization.")] = 0

    @model_validator(mode="after")
    def _hidden_states_need_the_teacher(self):
        if self.hidden_weight > 0 and self.teacher_logits == "cached_topk":
            raise ValueError("hidden_weight > 0 needs the teacher's hidden states: use teacher_logits 'on_the_fly'")
        return self


# --- losses ---------------------------------------------------------------------------------------------------


def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(p_T ‖ p_S) per token, from log-probabilities over the last dimension."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(p_S ‖ p_T) per token."""
    return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)


def generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M) per token, M = β p_T + (1 − β) p_S (GKD)."""
    import torch

    log_mixture = torch.logsumexp(torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1 - beta)]), 0)
    teacher_term = (teacher_logp.exp() * (teacher_logp - log_mixture)).sum(-1)
    student_term = (student_logp.exp() * (student_logp - log_mixture)).sum(-1)
    return beta * teacher_term + (1 - beta) * student_term


def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, loss: str, beta: float) -> torch.Tensor:
    if loss == "forward_kl":
        return forward_kl(student_logp, teacher_logp)
    if loss == "reverse_kl":
        return reverse_kl(student_logp, teacher_logp)
    return generalized_jsd(student_logp, teacher_logp, beta)


def support_log_probs(student_logits: torch.Tensor, teacher_topk: torch.Tensor, indices: torch.Tensor,
                      temperature: float, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) log-probabilities on each token's top-k support S of the teacher.

    The teacher's are its renormalized softmax over S. The student's are its full-vocabulary log-softmax gathered
    at S: for forward KL, Σ_S p̃_T (log p̃_T − log p_S) still penalizes student mass outside S. Reverse KL and
    GKD take expectations under the student, so there its log-probabilities are renormalized over S too."""
    import torch
    import torch.nn.functional as F

    student = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, indices)
    if loss != "forward_kl":
        student = student - torch.logsumexp(student, dim=-1, keepdim=True)
    teacher = F.log_softmax(teacher_topk.float() / temperature, dim=-1)
    return student, teacher


@dataclass
class TeacherTargets:
    """The teacher's side of a batch: full logits (on the fly), or top-k logits and their indices (cached)."""

    logits: torch.Tensor | None = None
    topk: torch.Tensor | None = None
    indices: torch.Tensor | None = None


def kd_loss(student_logits: torch.Tensor, teacher: TeacherTargets, loss: str, beta: float,
            temperature: float) -> torch.Tensor:
    """Mean per-token divergence between the temperature-softened distributions, times T²."""
    import torch.nn.functional as F

    if teacher.logits is not None:
        student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
        teacher_logp = F.log_softmax(teacher.logits.float() / temperature, dim=-1)
    else:
        student_logp, teacher_logp = support_log_probs(student_logits, teacher.topk, teacher.indices,
                                                       temperature, loss)
    return divergence(student_logp, teacher_logp, loss, beta).mean() * temperature**2


def matched_blocks(student_blocks: int, teacher_blocks: int) -> list[int]:
    """The teacher block matched to each student block, spread evenly, last with last."""
    return [math.ceil((j + 1) * teacher_blocks / student_blocks) - 1 for j in range(student_blocks)]


# --- training windows -----------------------------------------------------------------------------------------


@dataclass
class Windows:
    tokens: torch.Tensor  # (windows, seq_len)
    sample: list[int]  # the calibration sample each window was cut from


def cut_windows(samples: torch.Tensor, seq_len: int, bos_id: int | None) -> Windows:
    """Consecutive windows of `seq_len` tokens from each sample. When every sample starts with BOS, each window
    gets BOS followed by seq_len − 1 text tokens, as the model sees text in use and in evaluation."""
    import torch

    seq_len = min(seq_len, samples.shape[1])
    with_bos = bos_id is not None and bool((samples[:, 0] == bos_id).all())
    text = samples[:, 1:] if with_bos else samples
    width = seq_len - 1 if with_bos else seq_len
    rows, owner = [], []
    for index, sample in enumerate(text):
        for start in range(0, len(sample) - width + 1, width):
            rows.append(sample[start:start + width])
            owner.append(index)
    tokens = torch.stack(rows)
    if with_bos:
        tokens = torch.cat([torch.full((len(rows), 1), bos_id, dtype=tokens.dtype), tokens], dim=1)
    return Windows(tokens, owner)


def split_holdout(windows: Windows, samples: int, fraction: float) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows): the last round(fraction · samples) samples are held out whole (at least
    one when fraction > 0), always leaving one sample to train on."""
    held_samples = min(max(round(fraction * samples), 1 if fraction > 0 else 0), samples - 1)
    first_held = samples - held_samples
    train = [i for i, s in enumerate(windows.sample) if s < first_held]
    held = [i for i, s in enumerate(windows.sample) if s >= first_held]
    return train, held


# --- what trains ----------------------------------------------------------------------------------------------


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, and the RMSNorm classes of transformers (LlamaRMSNorm, Qwen2RMSNorm, Gemma3RMSNorm...)."""
    import torch

    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("Norm")


def mask_in_parameter_layout(module: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """Records keep masks as (out, in); GPT-2's Conv1D stores its weight as (in, out)."""
    import torch

    return mask if isinstance(module, torch.nn.Linear) else mask.t()


@dataclass
class Trainable:
    """What the optimizer updates, and how to undo the setup afterwards."""

    parameters: list = field(default_factory=list)
    masks: list = field(default_factory=list)  # (parameter, bool mask in its layout): zeros stay zero
    weights: dict = field(default_factory=dict)  # linear name -> (module, its weight tensor before training)
    adapters: dict = field(default_factory=dict)  # linear name -> (module, LoraAdapter)
    frozen_quantized: list = field(default_factory=list)
    _requires_grad: list = field(default_factory=list)

    def train_in_place(self, parameter) -> None:
        """Give the parameter its own storage (the student shares it with the teacher), and let it train."""
        if any(parameter is p for p in self.parameters):
            return
        parameter.data = parameter.data.clone()
        parameter.requires_grad_(True)
        self.parameters.append(parameter)

    def count(self) -> int:
        return sum(p.numel() for p in self.parameters)

    def release(self) -> None:
        """Remove the adapters' hooks and restore every requires_grad flag."""
        for _, adapter in self.adapters.values():
            adapter.remove()
        for parameter, flag in self._requires_grad:
            parameter.requires_grad_(flag)


def select_trainable(ctx: StepContext, params: DistillParams, generator: torch.Generator) -> Trainable:
    model, state = ctx.model, compression_state(ctx.model)
    plan = Trainable(_requires_grad=[(p, p.requires_grad) for p in set(model.parameters())])
    for parameter, _ in plan._requires_grad:
        parameter.requires_grad_(False)
    linears = dict(iter_layers(ctx.layers))
    for name in linears:
        if state.get(name) is not None and state[name].quant is not None:
            plan.frozen_quantized.append(name)
    if params.trainable != "lora":
        for module in model.modules():
            if is_norm(module):
                for parameter in module.parameters(recurse=False):
                    plan.train_in_place(parameter)
    for name, module in linears.items():
        record = state.get(name)
        mask = None if record is None or record.packed_mask is None else record.mask.to(module.weight.device)
        if params.trainable != "lora" and getattr(module, "bias", None) is not None:
            plan.train_in_place(module.bias)
        if name in plan.frozen_quantized:
            continue
        if params.trainable == "lora":
            adapter = LoraAdapter(module, params.lora_rank, params.lora_alpha, mask, generator)
            plan.adapters[name] = (module, adapter)
            plan.parameters.extend(adapter.parameters())
        elif params.trainable == "all":
            plan.weights[name] = (module, module.weight.data)
            plan.train_in_place(module.weight)
            if mask is not None:
                plan.masks.append((module.weight, mask_in_parameter_layout(module, mask)))
    if not plan.parameters:
        plan.release()
        raise RecipeError(f"step {ctx.index + 1} (distill): nothing to train with trainable '{params.trainable}': "
                          f"of its {len(linears)} targeted layers, {len(plan.frozen_quantized)} keep quantization codes and "
                          "stay frozen; target other layers or train 'norms_biases'.")
    if plan.frozen_quantized:
        ctx.warn(f"distill: {len(plan.frozen_quantized)} quantized layers are frozen so their codes stay valid "
                 f"(first: {plan.frozen_quantized[0]})")
    return plan


def apply_masks(plan: Trainable, gradients: bool) -> None:
    import torch

    with torch.no_grad():
        for parameter, mask in plan.masks:
            target = parameter.grad if gradients else parameter.data
            if target is not None:
                target.mul_(mask)


# --- the teacher and the student --------------------------------------------------------------------------------


class BlockOutputs:
    """Forward hooks that keep each decoder block's output hidden states during a forward pass."""

    def __init__(self, model: nn.Module):
        self.outputs: list = []
        self._handles = [block.register_forward_hook(self._keep) for block in find_decoder_blocks(model).blocks]

    def _keep(self, module, args, output):
        self.outputs.append(output[0] if isinstance(output, (tuple, list)) else output)

    def take(self) -> list:
        outputs, self.outputs = self.outputs, []
        return outputs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class Teacher:
    """The original model, only ever run in eval mode without gradients."""

    def __init__(self, model: nn.Module, hidden: bool):
        self.model = model
        self.hidden = BlockOutputs(model) if hidden else None

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        import torch

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self.model(input_ids=ids.to(device_of(self.model)), use_cache=False).logits
        finally:
            self.model.train(was_training)

    def close(self) -> None:
        if self.hidden is not None:
            self.hidden.remove()


@dataclass
class Distiller:
    """One training run: the student, its teacher, the windows, and the loss."""

    student: nn.Module
    teacher: Teacher
    windows: torch.Tensor
    params: DistillParams
    cache: TopKTeacherCache | None = None
    student_hidden: BlockOutputs | None = None

    def targets(self, rows: list[int], ids: torch.Tensor) -> TeacherTargets:
        device = device_of(self.student)
        if self.cache is not None:
            topk, indices = self.cache.read(rows, device)
            return TeacherTargets(topk=topk, indices=indices)
        return TeacherTargets(logits=self.teacher.logits(ids).to(device))

    def loss(self, rows: list[int], with_hidden: bool = True) -> torch.Tensor:
        p = self.params
        ids = self.windows[rows].to(device_of(self.student))
        teacher = self.targets(rows, ids)
        logits = self.student(input_ids=ids, use_cache=False).logits
        loss = kd_loss(logits, teacher, p.loss, p.beta, p.temperature)
        if self.student_hidden is not None:
            student_states, teacher_states = self.student_hidden.take(), self.teacher.hidden.take()
            if with_hidden:
                loss = loss + p.hidden_weight * self.hidden_loss(student_states, teacher_states)
        return loss

    @staticmethod
    def hidden_loss(student_states: list, teacher_states: list) -> torch.Tensor:
        pairs = zip(student_states, matched_blocks(len(student_states), len(teacher_states)))
        errors = [(s.float() - teacher_states[t].float().to(s.device)).pow(2).mean() for s, t in pairs]
        return sum(errors) / len(errors)

    def held_out_loss(self, rows: list[int]) -> float:
        import torch

        self.student.eval()
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(rows), self.params.batch_size):
                batch = rows[start:start + self.params.batch_size]
                total += self.loss(batch, with_hidden=False).item() * len(batch)
        self.student.train()
        return total / len(rows)


def learning_rate_factor(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to FINAL_LR_FRACTION of the peak."""
    warmup = max(1, round(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class TrainingResult:
    curve: list = field(default_factory=list)  # training loss per optimizer step
    held_out: list = field(default_factory=list)  # (step, held-out loss)
    steps_run: int = 0
    stop_reason: str = ""
    best_step: int | None = None


def train(ctx: StepContext, distiller: Distiller, plan: Trainable, train_rows: list[int],
          held_rows: list[int], generator: torch.Generator) -> TrainingResult:
    import torch

    p = distiller.params
    optimizer = torch.optim.AdamW(plan.parameters, lr=p.learning_rate, weight_decay=p.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, p.steps))
    result = TrainingResult(stop_reason=f"ran all {p.steps} steps")
    best, best_state, evaluations_without_gain = math.inf, None, 0

    def evaluate(step: int) -> bool:
        """Held-out loss at `step`; True when training should stop early."""
        nonlocal best, best_state, evaluations_without_gain
        value = distiller.held_out_loss(held_rows)
        result.held_out.append((step, value))
        ctx.emit(Metric("distill_eval_loss", value, ctx.index))
        if value < best:
            best, result.best_step, evaluations_without_gain = value, step, 0
            best_state = [t.detach().clone() for t in plan.parameters]
            return False
        evaluations_without_gain += 1
        return 0 < p.patience <= evaluations_without_gain

    order: list[int] = []
    distiller.student.train()
    if held_rows:
        evaluate(0)
    for step in range(1, p.steps + 1):
        ctx.cancel.check()
        if len(order) < p.batch_size:  # reshuffle once the windows are used up
            order += [train_rows[i] for i in torch.randperm(len(train_rows), generator=generator).tolist()]
        batch, order = order[:p.batch_size], order[p.batch_size:]
        loss = distiller.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        apply_masks(plan, gradients=True)
        torch.nn.utils.clip_grad_norm_(plan.parameters, GRADIENT_CLIP_NORM)
        optimizer.step()
        schedule.step()
        apply_masks(plan, gradients=False)  # weight decay and Adam's state must not revive pruned weights
        result.curve.append(loss.item())
        result.steps_run = step
        ctx.emit(Metric("distill_loss", result.curve[-1], ctx.index))
        ctx.emit(Progress(ctx.index, step, p.steps, "step", f"distillation step {step}/{p.steps}"))
        due = step % p.eval_every == 0 or step == p.steps
        if held_rows and due and evaluate(step):
            result.stop_reason = f"held-out loss did not improve for {p.patience} evaluations"
            break
    if best_state is not None and result.held_out[-1][1] > best:  # keep the best weights seen
        with torch.no_grad():
            for parameter, saved in zip(plan.parameters, best_state):
                parameter.copy_(saved)
    distiller.student.eval()
    return result


# --- the method ------------------------------------------------------------------------------------------------


def commit_weights(ctx: StepContext, plan: Trainable) -> None:
    """Hand the trained linear weights to ctx.replace_weight, measured against the weights before training;
    masks and sparsity patterns of the records are unchanged (their zeros were kept)."""
    import torch

    with torch.no_grad():
        for name, (module, adapter) in plan.adapters.items():
            merged = adapter.merged_weight(module)
            ctx.replace_weight(name, module, merged, LayerReport(name, parameters=merged.numel()))
        for name, (module, before) in plan.weights.items():
            trained = weight_matrix(module).detach()
            module.weight.data = before
            ctx.replace_weight(name, module, trained, LayerReport(name, parameters=trained.numel()))


def bos_of(ctx: StepContext) -> int | None:
    settings = ctx.calibration.settings
    if settings is not None and settings.bos == "never":
        return None
    return getattr(ctx.tokenizer, "bos_token_id", None)


def prepare_cache(ctx: StepContext, distiller: Distiller, params: DistillParams) -> TopKTeacherCache:
    windows = distiller.windows
    cache = TopKTeacherCache(len(windows), windows.shape[1], params.top_k)
    try:
        ctx.emit(Progress(ctx.index, 0, params.steps, "step", "caching the teacher's top-k logits"))
        cache.fill(windows, distiller.teacher.logits, params.batch_size, ctx.cancel.check)
    except BaseException:
        cache.close()
        raise
    return cache


def vocabulary_size(model: nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


@register
class Distillation(Method):
    id = "distill"
    title = "Knowledge distillation"
    family = Family.DISTILLATION
    summary = "Train the compressed model to match the original's next-token distributions (KL, reverse KL, GKD)."
    needs_calibration = True
    needs_teacher = True
    Params = DistillParams

    def check_model(self, model, params: DistillParams) -> list[str]:
        vocabulary = vocabulary_size(model)
        if params.teacher_logits == "cached_topk" and vocabulary is not None and params.top_k > vocabulary:
            return [f"field 'top_k': {params.top_k} is larger than the vocabulary ({vocabulary} tokens)."]
        return []

    def estimate(self, layers, params: DistillParams) -> Estimate:
        linears = [m for _, m in iter_layers(layers)]
        weights = sum(m.weight.numel() for m in linears)
        hidden = in_out_features(linears[0])[0] if linears else 0
        if params.trainable == "lora":
            trainable = sum(lora_parameter_count(*reversed(in_out_features(m)), params.lora_rank) for m in linears)
        elif params.trainable == "all":
            trainable = weights
        else:
            trainable = sum(in_out_features(m)[1] for m in linears) + 4 * hidden * len(layers)
        tokens = params.batch_size * params.seq_len
        optimizer = trainable * 4 * 4  # gradient, two AdamW moments, the best weights kept for early stopping
        # own storage apart from the teacher's; LoRA on a sparse layer forms its masked (out, in) update, kept for
        # the backward pass (measured on SmolLM2 after Wanda 50%: about 3 GB over the model)
        copies = trainable * 4 if params.trainable != "lora" else weights * 4 * 3
        vocabulary = params.top_k if params.teacher_logits == "cached_topk" else ASSUMED_VOCAB
        logits = tokens * (ASSUMED_VOCAB * 3 + vocabulary * 3) * 4  # student logits, log-probs, gradient; teacher
        activations = tokens * hidden * len(layers) * 24 * 4
        passes = 4 if params.trainable == "all" else 3  # student forward + backward (+ weight gradients), teacher
        seconds = params.steps * passes * 2 * weights * tokens / CPU_FLOPS_PER_SECOND
        return Estimate(extra_bytes=optimizer + copies + logits + activations, seconds=seconds)

    def apply(self, ctx: StepContext, params: DistillParams) -> StepOutcome:
        import torch

        if ctx.teacher is None:
            raise RecipeError(f"step {ctx.index + 1} (distill) needs the original model as its teacher.")
        if ctx.calibration is None:
            raise RecipeError(f"step {ctx.index + 1} (distill) trains on calibration text; add a 'calibration' "
                              "section to the recipe.")
        begin = time.perf_counter()
        generator = torch.Generator().manual_seed(params.seed)
        samples = ctx.calibration.tokens
        windows = cut_windows(samples, params.seq_len, bos_of(ctx))
        train_rows, held_rows = split_holdout(windows, len(samples), params.holdout)
        if params.holdout > 0 and not held_rows:
            ctx.warn("distill: one calibration sample only, so nothing is held out and training runs every step")
        plan = select_trainable(ctx, params, generator)
        teacher = Teacher(ctx.teacher, hidden=params.hidden_weight > 0)
        distiller = Distiller(ctx.model, teacher, windows.tokens, params)
        try:
            if params.hidden_weight > 0:
                distiller.student_hidden = BlockOutputs(ctx.model)
            if params.teacher_logits == "cached_topk":
                distiller.cache = prepare_cache(ctx, distiller, params)
            result = train(ctx, distiller, plan, train_rows, held_rows, generator)
        finally:
            if distiller.cache is not None:
                distiller.cache.close()
            if distiller.student_hidden is not None:
                distiller.student_hidden.remove()
            teacher.close()
            plan.release()
            ctx.model.eval()
        commit_weights(ctx, plan)
        best = min((v for _, v in result.held_out), default=None)
        summary = {
            "loss": params.loss,
            "trainable": params.trainable,
            "teacher_logits": params.teacher_logits,
            "loss_curve": result.curve,
            "held_out_curve": [list(point) for point in result.held_out],
            "held_out_loss_before": result.held_out[0][1] if result.held_out else None,
            "held_out_loss_after": best,
            "best_step": result.best_step,
            "steps_run": result.steps_run,
            "stop_reason": result.stop_reason,
            "trainable_parameters": plan.count(),
            "frozen_quantized_layers": len(plan.frozen_quantized),
            "training_windows": len(train_rows),
            "held_out_windows": len(held_rows),
            "window_tokens": int(windows.tokens.shape[1]),
            "seconds": time.perf_counter() - begin,
        }
        return StepOutcome(ctx.reports, summary)
