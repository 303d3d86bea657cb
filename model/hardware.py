"""What the training machine can do, detected rather than assumed, and the precision it trains in.

Machines here differ (an Intel Xeon with AMX, an AMD EPYC without it, a CUDA GPU), so every run
records the hardware it ran on (`describe_hardware`, written to log.jsonl) and `train.precision =
"auto"` picks bf16 autocast only where the hardware multiplies bf16 natively:

    CUDA   torch.cuda.is_bf16_supported() (Ampere and newer)
    CPU    amx_bf16 or avx512_bf16 in /proc/cpuinfo (or torch's own cpuinfo check elsewhere)

Emulated bf16 (AVX2-only CPUs) is slower than fp32, so auto stays fp32 there.
"""

from __future__ import annotations

import logging
import os
import platform
from functools import cache
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")
# The flags that decide matmul speed: fp32 vector width, bf16 dot products, AMX tiles, int8 VNNI.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@cache
def cpu_info() -> dict[str, Any]:
    """CPU model, the relevant ISA flags, logical CPUs and the ones this process may use."""
    model, flags, cores = platform.processor() or platform.machine(), set(), None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:  # the first processor's entry
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "cpu cores":
                    cores = int(value)
                elif key in ("flags", "Features"):  # x86, arm
                    flags = set(value.split())
                elif not key and flags:
                    break
    except OSError:  # not Linux: ask torch's cpuinfo
        checks = {"avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported",
                  "avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported",
                  "avx512_vnni": "_is_vnni_supported"}
        flags = {flag for flag, check in checks.items() if getattr(torch.cpu, check, lambda: False)()}
        if "amx_tile" in flags:
            flags.add("amx_bf16")  # every AMX CPU has the bf16 tile multiply
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "flags": [f for f in CPU_FLAGS if f in flags], "cores_per_socket": cores,
            "logical_cpus": os.cpu_count(), "usable_cpus": usable}


def cpu_has_native_bf16() -> bool:
    return any(flag in cpu_info()["flags"] for flag in NATIVE_BF16_FLAGS)


def choose_precision(requested: str, device: torch.device) -> Precision:
    """Resolve train.precision: "auto" -> bf16 where the hardware has native bf16 matmul."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose from {PRECISIONS}")
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
    if requested == "auto":
        return "bf16" if native else "fp32"
    if requested == "bf16" and not native:
        log.warning("bf16 requested on %s without native bf16 matmul: expect it to be slower than fp32",
                    torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_info()["model"])
    return requested  # type: ignore[return-value]


def describe_hardware(device: torch.device) -> dict[str, Any]:
    """One JSON-able record of the machine a run trains on."""
    record: dict[str, Any] = {
        "cpu": cpu_info(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": str(device),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        record["cuda"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                          "memory_gib": round(props.total_memory / 2**30, 1),
                          "bf16": torch.cuda.is_bf16_supported(), "cuda": torch.version.cuda,
                          "devices": torch.cuda.device_count()}
    return record
