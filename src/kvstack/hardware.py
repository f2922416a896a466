"""What this machine's arithmetic is fast at, read once.

bfloat16 matrix products are several times faster than float32 on a CPU with AMX or AVX512-BF16, and tens
of times slower on one without (they are emulated): on a 2-core AMD EPYC without AVX-512, a 2048-square
bf16 product takes over 2 s against 0.11 s in float32. Code that chooses bf16 for speed asks here first.
"""

from __future__ import annotations

import functools

from kvstack.lazy_import import lazy_module

torch = lazy_module("torch")

__all__ = ["cpu_has_fast_bf16", "fast_bf16"]


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX512-BF16)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 products on ``device`` are faster than float32 (CUDA with bf16 support, or a CPU
    with native bf16)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and cpu_has_fast_bf16()
