"""Quality on the real SmolLM2-135M (from ../shared): what the methods promise, measured on WikiText-2."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import SMOLLM
from studio.core.evaluation import PerplexityConfig, load_eval_tokens, perplexity
from studio.core.export import export_hf_folder
from studio.core.recipe import parse_recipe
from studio.core.runner import run_recipe
from studio.core.state import compression_state
from studio.core.structure import TargetSpec, target_layers, weight_matrix

pytestmark = pytest.mark.real_model
TOKENS = 2048


@pytest.fixture(scope="module")
def config(wikitext):
    return PerplexityConfig(str(wikitext), max_tokens=TOKENS, window=1024, stride=1024)


@pytest.fixture(scope="module")
def tokens(smollm, config):
    return load_eval_tokens(smollm.tokenizer, config)


@pytest.fixture(scope="module")
def baseline(smollm, tokens, config):
    return perplexity(smollm.model, tokens, config, smollm.tokenizer).perplexity


def compress(smollm, method, **params):
    recipe = parse_recipe({"schema_version": 1, "steps": [{"method": method, "params": params}]})
    result = run_recipe(recipe, smollm)
    assert result.status == "finished", result.error
    return result


@torch.inference_mode()
def plain_perplexity(model, tokens, bos, chunk=1023):
    """Written without studio code: BOS + 1023 tokens per window, windows side by side, every token scored."""
    nll, count = 0.0, 0
    for start in range(0, len(tokens), chunk):
        ids = torch.cat([torch.tensor([bos]), tokens[start:start + chunk]])[None]
        logp = F.log_softmax(model(ids).logits[0, :-1].float(), -1)
        nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def test_baseline_matches_plain_transformers_on_the_same_tokens(smollm, tokens, baseline):
    reference = AutoModelForCausalLM.from_pretrained(SMOLLM.parent, gguf_file=SMOLLM.name, dtype=torch.float32)
    expected = plain_perplexity(reference.eval(), tokens, smollm.tokenizer.bos_token_id)
    assert baseline == pytest.approx(expected, rel=1e-3)
    assert 15 < baseline < 30  # SmolLM2-135M on WikiText-2 is about 20-24 depending on the window


def test_rtn_perplexity_rises_as_bits_fall(smollm, tokens, config, baseline):
    ppl = {}
    for bits in (4, 3, 2):
        model = compress(smollm, "rtn", bits=bits, group_size=64, symmetric=False).model
        ppl[bits] = perplexity(model, tokens, config, smollm.tokenizer).perplexity
    print(f"baseline {baseline:.2f}, RTN g64: " + ", ".join(f"{b}-bit {p:.2f}" for b, p in ppl.items()))
    assert baseline < ppl[4] < 1.5 * baseline  # a little
    assert ppl[4] < ppl[3] < ppl[2]
    assert ppl[3] > 1.5 * baseline  # more
    assert ppl[2] > 20 * baseline  # a lot


def test_magnitude_50_percent_in_every_targeted_layer(smollm):
    model = compress(smollm, "magnitude", sparsity=0.5).model
    layers = [m for block in target_layers(model, TargetSpec()).values() for m in block.values()]
    assert len(layers) == 30 * 7
    for module in layers:
        assert abs((weight_matrix(module) == 0).float().mean().item() - 0.5) <= 0.005
    assert torch.equal(model.model.embed_tokens.weight, smollm.model.model.embed_tokens.weight)


def test_two_four_exactly_two_in_every_four(smollm):
    model = compress(smollm, "magnitude", pattern="2:4").model
    modules = dict(model.named_modules())
    for name, record in compression_state(model).items():
        w = weight_matrix(modules[name])
        assert torch.all(record.mask.reshape(w.shape[0], -1, 4).sum(-1) == 2)
        assert torch.all((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2)


def test_export_reloads_with_plain_transformers_with_the_same_perplexity(smollm, tokens, config, tmp_path):
    result = compress(smollm, "rtn", bits=4, group_size=64)
    in_memory = perplexity(result.model, tokens, config, smollm.tokenizer).perplexity
    out = export_hf_folder(result.model, smollm.tokenizer, tmp_path / "rtn4", report=result.report)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert perplexity(reloaded, tokens, config, smollm.tokenizer).perplexity == pytest.approx(in_memory, rel=1e-3)


def test_cli_run_with_the_rtn_preset(wikitext, tmp_path, smollm, baseline):
    out = tmp_path / "x"
    cmd = [sys.executable, "-m", "studio", "run", "resources/presets/rtn-w4-g64.yaml", "--model", str(SMOLLM),
           "--out", str(out), "--eval-text", str(wikitext), "--tokens", str(TOKENS), "--stride", "1024", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=os.environ.copy(),
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["baseline"]["perplexity"] == pytest.approx(baseline, rel=1e-3)
    assert report["final"]["perplexity"] > report["baseline"]["perplexity"]
    assert report["export"]["size"]["compressed_bytes"] < 0.4 * report["size_before"]["memory_bytes"]


# --- calibration methods ----------------------------------------------------------------------------------
C4 = SMOLLM.parents[1] / "data" / "text" / "c4-en-sample.txt"


def calibrated(smollm, method, samples=8, seq_len=256, **params):
    recipe = parse_recipe({"schema_version": 2, "steps": [{"method": method, "params": params}],
                           "calibration": {"text_file": str(C4), "samples": samples, "seq_len": seq_len}})
    result = run_recipe(recipe, smollm)
    assert result.status == "finished", result.error
    return result


def test_gptq_output_error_is_below_rtn_on_every_layer_of_a_real_block(smollm):
    from studio.core.calibration import CalibrationData, CalibrationSettings, layerwise, load_calibration_tokens
    from studio.methods.gptq import GPTQParams, gptq_quantize
    from studio.methods.grid import quantize_rtn

    settings = CalibrationSettings(text_file=str(C4), samples=4, seq_len=256)
    data = CalibrationData(load_calibration_tokens(smollm.tokenizer, settings), 4)
    block = next(layerwise(smollm.model, data, target_layers(smollm.model, TargetSpec(("*.layers.3.*",)))))
    inputs = {}
    block.forward(lambda name, x, _y: inputs.setdefault(name, []).append(x))
    for name, module in block.layers.items():
        x = torch.cat(inputs[name])
        w = weight_matrix(module)
        gptq = gptq_quantize(w, 2 * x.T @ x / len(x), GPTQParams(bits=3, group_size=64, symmetric=False)).weight
        rtn = quantize_rtn(w, 3, 64, False).dequantize()
        error = {k: float((x @ (w - v).T).norm() / (x @ w.T).norm()) for k, v in (("gptq", gptq), ("rtn", rtn))}
        assert error["gptq"] < 0.8 * error["rtn"], (name, error)


@pytest.mark.parametrize("method,params,removed", [
    ("structured", {"mlp_ratio": 0.2}, None),
    ("layer_drop", {"blocks": 4}, 4 * 3_540_096),
])
def test_shrunk_models_export_and_reload_in_plain_transformers_with_the_same_perplexity(
        smollm, tokens, config, tmp_path, method, params, removed):
    result = calibrated(smollm, method, **params)
    before = sum(p.numel() for p in smollm.model.parameters())
    after = sum(p.numel() for p in result.model.parameters())
    ppl = perplexity(result.model, tokens, config, smollm.tokenizer).perplexity
    export_hf_folder(result.model, smollm.tokenizer, tmp_path / "out", recipe=None, report=result.report)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert sum(p.numel() for p in reloaded.parameters()) == after
    assert perplexity(reloaded, tokens, config, smollm.tokenizer).perplexity == pytest.approx(ppl, rel=1e-4)
    if method == "layer_drop":
        assert before - after == removed and reloaded.config.num_hidden_layers == 26
    else:
        assert reloaded.config.intermediate_size == 1229 and 0.11 < (before - after) / before < 0.13


def test_low_rank_at_a_fifth_fewer_parameters_orders_svd_llm_below_asvd_below_svd(smollm, tokens, config):
    """The 20% parameter cut of the decoder's Linear layers, each method at the same ranks (bench/README.md has
    the 16k-token numbers: 130.7, 233,868, 1.1e8)."""
    ppl = {}
    for method in ("svd_llm", "asvd", "svd"):
        result = calibrated(smollm, method, ratio=0.2) if method != "svd" else compress(smollm, method, ratio=0.2)
        assert result.report["steps"][0]["summary"]["parameter_reduction"] == pytest.approx(0.20, abs=0.01)
        ppl[method] = perplexity(result.model, tokens, config, smollm.tokenizer).perplexity
    assert ppl["svd_llm"] < ppl["asvd"] < ppl["svd"]
