"""`studio`: the command line over the engine. With no command it opens the window.

Exit codes: 0 success, 2 bad input (a path, a recipe, a destination: the message says which), 1 an
unexpected internal error, 3 a run that failed while running, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from studio import __version__
from studio.cli.search import add_search_parser
from studio.core.errors import RecipeError, StudioError

GGUF_TYPE_CHOICES = ("auto", "F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")  # formats.GGUF_TYPES
EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_RUN_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps, or auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt checkpoints (they can run code)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model author's code (only if trusted)")
    p.add_argument("--no-cache", action="store_true", help="do not use or write the dense cache of GGUF files")


def _eval_options(p: argparse.ArgumentParser, text_flag: str) -> None:
    p.add_argument(text_flag, dest="text", metavar="FILE", help="text file for perplexity (and KL)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of the text to score; 0 for all (default 4096)")
    p.add_argument("--window", type=int, default=1024, help="tokens per window (default 1024)")
    p.add_argument("--stride", type=int, default=512, help="tokens the window moves by (default 512)")
    p.add_argument("--join", default="\n\n", help="string joining the non-empty lines of the text (default blank line)")
    p.add_argument("--bos", default="auto", choices=["auto", "always", "never"], help="BOS token at each window start")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio", description="Compression Studio: compress causal language models.")
    parser.add_argument("--version", action="version", version=f"compression-studio {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details and show tracebacks")
    parser.add_argument("--model", help="(window) a model to open at start, e.g. 'sample'")
    parser.add_argument("--info", action="store_true", help="print the versions of Qt, torch and transformers, and the device")
    parser.add_argument("--self-test", action="store_true",
                        help="open the window, run a one-step pipeline on a tiny model, export and reload it; exit 0 if all works")
    parser.add_argument("--report", metavar="FILE", help="with --self-test: write its JSON report here")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="what a model is: architecture, parameters, bytes by dtype, layers")
    p.add_argument("model", help="folder, .safetensors, .gguf, hub id, or 'sample'")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _model_options(p)

    p = sub.add_parser("methods", help="list the compression methods and their parameters")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("eval", help="evaluate a model: perplexity, zero-shot accuracy, size, speed")
    p.add_argument("model")
    _eval_options(p, "--text")
    p.add_argument("--tasks", nargs="+", default=[], metavar="FILE", help="zero-shot task files (jsonl)")
    p.add_argument("--limit", type=int, default=200, help="items per task file; 0 for all (default 200)")
    p.add_argument("--speed", action="store_true", help="also measure prefill and decode tokens/s")
    p.add_argument("--generate", action="store_true", help="also print greedy generations for fixed prompts")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _model_options(p)

    p = sub.add_parser("run", help="run a recipe on a model and export the result")
    p.add_argument("recipe", help="recipe YAML file, or the name of a preset (see 'studio presets')")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="folder to write the compressed model into")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    _eval_options(p, "--eval-text")
    _calibration_options(p)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    _model_options(p)

    p = sub.add_parser("export", help="export a model or a run's result as a Hugging Face folder, "
                       "compressed-tensors or GGUF")
    p.add_argument("model", metavar="MODEL_OR_RUN",
                   help="a model (folder, .safetensors, .gguf, hub id, 'sample'), a `studio run` output folder, "
                        "or run:ID from `studio history`")
    p.add_argument("--format", default="hf-safetensors", choices=["hf-safetensors", "compressed-tensors", "gguf"])
    p.add_argument("--out", help="folder to write (or FILE.gguf for a single GGUF file)")
    p.add_argument("--type", dest="gguf_type", default="auto", choices=list(GGUF_TYPE_CHOICES),
                   help="GGUF tensor type; auto keeps the studio's own codes where a GGUF block holds them")
    p.add_argument("--embedding-bits", type=int, choices=[8, 16], default=8,
                   help="compressed-tensors: store the token embedding int8 per row (8, default) or as it is (16)")
    p.add_argument("--keep-factors", action="store_true",
                   help="hf-safetensors: keep low-rank layers factored (only the studio loads it) instead of dense")
    p.add_argument("--advice", action="store_true", help="only say which formats fit the model and what they cost")
    p.add_argument("--force", action="store_true", help="replace --out if it exists (only once the new one is complete)")
    _eval_options(p, "--eval-text")
    p.add_argument("--json", action="store_true", help="print the export section of the report as JSON")
    _model_options(p)

    sub.add_parser("presets", help="list the bundled recipe presets")

    _model_options(add_search_parser(sub))

    p = sub.add_parser("history", help="list the runs recorded in the run history, newest first")
    p.add_argument("--filter", metavar="TEXT", help="only runs whose model, recipe, status or export path has TEXT")
    p.add_argument("--status", choices=["finished", "failed", "cancelled"], help="only runs that ended so")
    p.add_argument("--search", metavar="ID", help="only the candidates of this recipe search (`studio search` prints its id)")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    if args.info:
        print(json.dumps(_installation_info(), indent=2))
        return EXIT_OK
    if args.self_test:
        from studio.gui.self_test import run_self_test

        return run_self_test(args.report)
    if args.command is None:
        from studio.gui.app import run_app

        return run_app(args.model)
    try:
        return COMMANDS[args.command](args)
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.verbose:
            raise
        print(
            f"internal error: {type(exc).__name__}: {exc}\nThis is a bug in Compression Studio; run again with "
            "--verbose for the traceback and report it.",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _installation_info() -> dict:
    import platform

    import torch
    import transformers
    from PySide6 import __version__ as pyside_version
    from PySide6.QtCore import qVersion

    cuda = torch.cuda.is_available()
    return {"compression_studio": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "qt": qVersion(), "pyside6": pyside_version, "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "cuda": torch.version.cuda if cuda else None}


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        # read by transformers when it loads: the window imports it lazily, in a worker, to open fast
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _load(args) -> Any:
    from studio.core.loading import load_model

    print(f"loading {args.model} …", file=sys.stderr)
    return load_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        use_cache=not args.no_cache,
    )


def _eval_config(args):
    from studio.core.evaluation import PerplexityConfig

    if not args.text:
        return None
    return PerplexityConfig(
        text_file=str(Path(args.text).expanduser()),
        max_tokens=args.tokens or None,
        window=args.window,
        stride=args.stride,
        join=args.join,
        bos=args.bos,
    )


def cmd_info(args) -> int:
    from studio.core.summary import summarize

    loaded = _load(args)
    summary = summarize(loaded.model)
    if args.json:
        print(json.dumps({"source": loaded.source, **summary.to_dict()}, indent=2))
    else:
        print(f"model          {loaded.name} ({loaded.source.get('kind')}: {loaded.source.get('path', '')})")
        print(summary.format())
    return EXIT_OK


def cmd_methods(args) -> int:
    from studio.core.registry import all_methods, param_specs

    methods = all_methods()
    if args.json:
        out = [
            {
                "id": m.id,
                "title": m.title,
                "family": str(m.family),
                "needs_calibration": m.needs_calibration,
                "summary": m.summary,
                "params": [vars(s) for s in param_specs(m.Params)],
            }
            for m in methods
        ]
        print(json.dumps(out, indent=2, default=str))
        return EXIT_OK
    for m in methods:
        calib = "needs calibration data" if m.needs_calibration else "no calibration data"
        print(f"{m.id:<12} {m.family:<22} {m.title} ({calib})\n{'':12} {m.summary}")
        for s in param_specs(m.Params):
            rng = ""
            if s.choices:
                rng = " one of " + ", ".join(map(str, s.choices))
            elif s.minimum is not None or s.maximum is not None:
                rng = f" in [{s.minimum if s.minimum is not None else ''}, {s.maximum if s.maximum is not None else ''}]"
            print(f"{'':14}{s.name} ({s.type}{rng}, default {s.default!r}): {s.help}")
        print()
    return EXIT_OK


def cmd_presets(args) -> int:
    from studio.core.paths import PRESETS_DIR
    from studio.core.recipe import load_recipe

    for path in sorted(PRESETS_DIR.glob("*.yaml")):
        recipe = load_recipe(path)
        print(f"{path.stem:<28} {recipe.name}: {recipe.description}")
    return EXIT_OK


def cmd_eval(args) -> int:
    from studio.core.evaluation import (
        generate_samples,
        load_eval_tokens,
        perplexity,
        size_report,
        throughput,
        zero_shot_accuracy,
    )

    config = _eval_config(args)
    for task in args.tasks:  # fail before the slow load
        if not Path(task).is_file():
            raise StudioError(f"Task file '{task}' does not exist.")
    if config and not Path(config.text_file).is_file():
        raise StudioError(f"Evaluation text '{config.text_file}' does not exist.")
    loaded = _load(args)
    result: dict[str, Any] = {"model": loaded.source, "size": size_report(loaded.model)}
    if config:
        tokens = load_eval_tokens(loaded.tokenizer, config)
        ppl = perplexity(loaded.model, tokens, config, loaded.tokenizer)
        result["perplexity"] = ppl.perplexity
        result["perplexity_details"] = ppl.to_dict()
        _say(args, f"perplexity {ppl.perplexity:.4f} over {ppl.tokens_scored} tokens of {config.text_file}")
    if args.tasks:
        result["accuracy"] = {}
        for task in args.tasks:
            acc = zero_shot_accuracy(loaded.model, loaded.tokenizer, task, limit=args.limit or None)
            result["accuracy"][acc["task"]] = acc
            _say(args, f"{acc['task']:<16} acc {acc['acc']:.4f}  acc_norm {acc['acc_norm']:.4f}  ({acc['items']} items)")
    if args.speed:
        result["speed"] = throughput(loaded.model)
        _say(args, "prefill {prefill_tokens_per_s:.1f} tokens/s, decode {decode_tokens_per_s:.1f} tokens/s".format(**result["speed"]))
    if args.generate and loaded.tokenizer is not None:
        result["generations"] = generate_samples(loaded.model, loaded.tokenizer)
        for g in result["generations"]:
            _say(args, f"> {g['prompt']}{g['completion']}")
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return EXIT_OK


def _say(args, text: str) -> None:
    print(text, file=sys.stderr if args.json else sys.stdout)


def resolve_recipe_path(name: str) -> Path:
    from studio.core.paths import PRESETS_DIR

    path = Path(name).expanduser()
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    preset = PRESETS_DIR / f"{name}.yaml"
    if preset.exists():
        return preset
    raise RecipeError(f"'{name}' is neither a recipe file nor a preset; 'studio presets' lists the presets.")


def _calibration_options(p) -> None:
    p.add_argument("--calib-text", metavar="FILE", help="calibration text for methods that need it (overrides the recipe's)")
    p.add_argument("--calib-samples", type=int, metavar="N", help="calibration samples (recipe's, or 32)")
    p.add_argument("--calib-seq-len", type=int, metavar="L", help="tokens per calibration sample (recipe's, or 512)")
    p.add_argument("--calib-seed", type=int, metavar="S", help="seed choosing the samples (recipe's, or 0)")


def _with_calibration_overrides(recipe, args, where: str):
    """The recipe with its calibration section changed by the --calib-* options, checked like the YAML."""
    from studio.core.recipe import parse_calibration

    changes = {"text_file": args.calib_text, "samples": args.calib_samples, "seq_len": args.calib_seq_len,
               "seed": args.calib_seed}
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        return recipe
    if "text_file" in changes:
        changes["dataset"] = None
    current = recipe.calibration.model_dump() if recipe.calibration else {}
    recipe.calibration = parse_calibration({**current, **changes}, f"{where} with the --calib-* options")
    return recipe


def cmd_run(args) -> int:
    from studio.cli.progress import ProgressPrinter
    from studio.core.export import check_destination, export_hf_folder
    from studio.core.recipe import check_calibration, load_recipe, validate_recipe
    from studio.core.runner import run_recipe

    recipe_path = resolve_recipe_path(args.recipe)
    recipe = _with_calibration_overrides(load_recipe(recipe_path), args, str(recipe_path))
    steps = validate_recipe(recipe, str(recipe_path))
    check_calibration(steps, recipe.calibration, str(recipe_path))
    # schema errors before the slow model load
    out = check_destination(args.out, args.force)
    config = _eval_config(args)
    if config and not Path(config.text_file).is_file():
        raise StudioError(f"Evaluation text '{config.text_file}' does not exist.")
    loaded = _load(args)
    _print_estimates(recipe, loaded.model, str(recipe_path))
    started_at = time.time()

    def remember(status: str, report: dict, export: Path | None = None, error: str | None = None) -> None:
        _record_run(status, report, recipe, loaded.source, export, error, started_at)

    try:
        with ProgressPrinter() as progress:
            # nothing compares with the original afterwards: compress it in place, without a second set of weights
            in_place = config is None and not any(vs.method.needs_teacher for vs in steps)
            result = run_recipe(recipe, loaded, events=progress, eval_config=config, where=str(recipe_path),
                                in_place=in_place)
    except KeyboardInterrupt:
        remember("cancelled", {})
        raise
    if result.status == "failed":
        remember("failed", result.report, error=result.error)
        print(f"error: {result.error}", file=sys.stderr)
        return EXIT_BAD_INPUT if result.bad_input else EXIT_RUN_FAILED
    if result.status == "cancelled":
        remember("cancelled", result.report)
        return EXIT_INTERRUPTED
    try:
        export_hf_folder(result.model, loaded.tokenizer, out, recipe=recipe, report=result.report, force=args.force)
    except BaseException:
        remember("finished", result.report)  # the run itself finished; only its export did not
        raise
    report = json.loads((out / "report.json").read_text())
    remember("finished", report, out)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_run_summary(report, out)
    return EXIT_OK


def _record_run(status, report, recipe, source, export, error, started_at) -> None:
    """Store the run in the run history; a history that cannot be written is a warning, never a failed run."""
    from studio.core.history import RunHistory

    try:
        RunHistory().record(status, report, recipe, source, export, error=error, started_at=started_at)
    except Exception as exc:
        print(f"warning: the run was not recorded in the run history: {exc}", file=sys.stderr)


def cmd_history(args) -> int:
    from studio.core.history import RunHistory

    records = RunHistory().list(args.filter, args.status, search_id=args.search)
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2, default=str))
        return EXIT_OK
    if not records:
        print("no runs recorded" + (" that match" if args.filter or args.status or args.search else ""))
        return EXIT_OK
    print(f"{'id':>4}  {'finished':<16}  {'status':<9}  {'model':<24}  {'recipe':<24}  {'perplexity':>19}  "
          f"{'KL':>8}  {'MiB':>17}  {'seconds':>8}  export")
    for r in records:
        print(f"{r.id:>4}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(r.finished_at)):<16}  {r.status:<9}  "
              f"{_clip(r.model_name, 24):<24}  {_clip(r.recipe_name, 24):<24}  "
              f"{_pair(r.baseline_perplexity, r.final_perplexity, '.3f'):>19}  {_num(r.kl, '.5f'):>8}  "
              f"{_pair(_mib(r.size_before), _mib(r.size_after), '.2f'):>17}  {_num(r.seconds, '.1f'):>8}  "
              f"{r.export_path or ''}")
    return EXIT_OK


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pair(before, after, spec: str) -> str:
    return f"{_num(before, spec)} -> {_num(after, spec)}"


def _mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def _print_estimates(recipe, model, where: str) -> None:
    from studio.core.runner import estimate, prepare

    steps = prepare(recipe, model, where)
    for vs, est in zip(steps, estimate(steps, model)):
        print(f"{vs.label}: estimated +{est.extra_bytes / 2**20:,.0f} MiB, about {est.seconds:,.1f} s", file=sys.stderr)


def _is_table(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(row, dict) for row in value)


def _format_table(rows: list[dict]) -> str:
    """Rows of a step's summary table (e.g. mixed precision's sensitivity) as aligned text; a nested mapping
    such as {"error": {"2": …, "3": …}} becomes one column per key ("error 2", "error 3")."""
    flat = []
    for row in rows:
        cells = {}
        for key, value in row.items():
            if isinstance(value, dict):
                cells.update({f"{key} {k}": v for k, v in value.items()})
            else:
                cells[key] = value
        flat.append(cells)
    columns = list(dict.fromkeys(c for cells in flat for c in cells))

    def show(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)

    text = [[show(cells.get(c, "")) for c in columns] for cells in flat]
    widths = [max(len(c), *(len(r[i]) for r in text)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths)))]
    lines += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in text]
    return "\n".join(lines)


def _print_run_summary(report: dict, out: Path) -> None:
    base, final = report.get("baseline"), report.get("final")
    for step in report["steps"]:
        scalars = {k: v for k, v in step["summary"].items() if not _is_table(v)}
        print(f"step {step['index'] + 1} {step['method']}: {step['seconds']:.1f} s, peak RSS "
              f"{step['peak_rss_bytes'] / 2**20:,.0f} MiB, {scalars}")
        for key, rows in step["summary"].items():
            if _is_table(rows):
                print(f"{key}:")
                print(_format_table(rows))
    if base and final:
        print(f"perplexity {base['perplexity']:.4f} -> {final['perplexity']:.4f}  "
              f"KL {final['kl']:.4f}  top-1 agreement {final['top1_agreement']:.3f}")
    size = report["export"]["size"]
    print(f"compressed size {size['compressed_bytes'] / 2**20:,.1f} MiB "
          f"(dense on disk {size['disk_bytes'] / 2**20:,.1f} MiB)")
    print(f"exported to {out}")


def cmd_export(args) -> int:
    from studio.core.export import check_destination, export_model
    from studio.core.export.advice import format_advice, model_state_summary

    if not args.advice and not args.out:
        raise StudioError("Give --out (a folder, or FILE.gguf with --format gguf), or --advice to see which formats fit.")
    out = None if args.advice else check_destination(args.out, args.force)
    config = _eval_config(args)
    if config and not Path(config.text_file).is_file():
        raise StudioError(f"Evaluation text '{config.text_file}' does not exist.")
    args.model, recipe, report = _resolve_run(args.model)
    loaded = _load(args)
    print(f"model state: {model_state_summary(loaded.model)}", file=sys.stderr)
    stream = sys.stdout if args.advice else sys.stderr
    for advice in format_advice(loaded.model, args.gguf_type, None if args.advice else (args.format,)):
        print(f"{advice.format} ({'fits' if advice.usable else 'does not fit'}): {advice.summary}", file=stream)
        for line in advice.details:
            print(f"    {line}", file=stream)
    if args.advice:
        return EXIT_OK
    options = {"type": args.gguf_type} if args.format == "gguf" else \
        {"embedding_bits": None if args.embedding_bits == 16 else 8} if args.format == "compressed-tensors" else \
        {"keep_factors": args.keep_factors}
    started = time.perf_counter()
    result = export_model(loaded.model, loaded.tokenizer, out, format=args.format, options=options, recipe=recipe,
                          report=report, source=loaded.source, force=args.force, verify=config)
    result.export["seconds"] = round(time.perf_counter() - started, 2)
    if args.json:
        print(json.dumps(result.export, indent=2, default=str))
    else:
        _print_export_summary(result)
    verification = result.export.get("verification")
    if verification and not verification["within_tolerance"] and not _requantized(result.export):
        print("error: the reloaded export does not score like the model in memory (see above)", file=sys.stderr)
        return EXIT_RUN_FAILED
    return EXIT_OK


def _resolve_run(spec: str) -> tuple[str, Any, dict | None]:
    """A run (run:ID, or a `studio run` output folder) gives the model path plus its recipe and report."""
    from studio.core.recipe import load_recipe

    if spec.startswith("run:"):
        from studio.core.history import RunHistory

        try:
            record = RunHistory().get(int(spec[4:]))
        except ValueError:
            raise StudioError(f"'{spec}' is not a run id; `studio history` lists them (run:12).") from None
        if not record.export_path:
            raise StudioError(f"Run {spec[4:]} has no exported folder to export from; run it again with --out.")
        spec = record.export_path
    folder = Path(spec).expanduser()
    if not (folder / "report.json").is_file():
        return spec, None, None
    recipe = load_recipe(folder / "recipe.yaml") if (folder / "recipe.yaml").is_file() else None
    try:
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except ValueError:
        report = None
    return str(folder), recipe, report


def _requantized(export: dict) -> bool:
    return bool(export.get("requantized") or export.get("quantized_at_export"))


def _print_export_summary(result) -> None:
    export = result.export
    size = export["size"]
    print(f"exported {export['format']} to {result.path}: {size['disk_bytes'] / 2**20:,.1f} MiB on disk "
          f"in {export['seconds']:.1f} s")
    for key in ("gguf_type", "bits_per_weight", "studio_codes_kept", "layers_packed", "embedding", "tokenizer"):
        if export.get(key) is not None:
            print(f"  {key.replace('_', ' ')}: {export[key]}")
    for key in ("requantized", "quantized_at_export"):
        if export.get(key):
            names = export[key]
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "") \
                if isinstance(names, list) else names
            print(f"  {key.replace('_', ' ')}: {shown}")
    verification = export.get("verification")
    if verification:
        print(f"  perplexity in memory {verification['in_memory']:.4f} ({verification['tokens']} tokens of "
              f"{verification['text']})")
        for loader, value in verification["reloaded"].items():
            print(f"  reloaded by {loader}: {value['perplexity']:.4f} ({value['relative_difference']:+.2%})")
        for loader, reason in verification.get("not_checked", {}).items():
            print(f"  not checked with {loader}: {reason}")


def cmd_search(args) -> int:
    from studio.cli.search import cmd_search as search

    return search(args, _load)


COMMANDS = {"info": cmd_info, "methods": cmd_methods, "eval": cmd_eval, "run": cmd_run, "export": cmd_export, "presets": cmd_presets,
            "history": cmd_history, "search": cmd_search}
