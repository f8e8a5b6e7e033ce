"""CPU-side checks for device mixing and host synchronisation, for code that will run on a GPU.

`DeviceGuard` is a TorchDispatchMode that records every aten op and fails on any op where a host tensor (other
than a 0-dim scalar) meets a tensor on another device. Run the code under test with its device tensors on `meta`:
on a machine without a GPU this is the stand-in for CUDA, and a host tensor left in the step shows up as a mixed
op (CUDA would either fail there or copy it, with a sync, on every step).

Two kinds of host sync hide from a dispatch mode, and `HostReads` (a TorchFunctionMode the guard enters with
itself) sees both: reads of a tensor's values by Python (`tolist()`, `item()`, `int(t)`, `bool(t)`...: on a CPU
tensor they reach no aten op at all), and whatever runs inside the project's opaque custom ops
(`torch.ops.rayinfer.*`), whose bodies it runs in the open so their inner ops and reads are logged too.
"""
from __future__ import annotations

import collections

import torch
from torch._library.custom_ops import OPDEFS
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rayinfer.engine.cuda_graphs import HOST_SYNCING

T = torch.Tensor
HOST_READS = {T.tolist: "tolist", T.item: "item", T.__int__: "int", T.__float__: "float", T.__bool__: "bool",
              T.__index__: "index", T.numpy: "numpy"}


def opaque_body(func):
    """The Python body of a project custom op (`rayinfer::name`), or None for any other function."""
    name = getattr(func, "_qualified_op_name", None) or getattr(getattr(func, "_schema", None), "name", None)
    if name is None or not name.startswith("rayinfer::"):
        return None
    return OPDEFS[name]._init_fn


class HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.reads: collections.Counter = collections.Counter()  # "tolist" -> times
        self.opened: collections.Counter = collections.Counter()  # custom op name -> times run in the open

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            self.reads[HOST_READS[func]] += 1
        body = opaque_body(func)
        if body is not None:
            self.opened[str(func)] += 1
            with self:  # the body's own calls, under this mode again
                return body(*args, **kwargs)
        return func(*args, **kwargs)


class DeviceGuard(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list = []  # every aten op run, in order (inside opaque custom ops too)
        self.host = HostReads()

    def __enter__(self):
        self.host.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self.host.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        devices = {a.device.type for a in tensors if not (a.device.type == "cpu" and a.dim() == 0)}
        assert len(devices) <= 1, f"{func} mixes devices {sorted(devices)}"
        self.ops.append(func)
        return func(*args, **kwargs)

    def syncs(self) -> list[str]:
        """Ops that make the host wait for a device value (the list CUDA graph capture refuses too), and the
        host's own reads of tensor values."""
        return [str(o) for o in self.ops if o.overloadpacket in HOST_SYNCING] + \
            [f"Tensor.{name}" for name, n in self.host.reads.items() for _ in range(n)]
