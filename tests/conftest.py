"""Fixtures: tiny random models built from configs in milliseconds, a tiny tokenizer, and the shared real
model and data (read by path from ../shared or $STUDIO_SHARED_DIR; CI always has them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STUDIO_SHARED_DIR", REPO.parent / "shared"))
SMOLLM = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKITEXT = SHARED / "data" / "text" / "wikitext-2-raw-test.txt"
TASKS = SHARED / "data" / "tasks"

VOCAB = 320
TEXT = (
    "The quick brown fox jumps over the lazy dog. Compression makes models smaller and faster.\n"
    "A language model predicts the next token from the ones before it.\n"
) * 4


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests never write to the user's cache or data (run history); the dense GGUF cache of the real model is
    shared across tests."""
    os.environ.setdefault("STUDIO_CACHE_DIR", str(tmp_path_factory.mktemp("studio-cache")))
    os.environ["STUDIO_DATA_DIR"] = str(tmp_path_factory.mktemp("studio-data"))


@pytest.fixture(autouse=True)
def _automatic_garbage_collection():
    """The window turns Python's automatic collection off while workers run and collects on the GUI thread's
    timer (studio.gui.collector); the tests after a GUI test spin no event loop, so they get it back."""
    import gc

    yield
    gc.enable()


def tiny_config(kind: str):
    from transformers import GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common)
    if kind == "qwen2":
        return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, **common)
    if kind == "opt":
        return OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=64, **common)
    if kind == "gpt2":
        return GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=256, **common)
    if kind == "gemma3":  # sliding-window and full-attention layers get different masks and rotary tables
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                                sliding_window=8, layer_types=["sliding_attention", "sliding_attention",
                                                               "full_attention"], **common)
    raise ValueError(kind)


def tiny_model(kind: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), dtype=torch.float32)
    return model.eval().requires_grad_(False)


ARCHS = ["llama", "qwen2", "opt", "gpt2"]


def calibration_tokens(samples: int = 6, length: int = 24, seed: int = 0) -> torch.Tensor:
    """Random token ids standing in for calibration text on the tiny models."""
    return torch.randint(3, VOCAB, (samples, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences, with BOS/EOS/PAD, in a few milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text(TEXT * 3, encoding="utf-8")
    return path


@pytest.fixture
def tiny_folder(tmp_path, tokenizer):
    """A saved Hugging Face folder (safetensors, config, tokenizer) of a tiny Llama."""
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_loaded(tokenizer):
    from studio.core.loading import LoadedModel

    return LoadedModel(tiny_model("llama"), tokenizer, {"kind": "test", "name": "tiny-llama"})


def shared_file(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: the real-model tests read ../shared (or $STUDIO_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def smollm():
    """SmolLM2-135M loaded once per session (the first load converts the GGUF into the dense cache)."""
    from studio.core.loading import load_model

    return load_model(shared_file(SMOLLM))


@pytest.fixture(scope="session")
def wikitext() -> Path:
    return shared_file(WIKITEXT)


# --- the window, for the GUI tests ------------------------------------------------------------------------


@pytest.fixture
def settings_file(tmp_path):
    return tmp_path / "settings" / "studio.ini"


@pytest.fixture
def errors(monkeypatch):
    """Error dialogs are recorded instead of blocking the test."""
    from PySide6.QtWidgets import QMessageBox

    shown = []
    monkeypatch.setattr(QMessageBox, "critical", lambda parent, title, text, *a: shown.append((title, text)))
    return shown


@pytest.fixture
def window(qtbot, settings_file, errors):
    """The main window with its own settings file, shown offscreen."""
    from studio.gui.main_window import MainWindow

    win = MainWindow(settings_file)
    qtbot.addWidget(win)
    win.show()
    return win


def search_spec_data(text_file, **changes) -> dict:
    """A recipe search small enough for a test on the tiny Llama (tests/test_search.py, tests/test_gui_search.py)."""
    data = {
        "name": "tiny",
        "budget": {"kind": "bits_per_weight", "value": 4.0},
        "objective": "kl",  # a random model's perplexity is flat; its KL to the original is not
        "trials": 6,
        "batch_size": 2,
        "seed": 3,
        "space": {"quantization": {"group_sizes": [32, 64], "symmetric": [True, False], "budget_fraction": [0.6, 1.0]}},
        "calibration": {"text_file": str(text_file), "samples": 4, "seq_len": 32},
        "evaluation": {"text_file": str(text_file), "tokens": 256, "window": 64, "stride": 64},
    }
    data.update(changes)
    return data
