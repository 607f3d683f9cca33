"""Programmatic dependent launch (Hopper and later): a kernel starts while the one before it drains.

At decode batch sizes a step is ~230 kernels of 2-60 us, and each one's launch, ramp-up and tail leave the
memory system idle for a microsecond or more. With PDL the next kernel's programs become resident as soon as
the previous kernel lets them (`gdc_launch_dependents`), start what does not depend on it (the skinny GEMMs
load their first weight tile), and wait (`gdc_wait`) for it to finish and flush its writes before reading
anything it may have produced. Every kernel launched with PDL here waits before its first dependent load and
before its first store, so ordering stays what the stream gives; kernels launched without PDL (torch's) keep
full stream order whatever runs before them.
"""
from __future__ import annotations

from functools import lru_cache

import torch

try:
    import triton.language as tl
except ImportError:
    tl = None

# Off: measured neutral on the H200 (decode steps at batch 1-16 within +-2% of the same kernels without it,
# docs/BENCHMARKS.md); kept, with its A/B in bench/decode_floor.py, as the base for prefetching more of the next
# kernel's weights into L2 before its wait.
ENABLED = False


@lru_cache(maxsize=None)
def _supported(index: int) -> bool:
    extra = getattr(getattr(tl, "extra", None), "cuda", None)
    return (hasattr(extra, "gdc_wait") and hasattr(extra, "gdc_launch_dependents")
            and torch.cuda.get_device_capability(index)[0] >= 9)


def pdl_on(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL now."""
    return ENABLED and tl is not None and device.type == "cuda" and _supported(device.index or 0)
