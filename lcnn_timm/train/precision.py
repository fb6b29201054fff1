"""Which autocast precision fits the hardware: bf16 only where it is native, fp32 otherwise."""
from pathlib import Path
from typing import Optional, Tuple

import torch

__all__ = ["BF16_CPU_FLAGS", "has_native_bf16", "resolve_precision"]

# /proc/cpuinfo flags of CPUs with bf16 arithmetic in hardware (AVX512-BF16, AMX); without them oneDNN
# emulates bf16 with fp32 conversions, measured 4-7x slower than plain fp32 on an AVX2-only AMD EPYC
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def _cpu_flags(cpuinfo: Path) -> set:
    try:
        text = cpuinfo.read_text()
    except OSError:  # not Linux, or /proc unavailable: no evidence of native bf16
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def has_native_bf16(device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True if ``device`` computes bf16 in hardware.

    CUDA: ``torch.cuda.is_bf16_supported()``. CPU: the first ``flags`` line of
    ``cpuinfo`` lists ``avx512_bf16`` or ``amx_bf16`` (Linux; elsewhere False).
    Other device types: False.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(_cpu_flags(cpuinfo) & BF16_CPU_FLAGS)
    return False


def resolve_precision(amp: Optional[bool], amp_dtype: str, device: torch.device) -> Tuple[Optional[str], str]:
    """The autocast dtype to train with (None: plain fp32) and a one-line reason to print.

    ``amp`` None (the default, ``amp: auto``) chooses bfloat16 where :func:`has_native_bf16`, fp32 otherwise;
    ``amp`` True uses ``amp_dtype`` (timm's ``--amp --amp-dtype``); False forces fp32.
    """
    if amp is None:
        if has_native_bf16(device):
            return "bfloat16", f"amp: auto -> bfloat16 autocast ({device.type} has native bf16)"
        native = "a GPU with bf16" if device.type == "cuda" else f"CPU flags {' or '.join(sorted(BF16_CPU_FLAGS))}"
        return None, f"amp: auto -> float32 ({device.type} lacks native bf16: needs {native}; amp: true forces it)"
    if amp:
        return amp_dtype, f"amp: true -> {amp_dtype} autocast"
    return None, "amp: false -> float32"
