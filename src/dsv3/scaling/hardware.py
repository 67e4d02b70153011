"""Peak throughput per accelerator: the MFU denominator for the progress line, benchmarks and select-config.

Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, SXM/OAM parts. MFU is
model FLOPs (dsv3.scaling.training_flops_per_token) per second over this number.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["PEAK_BF16_TFLOPS", "DEFAULT_GPU", "peak_tflops", "device_peak_flops"]

PEAK_BF16_TFLOPS: dict[str, float] = {
    "B200": 2250.0,
    "H200": 989.0,
    "H100": 989.0,
    "MI300X": 1307.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
}
DEFAULT_GPU = "H100"  # what select-config assumes when not told (H100 and H200 share the bf16 peak)


def peak_tflops(device_name: str) -> float | None:
    """The bf16 peak of a device named like torch reports it ("NVIDIA H200"); None when unknown."""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name.upper()), None)


def device_peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of `device`; None on a CPU or an unknown GPU (no MFU is reported then)."""
    if device.type != "cuda":
        return None
    import torch  # only here: the scaling tools run without loading torch

    tflops = peak_tflops(torch.cuda.get_device_name(device))
    return None if tflops is None else tflops * 1e12
