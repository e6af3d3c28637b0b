"""llm-compressor's side: its modifiers through `oneshot`, on the benchmark's calibration tokens (a DataLoader of the
same 32 × 512 samples), then every quantized Linear's weight fake-quantized with compressed-tensors' own function
(GPTQ and AWQ already leave their weights on the grid; the quantization modifier keeps the float weight and its
scales). The time and peak RSS cover both: the studio's cover rounding the weights too."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def weight_scheme(params: dict) -> dict:
    return {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": params["bits"], "type": "int", "symmetric": params.get("symmetric", False),
        "strategy": "group" if params.get("group_size") else "channel",
        **({"group_size": params["group_size"]} if params.get("group_size") else {})}}}


def modifiers(method: str, params: dict) -> list:
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    ignore = ["lm_head"]
    mask = params.get("pattern", "0:0").replace("unstructured", "0:0")
    if method == "rtn":
        return [QuantizationModifier(config_groups=weight_scheme(params), ignore=ignore)]
    if method == "gptq":
        return [GPTQModifier(config_groups=weight_scheme(params), ignore=ignore)]
    if method == "awq":
        return [AWQModifier(), QuantizationModifier(config_groups=weight_scheme(params), ignore=ignore)]
    if method == "smoothquant":
        return [SmoothQuantModifier(smoothing_strength=params["alpha"]),
                QuantizationModifier(scheme="W8A8", targets=["Linear"], ignore=ignore)]
    if method == "sparsegpt":
        return [SparseGPTModifier(sparsity=params["sparsity"], mask_structure=mask, ignore=ignore)]
    if method == "wanda":
        return [WandaPruningModifier(sparsity=params["sparsity"], mask_structure=mask, ignore=ignore)]
    raise SystemExit(f"llm-compressor: no recipe for {method}")


def fake_quantize_weights(model) -> dict | None:
    """Every quantized Linear's weight replaced, in place, by its fake-quantized value (compressed-tensors' own
    function); returns which layers quantize their inputs at run time."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    inputs, bits = [], 8
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if not isinstance(module, torch.nn.Linear) or scheme is None:
            continue
        if scheme.weights is not None:
            zero_point = getattr(module, "weight_zero_point", None)
            if getattr(module, "weight_g_idx", None) is not None:  # GPTQ's default "static" order has none
                raise SystemExit(f"{name}: activation-ordered groups (g_idx) are not evaluated")
            with torch.no_grad():
                module.weight.data.copy_(fake_quantize(module.weight.data, module.weight_scale.data,
                                                       None if zero_point is None else zero_point.data,
                                                       scheme.weights))
        if scheme.input_activations is not None:
            strategy = scheme.input_activations.strategy
            if not scheme.input_activations.dynamic or getattr(strategy, "value", strategy) != "token":
                raise SystemExit(f"{name}: only dynamic per-token activation quantization is evaluated")
            inputs.append(name)
            bits = scheme.input_activations.num_bits
    return {"layers": sorted(inputs), "bits": bits} if inputs else None


def main() -> None:
    job = common.read_job()
    import torch
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader

    model = common.load_dense_model(job)
    tokens = common.calibration_tokens(job)
    samples = [{"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]} for row in tokens]
    loader = DataLoader(samples, batch_size=None)
    result: dict = {"versions": common.versions("llmcompressor", "compressed-tensors")}
    if job["method"] == "awq":
        # llm-compressor 0.14's AWQ pins its cached activations unconditionally, which raises "Cannot access
        # accelerator device when none is available" on a CPU-only machine. Pinning only speeds copies to a GPU,
        # so it is skipped here.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
        result["workaround"] = "IntermediatesCache.pin_memory skipped (fails without an accelerator)"
    with common.stopwatch(result):
        begin = time.perf_counter()
        oneshot(model=model, recipe=modifiers(job["method"], job["params"]), dataset=loader,
                num_calibration_samples=len(samples), max_seq_length=tokens.shape[1])
        result["oneshot_seconds"] = time.perf_counter() - begin
        # oneshot leaves RTN's weights in float with their scales (they are rounded when the model is saved or
        # run); the studio's time includes rounding them, so this one does too
        result["input_quant"] = fake_quantize_weights(model)
    common.write_result(job, common.layer_tensors(model), result)


if __name__ == "__main__":
    main()
