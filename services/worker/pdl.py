"""Programmatic dependent launch (Hopper and later): a kernel starts while the one before it drains.

At decode batch sizes a step is ~180-340 kernels of 2-60 us, and each one's launch, ramp-up and tail leave the
memory system idle for a microsecond or more. With PDL the next kernel's programs become resident as soon as
the previous kernel lets them (`gdc_launch_dependents`), start what does not depend on it (the skinny GEMMs
load their first weight tile), and wait (`gdc_wait`) for it to finish and flush its writes before reading
anything it may have produced. Every kernel launched with PDL here waits before its first dependent load and
before its first store, so ordering stays what the stream gives; kernels launched without PDL (torch's) keep
full stream order whatever runs before them.

Where it is on: the skinny decode layers (batches of at most skinny_gemm.LAYER_ROWS rows), which the model runner
runs inside `forced(True)`. There, with decode attention in one kernel, it made steps at batch 1-16 1-3% faster in 3
of 4 runs on lent H200s, and was within +-1% in the fourth and at 17-32 rows (docs/BENCHMARKS.md, "Decode attention in one
kernel" and the sections after it). Elsewhere (ENABLED) it is off: on the cuBLAS layers of 32-64 rows it was 2%
slower to 1% faster, and before the attention kernels were fused it was neutral.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from functools import lru_cache

import torch

try:
    import triton.language as tl
except ImportError:
    tl = None

ENABLED = False
_forced = threading.local()      # a per-thread override of ENABLED (forced), for the kernels launched inside it


@lru_cache(maxsize=None)
def _supported(index: int) -> bool:
    extra = getattr(getattr(tl, "extra", None), "cuda", None)
    return (hasattr(extra, "gdc_wait") and hasattr(extra, "gdc_launch_dependents")
            and torch.cuda.get_device_capability(index)[0] >= 9)


@contextmanager
def forced(on: bool):
    """Kernels launched (or captured) by this thread inside the block use PDL if `on` and the device can."""
    before = getattr(_forced, "on", None)
    _forced.on = on
    try:
        yield
    finally:
        _forced.on = before


def pdl_on(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL now."""
    on = getattr(_forced, "on", None)
    return (ENABLED if on is None else on) and tl is not None and device.type == "cuda" and _supported(device.index or 0)
