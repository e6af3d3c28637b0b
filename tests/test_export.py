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
