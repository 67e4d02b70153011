"""Parameter, FLOP, KV-cache and memory accounting for DeepSeek-V3-style models; Chinchilla; config choice.

Pure functions over the config objects, so the trainer (MFU), the benchmarks and `dsv3 plan` share one
home for every formula. The conventions are stated once, in `docs/scaling.md` and on each function.
`params` counts and FLOPs, `memory` the KV cache and training memory, `plan` the budgets and the
choice of a layout, `report` the tables.
"""

from dsv3.scaling.hardware import PEAK_BF16_TFLOPS, device_peak_flops, peak_tflops
from dsv3.scaling.layout import layout_problems, rank_stages, stage_units
from dsv3.scaling.memory import (
    HEADROOM,
    GiB,
    KVCacheBytes,
    MemoryEstimate,
    kv_cache_bytes_per_token,
    memory_per_gpu,
)
from dsv3.scaling.params import (
    FlopBreakdown,
    LayerParams,
    ParamCounts,
    count_params,
    layer_params,
    training_flops_per_token,
)
from dsv3.scaling.plan import (
    CHINCHILLA_MAX,
    CHINCHILLA_MIN,
    DEFAULT_PEAK_TFLOPS,
    ChinchillaCheck,
    Choice,
    Plan,
    chinchilla_check,
    lr_and_batch_for_compute,
    plan_run,
    select_configs,
    training_hours,
)
from dsv3.scaling.report import (
    DOCS_COMMAND,
    describe_layout,
    human_bytes,
    human_count,
    markdown_report,
    plan_sections,
)

__all__ = [
    "LayerParams",
    "ParamCounts",
    "FlopBreakdown",
    "KVCacheBytes",
    "MemoryEstimate",
    "ChinchillaCheck",
    "Plan",
    "Choice",
    "GiB",
    "HEADROOM",
    "CHINCHILLA_MIN",
    "CHINCHILLA_MAX",
    "DEFAULT_PEAK_TFLOPS",
    "PEAK_BF16_TFLOPS",
    "peak_tflops",
    "device_peak_flops",
    "DOCS_COMMAND",
    "layer_params",
    "count_params",
    "training_flops_per_token",
    "kv_cache_bytes_per_token",
    "memory_per_gpu",
    "chinchilla_check",
    "lr_and_batch_for_compute",
    "plan_run",
    "training_hours",
    "select_configs",
    "layout_problems",
    "rank_stages",
    "stage_units",
    "plan_sections",
    "markdown_report",
    "human_count",
    "human_bytes",
    "describe_layout",
]
