"""HQQ's side (the authors' `hqq` package): every decoder Linear through HQQLinear with BaseQuantizeConfig, on the
CPU in float32, then dequantized. Calibration-free, so the calibration tokens are not used."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    job = common.read_job()
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    model = common.load_dense_model(job)
    config = BaseQuantizeConfig(nbits=job["params"]["bits"], group_size=job["params"]["group_size"])
    result: dict = {"versions": common.versions("hqq"), "settings": config["weight_quant_params"]}
    quantized = {}
    with common.stopwatch(result):
        for name in common.decoder_linear_names(model):
            quantized[name] = HQQLinear(model.get_submodule(name), config, del_orig=False,
                                        compute_dtype=torch.float32, device="cpu")
    weights = {name: layer.dequantize().reshape(model.get_submodule(name).weight.shape)
               for name, layer in quantized.items()}
    common.write_result(job, common.layer_tensors(model, weights), result)


if __name__ == "__main__":
    main()
