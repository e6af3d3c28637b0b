import json
import subprocess
import sys

import pytest

from conftest import SMOLLM
from studio.cli.main import EXIT_BAD_INPUT, main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_methods_lists_every_method_with_its_schema(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0 and "rtn" in out and "magnitude" in out and "group_size" in out
    code, out, _ = run(capsys, "methods", "--json")
    methods = {m["id"]: m for m in json.loads(out)}
    assert methods["rtn"]["family"] == "quantization" and methods["rtn"]["needs_calibration"] is False


def test_info(capsys, tiny_folder):
    code, out, _ = run(capsys, "info", tiny_folder)
    assert code == 0 and "LlamaForCausalLM" in out and "decoder blocks 3" in out
    code, out, _ = run(capsys, "info", tiny_folder, "--json")
    assert json.loads(out)["num_blocks"] == 3


def test_eval_json(capsys, tiny_folder, text_file, tmp_path):
    task = tmp_path / "t.jsonl"
    task.write_text('{"query": "The fox", "choices": ["jumps", "dog"], "gold": 0}\n')
    code, out, _ = run(capsys, "eval", tiny_folder, "--text", text_file, "--tokens", 200, "--window", 64,
                       "--stride", 32, "--tasks", task, "--speed", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["perplexity"] > 1 and result["perplexity_details"]["tokens_scored"] == 200
    assert result["accuracy"]["t"]["items"] == 1 and result["speed"]["decode_tokens_per_s"] > 0


def test_run_writes_model_and_report(capsys, tiny_folder, text_file, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "run", "rtn-w4-g64", "--model", tiny_folder, "--out", out_dir,
                         "--eval-text", text_file, "--tokens", 200, "--window", 64, "--stride", 32, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report == json.loads((out_dir / "report.json").read_text())
    assert report["baseline"]["perplexity"] > 0 and report["final"]["perplexity"] > 0
    assert report["steps"][0]["method"] == "rtn" and report["steps"][0]["params"]["group_size"] == 64
    assert (out_dir / "recipe.yaml").exists() and (out_dir / "model.safetensors").exists()


def test_run_without_evaluation_compresses_in_place_and_with_it_on_a_copy(capsys, monkeypatch, tiny_folder,
                                                                           text_file, tmp_path):
    from studio.core import runner

    calls = []
    real = runner.run_recipe
    monkeypatch.setattr(runner, "run_recipe", lambda *a, **k: calls.append(k["in_place"]) or real(*a, **k))
    code, _, err = run(capsys, "run", "rtn-w4-g64", "--model", tiny_folder, "--out", tmp_path / "a")
    assert code == 0, err
    code, _, err = run(capsys, "run", "rtn-w4-g64", "--model", tiny_folder, "--out", tmp_path / "b",
                       "--eval-text", text_file, "--tokens", 100, "--window", 64, "--stride", 64)
    assert code == 0, err
    assert calls == [True, False]  # nothing reads the original after a run that is not evaluated


def test_export_a_run_folder_as_gguf_and_compressed_tensors_proven_by_reloading(capsys, tiny_folder, text_file,
                                                                                 tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "run", "rtn-w4-g64", "--model", tiny_folder, "--out", run_dir)
    assert code == 0, err
    code, out, _ = run(capsys, "export", run_dir, "--advice")
    assert code == 0 and [line.split(" ")[0] for line in out.splitlines() if not line.startswith(" ")] == [
        "hf-safetensors", "compressed-tensors", "gguf"]

    gguf = tmp_path / "model.gguf"
    code, out, err = run(capsys, "export", run_dir, "--format", "gguf", "--out", gguf, "--eval-text", text_file,
                         "--tokens", 200, "--window", 64, "--stride", 64, "--json")
    assert code == 0, err
    export = json.loads(out)
    assert gguf.is_file() and export["gguf_type"] == "Q4_0" and export["studio_codes_kept"] == 3 * 7
    assert "rtn-w4-g64" in err or "Q4_0" in err  # the advice printed before the export
    (reloaded,) = [v for k, v in export["verification"]["reloaded"].items() if k.startswith("transformers")]
    assert abs(reloaded["relative_difference"]) < 0.005

    ct = tmp_path / "ct"
    code, out, err = run(capsys, "export", run_dir, "--format", "compressed-tensors", "--out", ct)
    assert code == 0, err
    config = json.loads((ct / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "rtn" in (ct / "recipe.yaml").read_text() and "Compression Studio" in (ct / "README.md").read_text()

    code, _, err = run(capsys, "export", tiny_folder, "--format", "compressed-tensors", "--out", tmp_path / "no")
    assert code == EXIT_BAD_INPUT and "studio run" in err and not (tmp_path / "no").exists()


def bad_recipe(tmp_path, step: str):
    path = tmp_path / "bad.yaml"
    path.write_text(f"schema_version: 1\nsteps:\n  - {step}\n")
    return path


@pytest.mark.parametrize("case,expect", [
    ("missing_model", "does not exist"),
    ("no_weights", "no model weights"),
    ("truncated_safetensors", "truncated"),
    ("truncated_gguf", "not a readable GGUF file"),
    ("unknown_method", "step 1 (quantum): unknown method"),
    ("wrong_type", "field 'bits': Input should be a valid integer"),
    ("out_of_range", "field 'bits': Input should be less than or equal to 8"),
    ("group_size_misfit", "does not divide the input width"),
    ("destination_exists", "already exists"),
    ("missing_recipe", "does not exist"),
])
def test_bad_input_gives_one_paragraph_and_exit_2(capsys, tmp_path, tiny_folder, case, expect):
    model, out = tiny_folder, tmp_path / "out"
    recipe = bad_recipe(tmp_path, "{method: rtn, params: {bits: 4, group_size: 32}}")
    if case == "missing_model":
        model = tmp_path / "nowhere"
    elif case == "no_weights":
        (tiny_folder / "model.safetensors").unlink()
    elif case == "truncated_safetensors":
        weights = tiny_folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])
    elif case == "truncated_gguf":
        model = tmp_path / "cut.gguf"
        with open(SMOLLM, "rb") as fh:
            model.write_bytes(fh.read(3_000_000))
    elif case == "unknown_method":
        recipe = bad_recipe(tmp_path, "{method: quantum}")
    elif case == "wrong_type":
        recipe = bad_recipe(tmp_path, "{method: rtn, params: {bits: four}}")
    elif case == "out_of_range":
        recipe = bad_recipe(tmp_path, "{method: rtn, params: {bits: 12}}")
    elif case == "group_size_misfit":
        recipe = bad_recipe(tmp_path, "{method: rtn, params: {bits: 4, group_size: 96}}")
    elif case == "destination_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "missing_recipe":
        recipe = tmp_path / "nope.yaml"
    code, stdout, err = run(capsys, "run", recipe, "--model", model, "--out", out)
    assert code == EXIT_BAD_INPUT
    assert expect in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    if case == "destination_exists":
        assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    else:
        assert not out.exists()


def test_console_entry_point_runs_as_a_program(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "studio", "info", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "studio", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "compression-studio" in proc.stdout


def test_a_low_rank_run_reloads_factored_and_exports_dense(capsys, tiny_folder, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from studio.core.factored import FACTORED_FILE, low_rank_layers
    from studio.core.loading import load_model

    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "run", "svd-llm-20", "--model", tiny_folder, "--out", run_dir, "--calib-text",
                       text_file, "--calib-samples", 4, "--calib-seq-len", 16)
    assert code == 0, err
    assert (run_dir / FACTORED_FILE).is_file()
    factored = load_model(str(run_dir)).model
    assert len(low_rank_layers(factored)) == 3 * 7
    code, out, _ = run(capsys, "export", run_dir, "--advice")
    assert code == 0 and "multiplied back into dense weights" in out
    code, _, err = run(capsys, "export", run_dir, "--format", "hf-safetensors", "--out", tmp_path / "dense",
                       "--eval-text", text_file, "--tokens", 200, "--window", 64, "--stride", 64)
    assert code == 0, err
    assert not low_rank_layers(AutoModelForCausalLM.from_pretrained(tmp_path / "dense"))


def test_distillation_and_dynamic_steps_run_from_a_recipe_file(capsys, tiny_folder, text_file, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "schema_version: 2\n"
        f"calibration: {{text_file: {text_file}, samples: 6, seq_len: 24}}\n"
        "steps:\n"
        "  - {method: magnitude, params: {sparsity: 0.5}}\n"
        "  - {method: distill, params: {steps: 2, batch_size: 2, seq_len: 16, eval_every: 1}}\n"
        "  - {method: early_exit, params: {thresholds: '0.5,1.0', tokens: 64, prompts: 1, prompt_tokens: 8, "
        "max_new_tokens: 4}}\n"
        "  - {method: self_speculative, params: {skip_blocks: 1, draft_tokens: 2, prompts: 1, prompt_tokens: 8, "
        "max_new_tokens: 6}}\n")
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "run", recipe, "--model", tiny_folder, "--out", out_dir, "--json")
    assert code == 0, err
    steps = json.loads(out)["steps"]
    assert [s["method"] for s in steps] == ["magnitude", "distill", "early_exit", "self_speculative"]
    assert len(steps[1]["summary"]["loss_curve"]) == 2
    assert steps[3]["summary"]["identical_to_greedy"] is True
    assert (out_dir / "model.safetensors").exists()


def test_info_names_the_versions_and_the_device(capsys):
    code, out, _ = run(capsys, "--info")
    info = json.loads(out)
    assert code == 0 and info["device"] == "cpu" and info["torch"].startswith("2.") and info["qt"].startswith("6.")


def test_self_test_opens_the_window_runs_exports_and_reports(tmp_path):
    import os

    report = tmp_path / "report.json"
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    done = subprocess.run([sys.executable, "-m", "studio", "--self-test", "--report", str(report)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(report.read_text())
    checks = result["checks"]
    assert result["status"] == "passed" and checks["memory_samples"] >= 1 and checks["accuracy_points"] >= 1
    assert checks["export_reload_max_logit_difference"] <= 1e-4 and checks["first_paint_seconds"] > 0
    assert checks["first_paint_since_launch_seconds"] >= checks["first_paint_seconds"] and checks["presets"] >= 1
    assert result["installation"]["frozen"] is False and result["installation"]["executable"] == sys.executable


def test_a_failing_self_test_exits_1_with_the_reason(qtbot, tmp_path, monkeypatch):
    from studio.gui import self_test

    def broken(folder):
        raise OSError("disk full")

    monkeypatch.setattr(self_test, "write_tiny_model", broken)
    report = tmp_path / "report.json"
    assert self_test.run_self_test(str(report)) == 1
    result = json.loads(report.read_text())
    assert result["status"] == "failed" and "disk full" in result["reason"]
