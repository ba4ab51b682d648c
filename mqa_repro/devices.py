"""Device ceilings for the cost model: datasheet presets (each with its source) and the ceilings
decode-bench measured on this machine. One device is what one accelerator program sees (one TPUv2 core,
one GPU). The ceilings type is :class:`mqa_repro.roofline.Ceilings`; GB means 1e9 bytes.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from . import roofline as rl
from .errors import UserError
from .roofline import Ceilings

GB = 1e9


def datasheet(name: str, bandwidth_Bps: float, peak_flops: float, memory_bytes: Optional[float], source: str):
    return Ceilings(name, "bf16", bandwidth_Bps, peak_flops, memory_bytes=memory_bytes, source=source)


DEVICES = {
    # NVIDIA H100 Tensor Core GPU datasheet, SXM5 80 GB: 3.35 TB/s HBM3, 989 TFLOP/s dense BF16 (the
    # datasheet's 1,979 assumes 2:4 sparsity), 80 GB.
    "h100": datasheet("h100", 3.35e12, 989e12, 80 * GB,
                   "NVIDIA H100 SXM5 datasheet: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16, 80 GB"),
    # NVIDIA H200 Tensor Core GPU datasheet, SXM: 4.8 TB/s HBM3e, 141 GB; the same Hopper tensor cores as
    # the H100, 989 TFLOP/s dense BF16 (1,979 with sparsity).
    "h200": datasheet("h200", 4.8e12, 989e12, 141 * GB,
                   "NVIDIA H200 SXM datasheet: 4.8 TB/s HBM3e, 989 TFLOP/s dense bf16, 141 GB"),
    # NVIDIA A100 Tensor Core GPU datasheet, 80 GB SXM: 2,039 GB/s HBM2e, 312 TFLOP/s dense BF16, 80 GB.
    "a100": datasheet("a100", 2.039e12, 312e12, 80 * GB,
                   "NVIDIA A100 80GB SXM datasheet: 2.039 TB/s HBM2e, 312 TFLOP/s dense bf16, 80 GB"),
    # ONE TPUv2 CORE. A TPUv2 chip has two cores, each with its own 8 GiB HBM stack; per chip 700 GB/s and
    # 16 GiB (Jouppi et al. 2020, "A domain-specific supercomputer for training deep neural networks",
    # CACM) and 45 TFLOP/s bf16 (Google: 180 TFLOP/s per 4-chip Cloud TPU v2; Jouppi et al. round to 46).
    # We assume the chip's figures split evenly over its two cores: 350 GB/s, 22.5 TFLOP/s, 8 GiB.
    # The paper's "one TPUv2 (8 cores)" is 4 chips = 8 of these devices, data-parallel: batch 1024 is
    # 128 per core, each core reading all the weights. So `--device tpuv2 --batch 128` models one core's
    # step, and the paper's Table 2 figure (time / 1024 / 128) is our us/token divided by 8.
    "tpuv2": datasheet("tpuv2", 350e9, 22.5e12, 8 * 2**30,
                    "one TPUv2 core = half a chip (chip: 700 GB/s, 16 GiB, Jouppi et al. 2020; 45 TFLOP/s bf16, "
                    "Google); the paper's TPUv2 is 8 such cores"),
    # Not a datasheet: a modest generic server CPU for orders of magnitude only. Measure yours with
    # decode-bench, then use --device measured.
    "cpu": datasheet("cpu", 50e9, 1e12, None,
                  "generic CPU, illustrative (50 GB/s, 1 TFLOP/s bf16), not a datasheet; prefer --device measured"),
}


def measured_device(path=None, refresh: bool = False, log=None) -> Ceilings:
    """The ceilings decode-bench measured and cached (roofline.cache_path(): the most recent bf16 entry,
    else the most recent), or with ``refresh`` measured now on this machine's device (bf16 on CUDA, fp32 on
    the CPU) and cached. ``log`` gets one line naming the file, device and date of a cached measurement.
    Raises UserError when there is no cache or it is not a ceilings file."""
    if refresh:
        from .runtime import resolve_device

        dev = resolve_device("auto")
        c = rl.ceilings(dev, "bf16" if dev.type == "cuda" else "fp32", path, refresh=True)
        where = f"measured now on {c.device} ({c.dtype}, torch {c.torch}, {c.measured})"
    else:
        path = Path(path) if path else rl.cache_path()
        try:
            entries = list(rl.cached_ceilings(path).values())
        except ValueError as e:
            raise UserError(f"--device measured: {e}") from None
        if not entries:
            raise UserError(f"--device measured: no measured ceilings at {path}; run decode-bench on the device "
                            f"first (or cost-model --refresh-ceilings), or pass --bandwidth and --flops")
        bf16 = [e for e in entries if e.dtype == "bf16"] or entries
        c = max(bf16, key=lambda e: e.measured)
        if log is not None:
            log(rl.describe_cached(c, path))
        where = (f"measured by decode-bench ({c.dtype}, torch {c.torch}, {c.measured}; copy bandwidth, "
                 f"matmul peak) from {path}")
    return replace(c, device=f"measured: {c.device}", memory_bytes=None, source=where)
