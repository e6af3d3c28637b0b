"""What every worker of the peers benchmark shares, the studio's and the peers': read the job, load the dense
model and the calibration tokens, time the compression, and write the compressed model's decoder Linear weights
as dense tensors (quantized-then-dequantized, or masked) for the one evaluation in run.py.

Only the standard library, torch, transformers and safetensors: every peer's virtual environment has them.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator

THREADS = 2  # every job runs alone with the same torch thread count


def read_job() -> dict[str, Any]:
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {Path(sys.argv[0]).name} JOB.json")
    job = json.loads(Path(sys.argv[1]).read_text())
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    return job


def load_dense_model(job: dict[str, Any]):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype="float32")
    return model.eval()


def calibration_tokens(job: dict[str, Any]):
    import torch

    return torch.load(job["calibration"])  # (32, 512) int64, made once by run.py with the studio's sampler


@contextmanager
def stopwatch(result: dict[str, Any]) -> Iterator[None]:
    """Seconds of the compression, and the peak RSS from the process's start to the compression's end (not
    while the benchmark writes the result: serializing the weights holds a copy of them)."""
    begin = time.perf_counter()
    yield
    result["seconds"] = time.perf_counter() - begin
    result["peak_rss_bytes"] = peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries the parent's peak
    across fork and exec into it, so a worker started by a large parent would report the parent's size."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, bytes on macOS


def versions(*distributions: str) -> dict[str, str]:
    found = {}
    for name in ("torch", "transformers", *distributions):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def decoder_linear_names(model) -> list[str]:
    import torch

    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"]


def layer_tensors(model, linear_weights: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every parameter of the decoder blocks (Linear weights, norms: smoothing and AWQ change the norms too), with
    `linear_weights` (module name -> dense weight) replacing a Linear's stored weight where the tool keeps its
    own quantized form."""
    linear_weights = linear_weights or {}
    tensors = {}
    for name, parameter in model.named_parameters():
        if ".layers." not in f".{name}":
            continue
        module_name, leaf = name.rsplit(".", 1)
        if leaf not in ("weight", "bias"):  # a tool's own scales and zero points
            continue
        tensors[name] = linear_weights[module_name] if leaf == "weight" and module_name in linear_weights \
            else parameter.detach()
    return tensors


def write_result(job: dict[str, Any], tensors: dict[str, Any], result: dict[str, Any]) -> None:
    """`tensors`: the decoder blocks' parameters as the compressed model computes with them (dense)."""
    from safetensors.torch import save_file

    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: t.detach().float().contiguous() for name, t in tensors.items()}, str(out / "weights.safetensors"))
    result.setdefault("peak_rss_bytes", peak_rss_bytes())
    result.setdefault("input_quant", None)
    (out / "result.json").write_text(json.dumps(result, indent=2))
