import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_model
from studio.core.errors import ExportError
from studio.core.export import export_hf_folder
from studio.core.loading import LoadedModel
from studio.core.recipe import parse_recipe
from studio.core.runner import run_recipe

RECIPE = parse_recipe({"schema_version": 1, "steps": [{"method": "rtn", "params": {"bits": 4, "group_size": 32}}]})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_reloads_with_plain_transformers(tmp_path, tokenizer, arch):
    result = run_recipe(RECIPE, LoadedModel(tiny_model(arch), tokenizer, {}))
    out = export_hf_folder(result.model, tokenizer, tmp_path / "out", recipe=RECIPE, report=result.report)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "recipe.yaml", "report.json", "tokenizer.json"} <= names
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.arange(12)[None]
    assert torch.allclose(reloaded(ids).logits, result.model(ids).logits, atol=1e-5)
    report = json.loads((out / "report.json").read_text())
    assert report["steps"][0]["method"] == "rtn" and report["export"]["size"]["disk_bytes"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_existing_destination_is_not_overwritten_without_force(tmp_path, tokenizer):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's file")
    with pytest.raises(ExportError, match="already exists.*--force"):
        export_hf_folder(tiny_model(), tokenizer, out)
    assert (out / "mine.txt").read_text() == "the user's file"
    export_hf_folder(tiny_model(), tokenizer, out, force=True)
    assert (out / "config.json").exists() and not (out / "mine.txt").exists()


def test_destination_that_is_a_file(tmp_path):
    target = tmp_path / "model"
    target.write_text("x")
    with pytest.raises(ExportError, match="existing file"):
        export_hf_folder(tiny_model(), None, target, force=True)


def test_failure_leaves_nothing_half_written_and_keeps_the_old_folder(tmp_path, tokenizer, monkeypatch):
    out = tmp_path / "out"
    export_hf_folder(tiny_model(), tokenizer, out)
    before = sorted(p.name for p in out.iterdir())
    model = tiny_model()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken_save)
    with pytest.raises(ExportError, match="disk full"):
        export_hf_folder(model, tokenizer, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(ExportError):
        export_hf_folder(model, tokenizer, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_cancelled_export_leaves_nothing_and_keeps_an_existing_folder(tmp_path, tokenizer):
    from studio.core.errors import Cancelled
    from studio.core.events import CancelToken
    from studio.core.export import export_model

    out = tmp_path / "out"
    export_hf_folder(tiny_model(), tokenizer, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    token = CancelToken()
    token.cancel()
    for fmt, dest in [("hf-safetensors", out), ("hf-safetensors", tmp_path / "new"), ("gguf", tmp_path / "m.gguf")]:
        with pytest.raises(Cancelled):
            export_model(tiny_model(), tokenizer, dest, format=fmt, force=True, cancel=token)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_dense_folder_keeps_the_codes_and_masks_for_a_later_export(tmp_path, tokenizer):
    from studio.core.loading import load_model
    from studio.core.state import compression_state
    from studio.methods.activation_quant import input_quantization

    recipe = parse_recipe({"schema_version": 2, "steps": [
        {"method": "magnitude", "params": {"sparsity": 0.5, "pattern": "2:4"}},
        {"method": "rtn", "params": {"bits": 3, "group_size": 32, "symmetric": False},
         "targets": {"include": ["*.mlp.*"]}},
        {"method": "rtn", "params": {"bits": 8, "group_size": 0}, "targets": {"include": ["*.self_attn.*"]}}]})
    result = run_recipe(recipe, LoadedModel(tiny_model(), tokenizer, {}))
    out = export_hf_folder(result.model, tokenizer, tmp_path / "out", recipe=recipe, report=result.report)
    assert (out / "studio_state.safetensors").is_file()
    reloaded = load_model(str(out))
    saved, restored = compression_state(result.model), compression_state(reloaded.model)
    assert saved.keys() == restored.keys() and len(saved) == 3 * 7
    for name, record in saved.items():
        again = restored[name]
        assert torch.equal(record.quant.codes, again.quant.codes)
        assert (record.quant.bits, record.quant.group_size, record.quant.symmetric) == \
            (again.quant.bits, again.quant.group_size, again.quant.symmetric)
        assert torch.equal(record.mask, again.mask) and again.sparsity_pattern == "2:4"
    assert input_quantization(reloaded.model) == {}

    # weights edited after the export: their codes no longer describe them and are dropped, with a warning
    from safetensors.torch import load_file, save_file

    weights = load_file(str(out / "model.safetensors"))
    weights["model.layers.0.mlp.up_proj.weight"] += 0.5
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    edited = compression_state(load_model(str(out)).model)
    assert "model.layers.0.mlp.up_proj" not in edited and len(edited) == 3 * 7 - 1


def test_state_files_from_before_bit_packing_still_load_and_damaged_codes_are_dropped(tmp_path, tokenizer, caplog):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from studio.core.loading import load_model
    from studio.core.state import compression_state

    recipe = parse_recipe({"schema_version": 2, "steps": [
        {"method": "rtn", "params": {"bits": 3, "group_size": 32, "symmetric": False}}]})
    result = run_recipe(recipe, LoadedModel(tiny_model(), tokenizer, {}))
    out = export_hf_folder(result.model, tokenizer, tmp_path / "out", recipe=recipe, report=result.report)
    state_file = out / "studio_state.safetensors"
    with safe_open(str(state_file), framework="pt") as f:
        meta, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    layers = json.loads(meta["layers"])
    old = dict(tensors)
    for name, info in layers.items():  # the earlier layout: 3-bit codes two to a byte, no `packing` key
        codes = compression_state(result.model)[name].quant.codes.reshape(-1)
        old[f"{name}.codes"] = codes[0::2] | (codes[1::2] << 4)
    old_layers = {name: {k: v for k, v in info.items() if k != "packing"} for name, info in layers.items()}
    save_file(old, str(state_file), metadata={**meta, "layers": json.dumps(old_layers)})
    restored = compression_state(load_model(str(out)).model)
    assert restored.keys() == compression_state(result.model).keys()
    for name, record in compression_state(result.model).items():
        assert torch.equal(restored[name].quant.codes, record.quant.codes)

    damaged = dict(tensors)
    damaged["model.layers.0.mlp.up_proj.codes"] = tensors["model.layers.0.mlp.up_proj.codes"][:-3]
    save_file(damaged, str(state_file), metadata=meta)
    reloaded = load_model(str(out))
    assert "model.layers.0.mlp.up_proj" not in compression_state(reloaded.model)
    assert len(compression_state(reloaded.model)) == len(layers) - 1
    assert "the codes of model.layers.0.mlp.up_proj are damaged" in caplog.text


def test_a_failing_gguf_export_never_touches_an_existing_file(tmp_path, tokenizer, monkeypatch):
    import studio.core.export.gguf_file as gguf_file
    from studio.core.export import export_model

    mine = tmp_path / "model.gguf"
    mine.write_bytes(b"the user's file")
    with pytest.raises(ExportError, match="already exists.*--force"):
        export_model(tiny_model(), tokenizer, mine, format="gguf")

    def failing_writer(model, tokenizer, folder, provenance, cancel, **options):
        (folder / "model.gguf").write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(gguf_file, "write_gguf", failing_writer)
    with pytest.raises(ExportError, match="No space left"):
        export_model(tiny_model(), tokenizer, mine, format="gguf", force=True)
    assert mine.read_bytes() == b"the user's file" and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_a_structurally_pruned_llama_in_gguf_is_verified_by_llama_cpp_not_by_transformers(tmp_path, tokenizer,
                                                                                        text_file):
    from studio.core.evaluation.perplexity import PerplexityConfig
    from studio.core.export import export_model
    from studio.core.export.gguf_check import llama_cpp_available

    recipe = parse_recipe({"schema_version": 2, "steps": [{"method": "structured", "params": {"mlp_ratio": 0.25}}],
                           "calibration": {"text_file": str(text_file), "samples": 4, "seq_len": 16}})
    result = run_recipe(recipe, LoadedModel(tiny_model(), tokenizer, {}))
    assert result.status == "finished", result.error
    verify = PerplexityConfig(str(text_file), max_tokens=120, window=64, stride=64)
    if not llama_cpp_available():  # then nothing here can load the file back faithfully, and the export says so
        with pytest.raises(ExportError, match="No consumer library.*drops"):
            export_model(result.model, tokenizer, tmp_path / "m.gguf", format="gguf", options={"type": "F32"},
                         verify=verify)
        assert not (tmp_path / "m.gguf").exists()
        return
    written = export_model(result.model, tokenizer, tmp_path / "m.gguf", format="gguf", options={"type": "F32"},
                           verify=verify)
    checked = written.export["verification"]
    assert "bias tensors" in checked["not_checked"]["transformers (GGUF loader)"]
    assert abs(checked["reloaded"]["llama.cpp (llama-cpp-python)"]["relative_difference"]) < 0.005
