"""FP8 (e4m3) block quantisation and the linear layer that consumes it.

DeepSeek's checkpoints store a linear weight as float8_e4m3fn plus `weight_scale_inv`, one fp32
scale per 128x128 block (dequantised = block x scale). Activations are quantised per token in
1x128 groups. `linear` is the one entry point: a float weight is a plain matmul; an FP8 weight
with its scale goes to DeepGEMM when available, else to the dequantise-then-matmul reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rayinfer.kernels import backends

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128


def _expand_blocks(scale: torch.Tensor, shape: tuple[int, int], block: int) -> torch.Tensor:
    return scale.repeat_interleave(block, 0)[: shape[0]].repeat_interleave(block, 1)[:, : shape[1]]


def quantize_weight_blocks(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (w_fp8 [N, K], scale_inv [ceil(N/b), ceil(K/b)] fp32), DeepSeek's checkpoint layout."""
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = torch.zeros(nb * block, kb * block, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    blocks = padded.view(nb, block, kb, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [nb, kb]
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(nb * block, kb * block)
    return q[:n, :k].to(FP8).contiguous(), scale_inv


def dequantize_weight_blocks(w: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.float32,
                             block: int = BLOCK) -> torch.Tensor:
    """Inverse of `quantize_weight_blocks`: w_fp8 [N, K] x scale_inv [N/b, K/b] -> w [N, K]."""
    return (w.float() * _expand_blocks(scale_inv.float(), tuple(w.shape), block)).to(dtype)


def quantize_act_groups(x: torch.Tensor, group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K % group == 0) -> (x_fp8 [M, K], scales [M, K/group] fp32), per-token 1x128 groups."""
    m, k = x.shape
    assert k % group == 0, f"activation width {k} is not a multiple of {group}"
    g = x.float().view(m, k // group, group)
    scales = g.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX  # [M, K/g]
    return (g / scales[..., None]).clamp(-FP8_MAX, FP8_MAX).view(m, k).to(FP8), scales


def linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T; FP8 is chosen by the weight's dtype and its attached block scale."""
    if scale_inv is None:
        return F.linear(x, weight)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if k % BLOCK == 0 and backends.usable("deep_gemm", x2, weight):
        out = _deep_gemm_linear(x2, weight, scale_inv)
    else:
        out = F.linear(x2, dequantize_weight_blocks(weight, scale_inv, x.dtype))
    return out.view(*lead, weight.shape[0])


def _deep_gemm_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    dg = backends.module("deep_gemm")
    xq, xs = quantize_act_groups(x)
    # DeepGEMM wants the activation scales column-major and TMA-aligned.
    xs = dg.get_mn_major_tma_aligned_tensor(xs) if hasattr(dg, "get_mn_major_tma_aligned_tensor") else xs
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.bfloat16, device=x.device)
    dg.fp8_gemm_nt((xq, xs), (weight, scale_inv), out)
    return out.to(x.dtype)
