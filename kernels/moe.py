"""Grouped expert FFN: `down(silu(gate(x)) * up(x))` over tokens sorted by expert.

Two entry points. `sorted_ffn(x, offs, ...)` is what the model calls: rows of `x` sorted by local
slot, `offs[s]` the end row of slot s as a tensor on x's device, so routing never leaves the
device. It runs as one `torch._grouped_mm` per projection on CUDA bf16 (Hopper), with no host
read; elsewhere as one opaque op (`rayinfer::grouped_ffn`) whose kernel reads the offsets on the
host (free on CPU: there is no device to wait for) and runs `grouped_ffn`. FP8 experts read them
too (their grouped GEMMs take host counts; a host sync per MoE layer on CUDA, still to remove).
`grouped_ffn(x, counts, ...)` takes host counts: with float weights, two batched matmuls over
padded slots when rows are few (decode) or one fused gate/up and one down matmul per non-empty
slot; FP8 weights (with their block scales) run as grouped FP8 GEMMs through `kernels.fp8`:
DeepGEMM's contiguous layout for many rows (prefill), its masked layout over padded slots for few
(decode), per-slot block-scaled GEMMs where DeepGEMM is not healthy; the weights are never
dequantised whole per call on a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rayinfer.kernels import fp8


def ffn_backend(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, fp8_weights: bool) -> str:
    """"grouped_mm" (device offsets, no host read) where torch's grouped GEMM runs natively, else "host"."""
    if fp8_weights or not x.is_cuda or x.dtype != torch.bfloat16 or w13.dtype != torch.bfloat16:
        return "host"
    aligned = x.shape[1] % 8 == 0 and w2.shape[2] % 8 == 0  # every row stride a multiple of 16 bytes
    return "grouped_mm" if aligned and torch.cuda.get_device_capability(x.device)[0] >= 9 else "host"


def sorted_ffn(x: torch.Tensor, offs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
               w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
               backend: str | None = None) -> torch.Tensor:
    """x [M, H] sorted by slot; offs [S] int32 end row of each slot (rows past offs[-1]: padding) -> [M, H].

    Output rows past offs[-1] are unspecified. `backend` overrides the choice (tests run the CUDA
    formulation on CPU: `torch._grouped_mm` runs there too)."""
    fp8_weights = w13_scale is not None and w2_scale is not None
    backend = backend or ffn_backend(x, w13, w2, fp8_weights)
    if backend == "grouped_mm":
        gate, up = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)  # [M, I] each
        return torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)
    return torch.ops.rayinfer.grouped_ffn(x, offs, w13, w2, w13_scale, w2_scale)


@torch.library.custom_op("rayinfer::grouped_ffn", mutates_args=())
def _host_offsets_ffn(x: torch.Tensor, offs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      w13_scale: torch.Tensor | None, w2_scale: torch.Tensor | None) -> torch.Tensor:
    counts = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    n = sum(counts)
    if n == x.shape[0]:  # every row served here (a single-rank model): no padding rows to fill
        return grouped_ffn(x, counts, w13, w2, w13_scale, w2_scale)
    out = x.new_zeros(x.shape[0], w2.shape[1])
    out[:n] = grouped_ffn(x[:n], counts, w13, w2, w13_scale, w2_scale)
    return out


@_host_offsets_ffn.register_fake
def _(x, offs, w13, w2, w13_scale, w2_scale):
    return x.new_empty(x.shape[0], w2.shape[1])


def grouped_ffn(x: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor,
                w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, H] grouped by slot; w13 [S, 2I, H] (gate rows then up rows); w2 [S, H, I] -> [N, H]."""
    assert len(counts) == w13.shape[0] and sum(counts) == x.shape[0]
    few = x.shape[0] and max(counts) <= 64 and max(counts) * sum(1 for n in counts if n) <= 2 * x.shape[0]
    if w13_scale is not None and w2_scale is not None:
        return _fp8_ffn(x, counts, w13, w2, w13_scale, w2_scale, masked=bool(few))
    if few:
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


def _fp8_ffn(x, counts, w13, w2, s13, s2, masked: bool) -> torch.Tensor:
    if not masked:
        gate, up = fp8.grouped_linear(x, counts, w13, s13).chunk(2, dim=-1)  # [N, I] each
        return fp8.grouped_linear(F.silu(gate) * up, counts, w2, s2)
    width = max(counts)
    pos = torch.cat([torch.arange(n, device=x.device) + s * width for s, n in enumerate(counts) if n])
    xs = x.new_zeros(len(counts) * width, x.shape[1])
    xs[pos] = x
    gate, up = fp8.grouped_linear_masked(xs.view(len(counts), width, -1), counts, w13, s13).chunk(2, dim=-1)
    y = fp8.grouped_linear_masked(F.silu(gate) * up, counts, w2, s2)  # [S, width, H]
    return y.reshape(-1, w2.shape[1])[pos]
