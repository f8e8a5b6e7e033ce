"""Grouped expert FFN: `down(silu(gate(x)) * up(x))` over tokens sorted by expert.

Rows of `x` arrive grouped by local expert slot (`counts[s]` rows for slot s, in slot order).
The reference runs one fused gate/up matmul and one down matmul per non-empty slot; the
DeepGEMM backend would run the same as one grouped FP8 GEMM over 128-aligned segments.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rayinfer.kernels import fp8


def grouped_ffn(x: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor,
                w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, H] grouped by slot; w13 [S, 2I, H] (gate rows then up rows); w2 [S, H, I] -> [N, H]."""
    assert len(counts) == w13.shape[0] and sum(counts) == x.shape[0]
    if w13_scale is None and w2_scale is None and x.shape[0] and \
            max(counts) <= 64 and max(counts) * sum(1 for n in counts if n) <= 2 * x.shape[0]:
        return _padded_ffn(x, counts, w13, w2)
    out = torch.empty(x.shape[0], w2.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for s, n in enumerate(counts):
        if n == 0:
            continue
        seg = x[start:start + n]
        h = fp8.linear(seg, w13[s], None if w13_scale is None else w13_scale[s])  # [n, 2I]
        gate, up = h.chunk(2, dim=-1)
        out[start:start + n] = fp8.linear(F.silu(gate) * up, w2[s], None if w2_scale is None else w2_scale[s])
        start += n
    return out


def _padded_ffn(x: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Few rows per slot (decode): every used slot padded to the largest count, two batched matmuls.

    Reading the expert weights dominates there, and one batched call streams them faster than one
    small matmul per slot; the padding is bounded by the caller (at most 2x the rows)."""
    used = [s for s, n in enumerate(counts) if n]
    width = max(counts)
    pos = torch.cat([torch.arange(counts[s], device=x.device) + i * width for i, s in enumerate(used)])
    xs = x.new_zeros(len(used) * width, x.shape[1])
    xs[pos] = x
    if len(used) < len(counts):
        w13, w2 = w13[used], w2[used]
    gate, up = torch.bmm(xs.view(len(used), width, -1), w13.transpose(1, 2)).chunk(2, dim=-1)
    return torch.bmm(F.silu(gate) * up, w2.transpose(1, 2)).view(-1, w2.shape[1])[pos]
