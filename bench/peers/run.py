"""The studio against the libraries users would otherwise script: the same method on the same model, the same
calibration tokens and the same evaluation, side by side.

    python bench/peers/run.py [--only gptq,hqq] [--tools llm-compressor,hqq] [--tokens 16384] [--work DIR]
                              [--repeat 3] [--rerun [TOOLS]]

1. Converts SmolLM2-135M (../shared/models, GGUF) once to a dense float32 Hugging Face folder, and samples the
   calibration tokens once: 32 × 512 from ../shared/data/text/c4-en-sample.txt with the studio's sampler (seed 0,
   BOS first), saved as a tensor every worker reads (the studio's worker checks its own sampler gives the same).
2. Makes one virtual environment per peer (llm-compressor, hqq, optimum-quanto, torchao, and GPTQModel if it
   installs) with the same CPU torch pinned; a peer that does not install is recorded with pip's one-line error.
3. Runs every job in a fresh process (worker_<tool>.py), alone, with 2 torch threads: the compression is timed
   around the tool's own call (the studio's runner, llm-compressor's oneshot, quanto's quantize+freeze, …), peak
   RSS is the process's from start to end (loading the same float32 folder is part of both). Each worker writes the
   decoder blocks' parameters as the compressed model computes with them (dequantized, masked, smoothed), and which
   layers quantize their inputs at run time (W8A8).
4. Evaluates every result here, with ONE function (the studio's `perplexity`): WikiText-2 test, 16,384 tokens,
   window and stride 1024, BOS at each window; KL and top-1 agreement against the original on the first 4,096.
   W8A8 inputs are quantized by the same per-token function for both sides.
5. Prints and writes (WORK/peers.json, WORK/peers.md) the table with the studio / peer ratios.

Each job runs --repeat times (3), round by round over the jobs (each once, then each again), so that a spell of a
slower machine falls on every tool: seconds and peak RSS are the medians, and every run must give the same weights.
Results are kept per job in WORK/jobs; a second run does only what is missing (--rerun redoes all, or one tool's).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SHARED = Path(os.environ.get("STUDIO_SHARED_DIR") or REPO.parent / "shared")
GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKITEXT = SHARED / "data" / "text" / "wikitext-2-raw-test.txt"
C4 = SHARED / "data" / "text" / "c4-en-sample.txt"
TORCH = "torch==2.13.0"
KL_TOKENS = 4096
MiB = 2**20

TRANSFORMERS = ["transformers==5.24.0", "safetensors"]  # the studio's; llm-compressor pins its own
PEERS = {  # tool -> pip requirements and worker; versions pinned so that a rerun measures the same thing
    "llm-compressor": (["llmcompressor==0.14.0.1"], "worker_llmcompressor.py"),
    "hqq": (["hqq==0.2.8.post1", *TRANSFORMERS], "worker_hqq.py"),
    "optimum-quanto": (["optimum-quanto==0.2.7", *TRANSFORMERS], "worker_quanto.py"),
    "torchao": (["torchao==0.18.0", *TRANSFORMERS], "worker_torchao.py"),
    "GPTQModel": (["gptqmodel==7.7.0"], None),  # installed if it can be; no worker: it needs a GPU for its kernels
}


@dataclass(frozen=True)
class Side:
    tool: str
    method: str
    params: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        settings = "_".join(f"{k}{v}" for k, v in sorted(self.params.items()))
        return f"{self.tool}-{self.method}-{settings}".replace(":", "of").replace(" ", "")


@dataclass(frozen=True)
class Pair:
    method: str
    settings: str
    studio: Side
    peer: Side


def _w(bits: int, group: int, symmetric: bool) -> dict:
    return {"bits": bits, "group_size": group, "symmetric": symmetric}


def _studio(method: str, **params) -> Side:
    return Side("studio", method, params)


PAIRS = [
    Pair("RTN", "W4 g64 asym", _studio("rtn", **_w(4, 64, False)), Side("llm-compressor", "rtn", _w(4, 64, False))),
    Pair("RTN", "W3 g64 asym", _studio("rtn", **_w(3, 64, False)), Side("llm-compressor", "rtn", _w(3, 64, False))),
    Pair("GPTQ", "W4 g64 asym", _studio("gptq", **_w(4, 64, False)), Side("llm-compressor", "gptq", _w(4, 64, False))),
    Pair("GPTQ", "W3 g64 asym", _studio("gptq", **_w(3, 64, False)), Side("llm-compressor", "gptq", _w(3, 64, False))),
    Pair("AWQ", "W4 g64 asym", _studio("awq", **_w(4, 64, False)), Side("llm-compressor", "awq", _w(4, 64, False))),
    Pair("SmoothQuant", "W8A8, α 0.5", _studio("smoothquant", alpha=0.5),
         Side("llm-compressor", "smoothquant", {"alpha": 0.5})),
    Pair("SparseGPT", "50%", _studio("sparsegpt", sparsity=0.5),
         Side("llm-compressor", "sparsegpt", {"sparsity": 0.5})),
    Pair("SparseGPT", "2:4", _studio("sparsegpt", sparsity=0.5, pattern="2:4"),
         Side("llm-compressor", "sparsegpt", {"sparsity": 0.5, "pattern": "2:4"})),
    Pair("Wanda", "50%", _studio("wanda", sparsity=0.5), Side("llm-compressor", "wanda", {"sparsity": 0.5})),
    Pair("Wanda", "2:4", _studio("wanda", sparsity=0.5, pattern="2:4"),
         Side("llm-compressor", "wanda", {"sparsity": 0.5, "pattern": "2:4"})),
    # hqq's BaseQuantizeConfig sets round_zero for 4 bits; its zero point is still stored as a float per group,
    # like the studio's default (the studio's zero_point="integer" is a coarser format: 30.52 here)
    Pair("HQQ", "4-bit g64", _studio("hqq", bits=4, group_size=64), Side("hqq", "hqq", {"bits": 4, "group_size": 64})),
    Pair("HQQ", "3-bit g64", _studio("hqq", bits=3, group_size=64), Side("hqq", "hqq", {"bits": 3, "group_size": 64})),
    # quanto's qint4 is affine in groups of 128 of the flattened weight (576 columns: groups straddle rows); the
    # studio's groups stay within a row and must divide 576, so its nearest is 64 (4.31 against 4.25 bits/weight).
    # qint8 and torchao's int8 weight-only are symmetric per channel.
    Pair("int4 weight-only", "asym; quanto g128 (flattened), studio g64", _studio("rtn", **_w(4, 64, False)),
         Side("optimum-quanto", "qint4", {"bits": 4})),
    Pair("int8 weight-only", "per channel, sym", _studio("rtn", **_w(8, 0, True)),
         Side("optimum-quanto", "qint8", {"bits": 8})),
    Pair("int8 weight-only", "per channel, sym", _studio("rtn", **_w(8, 0, True)), Side("torchao", "int8wo")),
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- 1. model and calibration tokens
def prepare(work: Path) -> tuple[Path, Path, dict]:
    import torch

    from studio.core.calibration import CalibrationSettings, load_calibration_tokens
    from studio.core.loading import load_model

    folder, calibration = work / "smollm2-135m-fp32", work / "calibration.pt"
    settings = CalibrationSettings(text_file=str(C4), samples=32, seq_len=512, seed=0, batch_size=8)
    if not (folder / "config.json").exists():
        log(f"converting {GGUF.name} to a dense float32 folder")
        loaded = load_model(GGUF)
        partial = folder.with_name(folder.name + ".partial")
        loaded.model.save_pretrained(partial)
        loaded.tokenizer.save_pretrained(partial)
        partial.rename(folder)
    if not calibration.exists():
        loaded = load_model(folder)
        torch.save(load_calibration_tokens(loaded.tokenizer, settings), calibration)
    return folder, calibration, settings.model_dump()


# ---------------------------------------------------------------- 2. the peers' environments
def python_of(tool: str, work: Path) -> Path:
    return Path(sys.executable) if tool == "studio" else work / "venvs" / tool / "bin" / "python"


def one_line_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    conflicts = [line for line in lines if " depends on " in line]
    if conflicts:  # pip's ResolutionImpossible: the requirement that cannot be met says more than the summary
        return f"ResolutionImpossible: {conflicts[-1]}"[:300]
    errors = [line for line in lines if line.startswith("ERROR") or "error" in line.lower()]
    return (errors or lines or ["(no output)"])[-1][:300]


def install(tool: str, work: Path, reinstall: bool = False) -> str | None:
    """None when the tool's environment is ready; else pip's one-line error (kept: --reinstall tries again)."""
    venv = work / "venvs" / tool
    ready, failed = venv / "ready", venv / "failed"
    if ready.exists():
        return None
    if failed.exists() and not reinstall:
        return failed.read_text()
    requirements = PEERS[tool][0]
    constraints = work / "venvs" / "constraints.txt"
    constraints.parent.mkdir(parents=True, exist_ok=True)
    constraints.write_text(f"{TORCH}\n")
    log(f"installing {' '.join(requirements)} with {TORCH} in {venv}")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]  # not --quiet: it hides the conflict
    for args in ([TORCH], [*requirements, "-c", str(constraints)]):
        done = subprocess.run(pip + args, capture_output=True, text=True)
        if done.returncode != 0:
            failed.write_text(one_line_error(done.stdout + done.stderr))
            return failed.read_text()
    ready.write_text(" ".join(requirements))
    return None


# ---------------------------------------------------------------- 3. the jobs
def earlier_result(side: Side, work: Path) -> dict | None:
    """What the job's last complete run left in its folder (result.json), if anything."""
    done = work / "jobs" / side.key / "result.json"
    return json.loads(done.read_text()) if done.exists() else None


def run_once(side: Side, work: Path, folder: Path, calibration: Path, settings: dict, label: str) -> dict:
    """One run of the job in a fresh process: the worker's result.json (seconds, peak RSS, versions, …) with the
    digest of the weights it wrote, or {"error": one line}."""
    out = work / "jobs" / side.key
    worker = HERE / ("worker_studio.py" if side.tool == "studio" else PEERS[side.tool][1])
    job = {"tool": side.tool, "method": side.method, "params": side.params, "model": str(folder),
           "calibration": str(calibration), "calibration_settings": settings, "out": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.json").write_text(json.dumps(job, indent=2))
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           # PyTorch's 2 MiB pages for tensors of 2 MiB or more, which the studio turns on for itself (studio/__init__):
           # every tool runs with the same allocator, so the table compares the tools, not the setting
           "THP_MEM_ALLOC_ENABLE": "1"}
    log(f"{side.tool}: {side.method} {side.params}{label}")
    (out / "result.json").unlink(missing_ok=True)
    done = subprocess.run([str(python_of(side.tool, work)), str(worker), str(out / "job.json")], env=env,
                          capture_output=True, text=True)
    (out / "worker.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"error": one_line_error(done.stderr)}
    result = json.loads((out / "result.json").read_text())
    return {**result, "weights_sha256": file_digest(out / "weights.safetensors")}


def run_jobs(sides: list[Side], work: Path, folder: Path, calibration: Path, settings: dict,
             repeat: int) -> dict[str, dict]:
    """Every job `repeat` times, round by round (each job once, then each again): a machine that is slower for a
    while slows every tool's runs alike, not one tool's. Seconds and peak RSS are the medians; every run of a job
    must give the same weights (the evaluation scores them once), and the last run's are in its folder."""
    runs: dict[str, list[dict]] = {side.key: [] for side in sides}
    failed: dict[str, dict] = {}
    for attempt in range(repeat):
        for side in sides:
            if side.key not in failed:
                label = f" (run {attempt + 1} of {repeat})" if repeat > 1 else ""
                result = run_once(side, work, folder, calibration, settings, label)
                if "error" in result:
                    failed[side.key] = result
                else:
                    runs[side.key].append(result)
    results = {}
    for side in sides:
        if side.key in failed:
            results[side.key] = failed[side.key]
            continue
        done = runs[side.key]
        result = {k: v for k, v in done[-1].items() if k not in ("seconds", "peak_rss_bytes", "weights_sha256")}
        if len({r["weights_sha256"] for r in done}) > 1:
            result["warning"] = "the runs gave different weights; the last one's were evaluated"
        result.update(seconds=statistics.median(r["seconds"] for r in done),
                      peak_rss_bytes=statistics.median(r["peak_rss_bytes"] for r in done),
                      weights_sha256=done[-1]["weights_sha256"],
                      runs=[{k: r[k] for k in ("seconds", "peak_rss_bytes", "weights_sha256")} for r in done])
        (work / "jobs" / side.key / "result.json").write_text(json.dumps(result, indent=2))
        results[side.key] = result
    return results


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---------------------------------------------------------------- 4. one evaluation for everything
class Evaluator:
    def __init__(self, folder: Path, tokens: int, original_perplexity: float | None = None):
        from studio.core.evaluation.perplexity import PerplexityConfig, load_eval_tokens
        from studio.core.loading import load_model

        self.loaded = load_model(folder)
        self.original = self.loaded.model
        self.config = PerplexityConfig(str(WIKITEXT), max_tokens=tokens, window=1024, stride=1024)
        self.tokens = load_eval_tokens(self.loaded.tokenizer, self.config)
        self.original_perplexity = original_perplexity or self._perplexity(self.original).perplexity

    def _perplexity(self, model, reference=None, tokens=None):
        from studio.core.evaluation.perplexity import perplexity

        return perplexity(model, self.tokens if tokens is None else tokens, self.config, self.loaded.tokenizer,
                          reference=reference)

    def evaluate(self, result_folder: Path, result: dict) -> dict:
        import torch
        from safetensors.torch import load_file

        from studio.methods.activation_quant import quantize_inputs

        model = copy.deepcopy(self.original)
        tensors = load_file(str(result_folder / "weights.safetensors"))
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if unexpected:
            raise RuntimeError(f"{result_folder}: weights the model does not have: {unexpected[:3]}")
        spec = result.get("input_quant")
        for name in (spec or {}).get("layers", []):
            quantize_inputs(model.get_submodule(name), spec["bits"])
        with torch.no_grad():
            linear = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
            zeros = sum(int((w == 0).sum()) for w in linear) / sum(w.numel() for w in linear)
        quality = self._perplexity(model)
        agreement = self._perplexity(model, reference=self.original, tokens=self.tokens[:KL_TOKENS])
        return {"perplexity": quality.perplexity, "kl": agreement.kl, "top1": agreement.top1_agreement,
                "zero_fraction": zeros}


# ---------------------------------------------------------------- 5. the table
def ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    return f"{a / b:.{digits}f}" if a is not None and b else "–"


def fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def table(pairs: list[Pair], rows: dict[str, dict], failures: dict[str, str], original: float) -> str:
    header = ("| method | settings | tool | perplexity | KL | seconds | peak RSS MiB | runs | ppl studio/peer | "
              "time studio/peer | RSS studio/peer |")
    lines = [f"Original (float32): perplexity {original:.3f}. Seconds and peak RSS: medians of the runs.", "",
             header, "|" + "---|" * 11]
    for pair in pairs:
        studio, peer = rows.get(pair.studio.key, {}), rows.get(pair.peer.key, {})
        peer_note = failures.get(pair.peer.tool) or peer.get("error")

        def row(tool: str, r: dict, ratios: str = "| | | |") -> str:
            rss, seconds = r.get("peak_rss_bytes"), r.get("seconds")
            places = 2 if seconds is not None and seconds < 10 else 1  # the sub-second jobs need the second place
            return (f"| {pair.method} | {pair.settings} | {tool} | {fmt(r.get('perplexity'), 3)} | "
                    f"{fmt(r.get('kl'), 4)} | {fmt(seconds, places)} | {fmt(rss and rss / MiB, 0)} | "
                    f"{len(r.get('runs', [None])) if r else ''} {ratios}")

        lines.append(row("studio", studio))
        if peer_note:
            lines.append(f"| {pair.method} | {pair.settings} | {pair.peer.tool} | failed: {peer_note} | | | | | | | |")
            continue
        ratios = (f"| {ratio(studio.get('perplexity'), peer.get('perplexity'), 3)} | "
                  f"{ratio(studio.get('seconds'), peer.get('seconds'))} | "
                  f"{ratio(studio.get('peak_rss_bytes'), peer.get('peak_rss_bytes'))} |")
        lines.append(row(pair.peer.tool, peer, ratios))
    for tool, error in sorted(failures.items()):
        lines.append(f"\n{tool} did not install here: `{error}`")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated methods, each optionally with words of its settings after a "
                                       "colon (gptq:w3) (rtn, gptq, awq, smoothquant, sparsegpt, wanda, hqq, "
                                       "int4, int8)")
    parser.add_argument("--tools", help="comma-separated peers (default: all)")
    parser.add_argument("--tokens", type=int, default=16384, help="WikiText-2 tokens for perplexity (16384)")
    parser.add_argument("--work", type=Path, help="working folder (default: the studio's cache/peers)")
    parser.add_argument("--rerun", nargs="?", const="all", metavar="TOOLS",
                        help="run the jobs again: all, or those of the comma-separated tools (e.g. studio)")
    parser.add_argument("--repeat", type=int, default=3, metavar="N",
                        help="runs of each job; seconds and peak RSS are their medians (3)")
    parser.add_argument("--reinstall", action="store_true", help="try again to install the peers that failed")
    args = parser.parse_args(argv)

    from studio.core.paths import cache_dir

    work = (args.work or cache_dir() / "peers").resolve()
    work.mkdir(parents=True, exist_ok=True)
    only = {m.strip().lower() for m in args.only.split(",")} if args.only else None
    tools = {t.strip() for t in args.tools.split(",")} if args.tools else set(PEERS)
    pairs = [p for p in PAIRS if p.peer.tool in tools
             and (only is None or any(p.method.lower().startswith(method) and words in p.settings.lower()
                                      for method, _, words in (m.partition(":") for m in only)))]

    folder, calibration, settings = prepare(work)
    failures = {tool: error for tool in sorted(tools) if (error := install(tool, work, args.reinstall))}
    for tool, error in failures.items():
        log(f"{tool} did not install: {error}")

    results_file = work / "peers.json"
    rerun = set(PEERS) | {"studio"} if args.rerun == "all" else {t.strip() for t in (args.rerun or "").split(",") if t}
    saved = json.loads(results_file.read_text()) if results_file.exists() else {}  # the rows --only leaves out stay
    log(f"evaluating the original on {args.tokens} tokens")
    evaluator = Evaluator(folder, args.tokens, saved.get("original_perplexity")
                          if saved.get("tokens") == args.tokens and args.rerun != "all" else None)
    rows: dict[str, dict] = saved.get("rows", {})
    sides = {side.key: side for pair in pairs for side in (pair.studio, pair.peer) if side.tool not in failures}
    def enough(result: dict | None) -> bool:
        return bool(result) and len(result.get("runs", [None])) >= args.repeat

    finished, to_run = {}, []
    for key, side in sides.items():
        if side.tool not in rerun and enough(rows.get(key)) and "perplexity" in rows[key]:
            continue
        if side.tool not in rerun and enough(earlier := earlier_result(side, work)):
            finished[key] = earlier  # run before, not yet evaluated
        else:
            to_run.append(side)
    finished.update(run_jobs(to_run, work, folder, calibration, settings, args.repeat))
    for key, result in finished.items():
        side, old = sides[key], rows.get(key, {})
        same_weights = old.get("weights_sha256") == result.get("weights_sha256", "-")
        if "error" not in result and "perplexity" in old and same_weights:
            result.update({k: old[k] for k in ("perplexity", "kl", "top1", "zero_fraction")})  # the same weights
        elif "error" not in result:
            result.update(evaluator.evaluate(work / "jobs" / key, result))
            log(f"  {key}: perplexity {result['perplexity']:.3f}, KL {result['kl']:.4f}, {result['seconds']:.1f} s, "
                f"peak RSS {result['peak_rss_bytes'] / MiB:,.0f} MiB")
        else:
            log(f"  {key} failed: {result['error']}")
        rows[key] = {"tool": side.tool, "method": side.method, "params": side.params, **result}
        results_file.write_text(json.dumps({"original_perplexity": evaluator.original_perplexity,
                                            "tokens": args.tokens, "install_failures": failures, "rows": rows},
                                           indent=2, default=str))
    text = table(pairs, rows, failures, evaluator.original_perplexity)
    (work / "peers.md").write_text(text + "\n")
    print(text)
    print(f"\nwritten: {results_file}, {work / 'peers.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
