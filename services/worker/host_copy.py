"""Host arrays to the device without waiting for the GPU.

A plain `tensor.to("cuda")` from pageable memory synchronises with the stream, which would stall the
overlapped engine (engine.py). Arrays of one dtype are packed into one pinned buffer and sent with one
non-blocking copy; the results are views of that one device buffer.

Every view starts on a 16-byte boundary. Triton compiles a kernel once per combination of its pointer
arguments' alignment (16 bytes or not), so views at offsets that follow the step's array sizes made the
prefill-attention and rotary kernels compile new variants, for seconds each on the engine thread, at steps
that no warm-up could foresee: the first run on a fresh machine was slow for its first tens of seconds.
"""
from __future__ import annotations

import numpy as np
import torch

ALIGN_BYTES = 16


def aligned_offsets(sizes: list[int], itemsize: int) -> tuple[list[int], int]:
    """Where each array starts in the packed buffer (elements, each on an ALIGN_BYTES boundary) and its length."""
    step = max(1, ALIGN_BYTES // itemsize)
    starts, at = [], 0
    for size in sizes:
        at = -(-at // step) * step
        starts.append(at)
        at += size
    return starts, at


def to_device(device: torch.device, *arrays: np.ndarray) -> list[torch.Tensor]:
    """Arrays of one dtype -> device tensors of the same shapes, through one pinned buffer and one copy."""
    arrays_np = [np.asarray(a) for a in arrays]
    dtype = np.result_type(*arrays_np) if arrays_np else np.dtype(np.int64)
    sizes = [a.size for a in arrays_np]
    starts, total = aligned_offsets(sizes, dtype.itemsize)
    packed = np.empty(total, dtype)            # (the padding between arrays is never read)
    for a, at in zip(arrays_np, starts):
        packed[at:at + a.size] = a.ravel()
    flat = torch.from_numpy(packed)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    return [flat[at:at + a.size].view(a.shape) for a, at in zip(arrays_np, starts)]
