"""Evaluation: perplexity and KL to the original, zero-shot accuracy, size, speed, sample generations."""

from studio.core.evaluation.perplexity import PerplexityConfig, PerplexityResult, load_eval_tokens, perplexity
from studio.core.evaluation.size import size_report
from studio.core.evaluation.speed import generate_samples, throughput
from studio.core.evaluation.zeroshot import zero_shot_accuracy

__all__ = [
    "PerplexityConfig",
    "PerplexityResult",
    "generate_samples",
    "load_eval_tokens",
    "perplexity",
    "size_report",
    "throughput",
    "zero_shot_accuracy",
]
