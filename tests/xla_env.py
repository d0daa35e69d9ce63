"""The XLA flags of the test processes: JAX's host devices, and cheap compilation.

The suite's time is mostly XLA compiling tiny programs: skipping LLVM's expensive optimization passes cut a 2-step
tiny_pretrain run's CPU time by 15% (148.6 -> 126.3 s), and LLVM's optimization level 0 on top cut three slow test
files from 257 to 191 s (the two-process test 104 -> 61 s; the compute-bound 8192-token attention tests lose a little:
26 -> 32 s), without changing results (XLA's CPU backend compiles without fast-math, so LLVM may not reorder float
arithmetic at any level)."""

from __future__ import annotations

from typing import Optional

FAST_COMPILE = "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0"


def xla_flags(host_devices: Optional[int]) -> str:
    """XLA_FLAGS for a test process with `host_devices` CPU devices (None: XLA's default, one)."""
    devices = f"--xla_force_host_platform_device_count={host_devices} " if host_devices else ""
    return devices + FAST_COMPILE
