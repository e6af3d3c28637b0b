"""Evaluation: perplexity and KL to the original, zero-shot accuracy, size, speed, sample generations, and
weight histograms."""

from studio.core.evaluation.perplexity import PerplexityConfig, PerplexityResult, load_eval_tokens, perplexity
from studio.core.evaluation.size import size_report
from studio.core.evaluation.speed import generate_samples, throughput
from studio.core.evaluation.weights import layer_histograms, linear_layer_names, weight_histogram
from studio.core.evaluation.zeroshot import zero_shot_accuracy

__all__ = [
    "PerplexityConfig",
    "PerplexityResult",
    "generate_samples",
    "layer_histograms",
    "linear_layer_names",
    "load_eval_tokens",
    "perplexity",
    "size_report",
    "throughput",
    "weight_histogram",
    "zero_shot_accuracy",
]
