"""What the CPU is and offers for bf16, and how busy the machine is (for the
demo, the benchmarks and `amp-engine info`).

Mixed precision on a CPU pays off only with native bf16 math: AVX512-BF16
(bf16 dot-product instructions) or AMX (tile matrix units). Without them
oneDNN converts bf16 to fp32 around every matmul, and bf16 autocast is
usually slower than plain fp32. The demo and `amp-engine info` say which case
a machine is in, so a slow AMP run is explained rather than hidden.
"""
from __future__ import annotations

import os
import platform

import torch

BF16_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty off Linux)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_support() -> dict:
    """{flags: {name: bool}, capability, native_bf16, summary} for this CPU.

    `capability` is the vector ISA torch's own kernels dispatch to
    (torch.backends.cpu.get_cpu_capability()); `native_bf16` is True with
    AVX512-BF16 or AMX-BF16.
    """
    flags = cpu_flags()
    found = {f: f in flags for f in BF16_FLAGS}
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch or an exotic platform
        capability = "unknown"
    known = bool(flags)
    native = found["avx512_bf16"] or found["amx_bf16"]
    if found["amx_bf16"]:
        summary = "AMX-BF16 tile units: bf16 matmuls run natively, bf16 autocast should be faster than fp32"
    elif found["avx512_bf16"]:
        summary = ("AVX512-BF16 dot products: bf16 matmuls run natively; bf16 autocast can beat "
                   "fp32 once the matmuls outweigh the casts it adds")
    elif known:
        summary = ("no native bf16 math (neither AVX512-BF16 nor AMX): bf16 is converted to fp32 "
                   "around every matmul, so bf16 autocast is usually slower than fp32 on this CPU")
    else:
        summary = "CPU flags unknown (no /proc/cpuinfo): cannot tell whether bf16 math is native"
    return {"flags": found, "capability": capability, "native_bf16": native if known else None,
            "summary": summary}


def busy_cores() -> float | None:
    """The 1-minute load average (runnable processes), None where unknown."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def default_threads(processes: int = 1) -> tuple[int, str]:
    """(threads, why) for the CPU runs of one of ``processes`` processes (torchrun ranks).

    torch's default (one thread per core) is right on an idle machine. On a
    busy one, OpenMP threads wait at every barrier for a thread whose core is
    taken by another process; measured on a shared 2-core machine this made
    each step 3-7x slower than one thread. So: torch's default, minus the cores
    other processes already keep busy, at least 1.
    """
    if processes > 1:  # the ranks share the cores (torchrun also sets OMP_NUM_THREADS=1)
        n = max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // processes))
        return n, f"{n} per process ({processes} processes)"
    n = torch.get_num_threads()
    load = busy_cores()
    cores = os.cpu_count() or n
    if load is None or load < 0.5:
        return n, f"{n} (torch's default)"
    free = max(1, min(n, int(cores - load + 0.5)))
    if free == n:
        return n, f"{n} (torch's default)"
    return free, f"{free} of {n}: the machine is busy (load {load:.1f} on {cores} cores)"


def cpu_model() -> str:
    """The CPU's marketing name (from /proc/cpuinfo; platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
