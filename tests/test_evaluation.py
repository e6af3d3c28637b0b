import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from conftest import tiny_model
from studio.core.errors import EvaluationError
from studio.core.evaluation import (
    PerplexityConfig,
    generate_samples,
    load_eval_tokens,
    perplexity,
    size_report,
    throughput,
    zero_shot_accuracy,
)
from studio.core.evaluation.perplexity import _windows


@given(n=st.integers(2, 400), window=st.integers(2, 64), data=st.data(), bos=st.booleans())
def test_windows_score_every_token_exactly_once(n, window, data, bos):
    stride = data.draw(st.integers(1, window))
    scored = []
    for begin, end, first in _windows(n, window, stride, bos):
        assert begin <= first < end and end - begin <= (window - 1 if bos else window)
        scored += range(first, end)
    assert scored == list(range(0 if bos else 1, n))


def test_perplexity_matches_a_direct_computation(tokenizer, text_file):
    model = tiny_model("llama")
    config = PerplexityConfig(str(text_file), max_tokens=200, window=256, stride=256, bos="never")
    tokens = load_eval_tokens(tokenizer, config)
    assert len(tokens) == 200
    result = perplexity(model, tokens, config, tokenizer)
    logp = F.log_softmax(model(tokens[None]).logits[0, :-1], -1)
    direct = math.exp(-logp.gather(1, tokens[1:, None]).mean().item())
    assert result.perplexity == pytest.approx(direct, rel=1e-5)
    assert result.tokens_scored == len(tokens) - 1
    assert result.config["window"] == 256 and result.config["join"] == "\n\n" and result.config["bos_token_id"] is None


def test_bos_and_join_are_recorded(tokenizer, text_file):
    config = PerplexityConfig(str(text_file), max_tokens=100, window=32, stride=16, join="\n")
    result = perplexity(tiny_model("qwen2"), load_eval_tokens(tokenizer, config), config, tokenizer)
    assert result.tokens_scored == 100 and result.config["bos_token_id"] == tokenizer.bos_token_id
    assert result.config["join"] == "\n" and result.config["tokens_total"] == 100
    assert result.config["effective_stride"] == 16
    side_by_side = PerplexityConfig(str(text_file), max_tokens=100, window=32, stride=32)
    result = perplexity(tiny_model("qwen2"), load_eval_tokens(tokenizer, side_by_side), side_by_side, tokenizer)
    assert result.config["effective_stride"] == 31 and result.tokens_scored == 100  # BOS takes a place


def test_kl_to_itself_is_zero_and_to_another_model_positive(tokenizer, text_file):
    config = PerplexityConfig(str(text_file), max_tokens=300, window=64, stride=32)
    tokens = load_eval_tokens(tokenizer, config)
    model = tiny_model("llama")
    same = perplexity(model, tokens, config, tokenizer, reference=model)
    assert same.kl == pytest.approx(0, abs=1e-6) and same.top1_agreement == 1.0
    other = perplexity(tiny_model("llama", seed=1), tokens, config, tokenizer, reference=model)
    assert other.kl > 0.01 and other.top1_agreement < 1


def test_missing_and_empty_text(tokenizer, tmp_path):
    with pytest.raises(EvaluationError, match="does not exist"):
        load_eval_tokens(tokenizer, PerplexityConfig(str(tmp_path / "nope.txt")))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(EvaluationError, match="empty"):
        load_eval_tokens(tokenizer, PerplexityConfig(str(tmp_path / "empty.txt")))


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_zero_shot_formats_and_a_model_that_knows_the_answer(tokenizer, tmp_path):
    class Oracle(torch.nn.Module):
        """Puts all probability on the token that follows in a fixed text: knows every correct answer."""

        def __init__(self, answer_ids):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.answer_ids = answer_ids

        def forward(self, input_ids, attention_mask=None, **kw):
            logits = torch.full((*input_ids.shape, 320), -10.0)
            for row in range(input_ids.shape[0]):
                ids = input_ids[row].tolist()
                for pos in range(len(ids) - 1):
                    for ans in self.answer_ids:
                        if ids[: pos + 1] == ans[: pos + 1] and pos + 1 < len(ans):
                            logits[row, pos, ans[pos + 1]] = 10.0
            return type("Out", (), {"logits": logits})

    bos = tokenizer.bos_token_id
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"query": "The fox", "choices": ["dog", "jumps over"], "gold": 1}])
    wino = write_jsonl(tmp_path / "wino.jsonl", [{"context_options": ["The dog", "The fox"], "continuation": "jumps", "gold": 1}])
    lamb = write_jsonl(tmp_path / "lamb.jsonl", [{"context": "The quick brown", "continuation": "fox"}])
    answers = [[bos] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("The fox jumps over", "The quick brown fox")]
    oracle = Oracle(answers)
    for path in (mc, wino, lamb):
        result = zero_shot_accuracy(oracle, tokenizer, path)
        assert result["acc"] == 1.0 and result["acc_norm"] == 1.0 and result["items"] == 1


def test_zero_shot_on_the_shared_task_files_runs(tokenizer):
    from conftest import TASKS, shared_file

    model = tiny_model("llama")
    for name in ("arc_easy", "winogrande", "lambada_openai", "boolq", "piqa"):
        result = zero_shot_accuracy(model, tokenizer, shared_file(TASKS / f"{name}.jsonl"), limit=3)
        assert result["items"] == 3 and 0 <= result["acc"] <= 1


def test_bad_task_file(tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(EvaluationError, match="line 1: unknown task format"):
        zero_shot_accuracy(tiny_model(), tokenizer, bad)


def test_size_speed_and_generation(tokenizer, tmp_path):
    model = tiny_model("llama")
    size = size_report(model)
    assert size["parameters"] == sum(p.numel() for p in model.parameters())
    assert size["memory_bytes"] == size["compressed_bytes"] >= size["parameters"] * 4
    speed = throughput(model, prompt_tokens=16, new_tokens=4, repeats=1)
    assert speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0
    out = generate_samples(model, tokenizer, ("The fox",), max_new_tokens=4)
    assert out[0]["prompt"] == "The fox" and isinstance(out[0]["completion"], str)


def test_size_report_counts_nonzeros_exactly_negative_zeros_included():
    from torch import nn

    model = nn.Sequential(nn.Linear(3000, 2000, bias=False), nn.Linear(8, 8).to(torch.bfloat16))
    with torch.no_grad():
        w = model[0].weight
        w[w.abs() < 0.01] = 0.0  # scattered zeros, past the first chunk of the count
        w[0, :10] = -0.0  # a masked negative weight: zero, though its bits are not
        model[1].weight[0] = 0.0
    expected = sum(int(p.count_nonzero()) for p in model.parameters())
    assert size_report(model)["nonzero_parameters"] == expected


def _rss_file_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile line")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are released on Linux only")
def test_counting_a_mapped_checkpoint_does_not_keep_it_resident_nor_lose_what_was_written(tmp_path):
    import mmap

    from studio.core.evaluation.size import _count_nonzero

    values = torch.randn(8 << 20)  # 32 MiB
    values[::7] = 0.0
    path = tmp_path / "weights.bin"
    path.write_bytes(values.numpy().tobytes())

    def mapped():  # what transformers does with a safetensors file: a private, writable mapping
        with open(path, "r+b") as f:
            return torch.frombuffer(mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE), dtype=torch.float32)

    plain = mapped()
    before = _rss_file_bytes()
    assert float(plain.abs().sum()) > 0  # a plain read keeps every page: the measure sees 32 MiB
    assert _rss_file_bytes() - before > 24 << 20

    weights = mapped()
    weights[: 1 << 20] = 5.0  # the first 4 MiB written: private copies, which must survive the release
    before = _rss_file_bytes()
    assert _count_nonzero(weights) == int(values.count_nonzero()) + (1 << 20) - int(values[: 1 << 20].count_nonzero())
    assert _rss_file_bytes() - before < 2 << 20
    assert bool((weights[: 1 << 20] == 5.0).all()) and torch.equal(weights[1 << 20 :], values[1 << 20 :])
