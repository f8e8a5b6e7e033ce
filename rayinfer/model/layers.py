"""Building blocks shared by attention, MoE and the transformer: RMSNorm, Embedding, Linear, MLP.

`Linear` holds its weight as stored in the checkpoint: a float tensor, or an FP8 tensor with an
attached `weight_scale_inv` (the kernel picks the FP8 path from that, never from a flag).
Parameters are allocated uninitialised; the loader fills every one of them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rayinfer.kernels import fp8


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale in the input dtype, as the reference implementation does.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class Embedding(nn.Module):
    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        # [ceil(out/128), ceil(in/128)] fp32 for FP8 weights; a buffer so that `to_empty` places it.
        self.register_buffer("weight_scale_inv", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8.linear(x, self.weight, self.weight_scale_inv)
        return y if self.bias is None else y + self.bias

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a float matrix (dequantised when stored in FP8)."""
        if self.weight_scale_inv is None:
            return self.weight.to(dtype)
        return fp8.dequantize_weight_blocks(self.weight, self.weight_scale_inv, dtype)


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN of the first layers and the shared experts."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(hidden, inter)
        self.up_proj = Linear(hidden, inter)
        self.down_proj = Linear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
