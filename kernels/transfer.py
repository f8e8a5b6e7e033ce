"""Host-built index tensors onto the device without a stream sync: the one way kernels and the model move them.

Step metadata (lengths, tables, row maps) is built on the host; a plain copy from pageable memory would wait for
every kernel already queued, so on CUDA it is staged in pinned memory and copied non-blocking. Crosses: a host
tensor in, the same values on `device` out.
"""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a stream sync: staged in pinned memory, copied non-blocking on CUDA."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
