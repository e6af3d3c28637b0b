"""optimum-quanto's side: `quantize(model, weights=qint4|qint8)` and `freeze`, every decoder Linear (not the tied
LM head), then each frozen weight dequantized. quanto's qint4 is affine in groups of 128 with a float shift; its
qint8 is symmetric per output channel. Calibration-free (weights only)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    job = common.read_job()
    from optimum.quanto import freeze, qint4, qint8, quantize

    model = common.load_dense_model(job)
    qtype = {4: qint4, 8: qint8}[job["params"]["bits"]]
    result: dict = {"versions": common.versions("optimum-quanto")}
    with common.stopwatch(result):
        quantize(model, weights=qtype, exclude=["lm_head"])
        freeze(model)
    weights = {name: model.get_submodule(name).weight.dequantize() for name in common.decoder_linear_names(model)}
    common.write_result(job, common.layer_tensors(model, weights), result)


if __name__ == "__main__":
    main()
