"""The studio's side of a pair: the same recipe step a user would run, through the studio's runner."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    import studio  # noqa: F401  (first, as in the studio's own commands: its settings precede any tensor)

    job = common.read_job()
    import torch

    from studio.core.calibration import CalibrationSettings, load_calibration_tokens
    from studio.core.loading import load_model
    from studio.core.recipe import parse_recipe
    from studio.core.runner import run_recipe
    from studio.methods.activation_quant import input_quantization

    loaded = load_model(job["model"])
    settings = CalibrationSettings(**job["calibration_settings"])
    recipe = parse_recipe({"schema_version": 2, "calibration": settings.model_dump(),
                           "steps": [{"method": job["method"], "params": job["params"]}]})
    result: dict = {"versions": common.versions("compression-studio")}
    with common.stopwatch(result):  # in place, as `studio run` compresses when nothing compares afterwards
        run = run_recipe(recipe, loaded, in_place=True)
    if run.status != "finished":
        raise SystemExit(f"the studio's run {run.status}: {run.error}")
    # after the measured part: tokenizing the whole sample file for this check is the benchmark's cost
    if not torch.equal(load_calibration_tokens(loaded.tokenizer, settings), common.calibration_tokens(job)):
        raise SystemExit("the studio's calibration tokens differ from the benchmark's calibration file")
    quantized_inputs = input_quantization(run.model)
    if quantized_inputs:
        result["input_quant"] = {"layers": sorted(quantized_inputs),
                                 "bits": next(iter(quantized_inputs.values()))["bits"]}
    common.write_result(job, common.layer_tensors(run.model), result)


if __name__ == "__main__":
    main()
