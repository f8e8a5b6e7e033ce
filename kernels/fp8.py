"""FP8 (e4m3) block quantisation and the linear layer that consumes it.

DeepSeek's checkpoints store a linear weight as float8_e4m3fn plus `weight_scale_inv`, one fp32
scale per 128x128 block (dequantised = block x scale). Activations are quantised per token in
1x128 groups. `linear` (and `grouped_linear` for routed experts) is the one entry point: a float
weight is a plain matmul; an FP8 weight with its scale runs, on CUDA, on the first native backend
(`fp8_native`: DeepGEMM, then torch's block-scaled `_scaled_mm`) that passed its health probe and
whose preconditions hold for these operands; else (CPU, or nothing healthy) on the reference, which
dequantises the weight and is exact up to the activation's own precision.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from rayinfer.kernels import backends, fp8_native, probe

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


# backend -> (precondition check, call on quantised operands); tried in this order.
_NATIVE = {
    "deep_gemm": (fp8_native.deep_gemm_preconditions, fp8_native.deep_gemm_linear),
    "scaled_mm": (fp8_native.scaled_mm_preconditions, fp8_native.scaled_mm_linear),
}


def native_backends(x: torch.Tensor) -> list[str]:
    """Native FP8 backends worth probing for `x`'s device (installed, right GPU); none on CPU."""
    if not x.is_cuda:
        return []
    return [n for n in _NATIVE if n != "deep_gemm" or backends.installed("deep_gemm")]


def linear_backend(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> str:
    """The backend `linear` uses for these operands: the first native one that is healthy and applicable."""
    for name in native_backends(x):
        check, _ = _NATIVE[name]
        if check(x, weight, scale_inv) is None and probe.healthy(name):
            return name
    return "reference"


def linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T; FP8 is chosen by the weight's dtype and its attached block scale."""
    if scale_inv is None:
        return F.linear(x, weight)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    name = linear_backend(x2, weight, scale_inv)
    if name == "reference":
        if x2.is_cuda:
            _warn_dequantising(tuple(weight.shape))
        out = F.linear(x2, dequantize_weight_blocks(weight, scale_inv, x.dtype))
    else:
        out = _NATIVE[name][1](*quantize_act_groups(x2), weight, scale_inv).to(x.dtype)
    return out.view(*lead, weight.shape[0])


@functools.cache
def _warn_dequantising(shape: tuple[int, int]) -> None:
    probe.log.warning("no native FP8 GEMM is healthy and applicable for weight %s: dequantising it per call "
                      "(slow; see kernels.probe verdicts)", shape)


def grouped_linear(x: torch.Tensor, counts: list[int], weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rows of x [sum(counts), K] grouped by expert; weight [E, N, K] FP8, scale [E, N/128, K/128] -> [sum, N].

    One grouped GEMM (DeepGEMM's contiguous layout) where healthy and applicable, else one `linear` per
    non-empty group (each on its own best backend)."""
    if x.is_cuda and x.shape[0] and backends.installed("deep_gemm") and \
            fp8_native.deep_gemm_preconditions(x, weight[0], scale[0]) is None and probe.healthy("deep_gemm_grouped"):
        return fp8_native.deep_gemm_grouped_contiguous(*quantize_act_groups(x), counts, weight, scale).to(x.dtype)
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for e, n in enumerate(counts):
        if n:
            out[start:start + n] = linear(x[start:start + n], weight[e], scale[e])
            start += n
    return out


def grouped_linear_masked(x: torch.Tensor, masked_m: list[int], weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [G, m, K] with the first masked_m[g] rows of group g valid (decode's padded layout) -> [G, m, N];
    rows past masked_m are unspecified."""
    g, m, k = x.shape
    if x.is_cuda and g and backends.installed("deep_gemm") and \
            fp8_native.deep_gemm_preconditions(x[0], weight[0], scale[0]) is None and probe.healthy("deep_gemm_grouped"):
        xq, xs = quantize_act_groups(x.reshape(g * m, k))
        mm = torch.tensor(masked_m, device=x.device)
        return fp8_native.deep_gemm_grouped_masked(xq.view(g, m, k), xs.view(g, m, -1), mm, max(1, max(masked_m)),
                                                   weight, scale).to(x.dtype)
    out = x.new_zeros(g, m, weight.shape[1])
    for i, n in enumerate(masked_m):
        if n:
            out[i, :n] = linear(x[i, :n], weight[i], scale[i])
    return out
