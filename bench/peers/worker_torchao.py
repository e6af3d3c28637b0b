"""torchao's side: `quantize_(model, Int8WeightOnlyConfig())` on the decoder Linears (symmetric int8 per output
channel), then each weight dequantized. Calibration-free."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    job = common.read_job()
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = common.load_dense_model(job)
    names = set(common.decoder_linear_names(model))
    result: dict = {"versions": common.versions("torchao")}
    with common.stopwatch(result):
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear)
                  and fqn in names)
    weights = {name: model.get_submodule(name).weight.dequantize() for name in names}
    common.write_result(job, common.layer_tensors(model, weights), result)


if __name__ == "__main__":
    main()
