"""A CPU-side check for device mixing: a TorchDispatchMode that records every aten op and fails on
any op where a host tensor (other than a 0-dim scalar) meets a tensor on another device.

Run the code under test with its device tensors on `meta`: on a machine without a GPU this is the
stand-in for CUDA, and a host tensor left in the step shows up as a mixed op (CUDA would either
fail there or copy it, with a sync, on every step)."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rayinfer.engine.cuda_graphs import HOST_SYNCING


class DeviceGuard(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list = []  # every aten op run, in order

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        devices = {a.device.type for a in tensors if not (a.device.type == "cpu" and a.dim() == 0)}
        assert len(devices) <= 1, f"{func} mixes devices {sorted(devices)}"
        self.ops.append(func)
        return func(*args, **kwargs)

    def syncs(self) -> list[str]:
        """Ops that make the host wait for a device value (the list CUDA graph capture refuses too)."""
        return [str(o) for o in self.ops if o.overloadpacket in HOST_SYNCING]
