"""Grouped expert FFN: `down(silu(gate(x)) * up(x))` over tokens sorted by expert.

Two entry points. `sorted_ffn(x, offs, ...)` is what the model calls: rows of `x` sorted by local
slot, `offs[s]` the end row of slot s as a tensor on x's device, so routing never leaves the
device. It runs as one `torch._grouped_mm` per projection on CUDA bf16 (Hopper), with no host
read; elsewhere (or where its health probe failed) as one opaque op (`rayinfer::grouped_ffn`) whose kernel reads the
offsets on the host (free on CPU: there is no device to wait for) and runs `grouped_ffn`. FP8 experts read them
too (their grouped GEMMs take host counts; a host sync per MoE layer on CUDA, still to remove).
`grouped_ffn(x, counts, ...)` takes host counts: with float weights, two batched matmuls over
padded slots when the padding is cheap (low precision, GPU) or one fused gate/up and one down matmul
per non-empty slot (fp32 on CPU); FP8 weights (with their block scales) run as grouped FP8 GEMMs through `kernels.fp8`:
DeepGEMM's contiguous layout for many rows (prefill), its masked layout over padded slots for few
(decode), per-slot block-scaled GEMMs where DeepGEMM is not healthy; the weights are never
dequantised whole per call on a GPU. Routing weights, when given per row, scale the activation
before the down projection (fp32 math, one rounding), as the weighted sum of expert outputs would.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rayinfer.kernels import fp8, probe


def ffn_backend(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, fp8_weights: bool) -> str:
    """"grouped_mm" (device offsets, no host read) where torch's grouped GEMM runs natively, else "host"."""
    if fp8_weights or not x.is_cuda or x.dtype != torch.bfloat16 or w13.dtype != torch.bfloat16:
        return "host"
    aligned = x.shape[1] % 8 == 0 and w2.shape[2] % 8 == 0  # every row stride a multiple of 16 bytes
    if not aligned or torch.cuda.get_device_capability(x.device)[0] < 9:
        return "host"
    return "grouped_mm" if probe.healthy("grouped_mm") else "host"


def sorted_ffn(x: torch.Tensor, offs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
               w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
               row_weights: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """x [M, H] sorted by slot; offs [S] int32 end row of each slot (rows past offs[-1]: padding) -> [M, H].

    `row_weights` [M] (fp32): each row's routing weight, applied to its activation before the down
    projection (in fp32, rounded once), so no [M, H] fp32 product is formed after it. Output rows past
    offs[-1] are unspecified. `backend` overrides the choice (tests run the CUDA formulation on CPU:
    `torch._grouped_mm` runs there too)."""
    fp8_weights = w13_scale is not None and w2_scale is not None
    backend = backend or ffn_backend(x, w13, w2, fp8_weights)
    if backend == "grouped_mm":
        act = activation(torch._grouped_mm(x, w13.transpose(1, 2), offs=offs), row_weights)  # [M, I]
        return torch._grouped_mm(act, w2.transpose(1, 2), offs=offs)
    return torch.ops.rayinfer.grouped_ffn(x, offs, w13, w2, w13_scale, w2_scale, row_weights)


def activation(h: torch.Tensor, row_weights: torch.Tensor | None) -> torch.Tensor:
    """silu(gate) * up of fused gate/up rows h [M, 2I], times each row's weight (fp32 math, one rounding)."""
    gate, up = h.chunk(2, dim=-1)
    act = F.silu(gate) * up
    if row_weights is None:
        return act
    return (act * row_weights.unsqueeze(1)).to(h.dtype)


@torch.library.custom_op("rayinfer::grouped_ffn", mutates_args=())
def _host_offsets_ffn(x: torch.Tensor, offs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      w13_scale: torch.Tensor | None, w2_scale: torch.Tensor | None,
                      row_weights: torch.Tensor | None) -> torch.Tensor:
    counts = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    n = sum(counts)
    if n == x.shape[0]:  # every row served here (a single-rank model): no padding rows to fill
        return grouped_ffn(x, counts, w13, w2, w13_scale, w2_scale, row_weights)
    out = x.new_zeros(x.shape[0], w2.shape[1])
    out[:n] = grouped_ffn(x[:n], counts, w13, w2, w13_scale, w2_scale,
                          None if row_weights is None else row_weights[:n])
    return out


@_host_offsets_ffn.register_fake
def _(x, offs, w13, w2, w13_scale, w2_scale, row_weights):
    return x.new_empty(x.shape[0], w2.shape[1])


def grouped_ffn(x: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor,
                w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, H] grouped by slot; w13 [S, 2I, H] (gate rows then up rows); w2 [S, H, I] -> [N, H].

    Float weights: one batched matmul per projection over every slot padded to the largest count
    when that padding is cheap and batched calls pay (low precision or a GPU: one call streams all
    the weights), else one matmul per non-empty slot written in place, with the activation done
    once over all rows in between."""
    assert len(counts) == w13.shape[0] and sum(counts) == x.shape[0]
    if not x.shape[0]:
        return x.new_empty(0, w2.shape[1])
    width, slots = max(counts), len(counts)
    if w13_scale is not None and w2_scale is not None:
        few = width <= 64 and width * sum(1 for n in counts if n) <= 2 * x.shape[0]
        return _fp8_ffn(x, counts, w13, w2, w13_scale, w2_scale, row_weights, masked=few)
    batched = (x.is_cuda or x.dtype != torch.float32) and width * slots <= 4 * x.shape[0]
    if batched:
        return _padded_ffn(x, counts, w13, w2, row_weights)
    return _slot_loop_ffn(x, counts, w13, w2, row_weights)


def padded_positions(counts: list[int], width: int, device) -> torch.Tensor:
    """Row i of slot s (grouped rows) -> row s * width + i of the padded [S * width] layout."""
    c = torch.tensor(counts, device=device)
    slot = torch.repeat_interleave(torch.arange(len(counts), device=device), c, output_size=sum(counts))
    starts = torch.cumsum(c, 0) - c
    return torch.arange(slot.shape[0], device=device) - starts[slot] + slot * width


def _scatter_rows(t: torch.Tensor, pos: torch.Tensor, rows: int) -> torch.Tensor:
    """`t`'s rows placed at `pos` of a zero tensor of `rows` rows."""
    out = t.new_zeros(rows, *t.shape[1:])
    out[pos] = t
    return out


def _padded_ffn(x, counts, w13, w2, row_weights) -> torch.Tensor:
    """Every slot padded to the largest count, two batched matmuls (unused slots' weights are read, not copied)."""
    width, slots = max(counts), len(counts)
    pos = padded_positions(counts, width, x.device)
    rw = None if row_weights is None else _scatter_rows(row_weights, pos, slots * width)
    h = torch.bmm(_scatter_rows(x, pos, slots * width).view(slots, width, -1), w13.transpose(1, 2))
    act = activation(h.view(slots * width, -1), rw).view(slots, width, -1)  # padding rows stay zero
    return torch.bmm(act, w2.transpose(1, 2)).view(-1, w2.shape[1])[pos]


def _slot_loop_ffn(x, counts, w13, w2, row_weights) -> torch.Tensor:
    """One gate/up and one down matmul per non-empty slot, each written in place; one activation pass."""
    h = x.new_empty(x.shape[0], w13.shape[1])
    out = x.new_empty(x.shape[0], w2.shape[1])
    segments, start = [], 0
    for s, n in enumerate(counts):
        if n:
            torch.mm(x[start:start + n], w13[s].t(), out=h[start:start + n])
            segments.append((s, start, n))
            start += n
    act = activation(h, row_weights)
    for s, start, n in segments:
        torch.mm(act[start:start + n], w2[s].t(), out=out[start:start + n])
    return out


def _fp8_ffn(x, counts, w13, w2, s13, s2, row_weights, masked: bool) -> torch.Tensor:
    if not masked:
        act = activation(fp8.grouped_linear(x, counts, w13, s13), row_weights)  # [N, I]
        return fp8.grouped_linear(act, counts, w2, s2)
    width, slots = max(counts), len(counts)
    pos = padded_positions(counts, width, x.device)
    rw = None if row_weights is None else _scatter_rows(row_weights, pos, slots * width)
    h = fp8.grouped_linear_masked(_scatter_rows(x, pos, slots * width).view(slots, width, -1), counts, w13, s13)
    act = activation(h.reshape(slots * width, -1), rw).view(slots, width, -1)  # [S, width, I]
    y = fp8.grouped_linear_masked(act, counts, w2, s2)  # [S, width, H]
    return y.reshape(-1, w2.shape[1])[pos]


def probe_grouped_mm() -> None:
    """Health probe (run in a child by kernels.probe): `sorted_ffn`'s torch._grouped_mm formulation against the
    per-slot reference on a small bf16 batch, an empty slot and padding rows included."""
    g = torch.Generator(device="cuda").manual_seed(0)
    slots, h, i = 3, 256, 128
    w13 = (torch.randn(slots, 2 * i, h, device="cuda", generator=g) * h ** -0.5).bfloat16()
    w2 = (torch.randn(slots, h, i, device="cuda", generator=g) * i ** -0.5).bfloat16()
    counts = [40, 0, 17]
    x = torch.randn(sum(counts) + 7, h, device="cuda", generator=g).bfloat16()  # 7 padding rows past offs[-1]
    offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    got = sorted_ffn(x, offs, w13, w2, backend="grouped_mm")[: sum(counts)]
    probe.check_close(got, _slot_loop_ffn(x[: sum(counts)].float(), counts, w13.float(), w2.float(), None),
                      "torch._grouped_mm expert FFN")
