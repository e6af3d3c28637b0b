"""The compression methods, one module per algorithm. Importing this package registers them."""

from studio.methods import (  # noqa: F401
    awq,
    gptq,
    hqq,
    kv_cache,
    layer_drop,
    magnitude,
    mixed_precision,
    rtn,
    smoothquant,
    sparsegpt,
    structured,
    wanda,
)
