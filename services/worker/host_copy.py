"""Host arrays to the device without waiting for the GPU.

A plain `tensor.to("cuda")` from pageable memory synchronises with the stream, which would stall the
overlapped engine (engine.py). Arrays of one dtype are packed into one pinned buffer and sent with one
non-blocking copy; the results are views of that one device buffer.
"""
from __future__ import annotations

import numpy as np
import torch


def to_device(device: torch.device, *arrays: np.ndarray) -> list[torch.Tensor]:
    """Arrays of one dtype -> device tensors of the same shapes, through one pinned buffer and one copy."""
    flat = torch.from_numpy(np.concatenate([np.asarray(a).ravel() for a in arrays]))
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    out, at = [], 0
    for a in arrays:
        size = int(np.prod(np.shape(a), dtype=np.int64))
        out.append(flat[at:at + size].view(np.shape(a)))
        at += size
    return out
