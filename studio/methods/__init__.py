"""The compression methods, one module per algorithm. Importing this package registers them."""

from studio.methods import (  # noqa: F401
    asvd,
    awq,
    distillation,
    early_exit,
    gptq,
    gqa,
    hqq,
    kv_cache,
    layer_drop,
    magnitude,
    mixed_precision,
    rtn,
    self_speculative,
    smoothquant,
    sparsegpt,
    structured,
    svd,
    svd_llm,
    wanda,
)
