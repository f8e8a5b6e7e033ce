"""Rotary position embedding for MLA's decoupled rope dims, plain or YaRN-scaled.

Owns the inverse-frequency computation (matching transformers' yarn rule, including the
attention factor folded into cos/sin) and the rotation itself. Pairs are taken interleaved
(DeepSeek's checkpoint layout, `rope_interleave`) or as halves; the rotated output is always
laid out as [first of each pair | second of each pair]. Queries and keys share the layout, so
their dot products, and the cached rope keys, are layout-independent.
"""
from __future__ import annotations

import math

import torch

from rayinfer.config import RopeConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_factor(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the factor scaling cos/sin."""
    # Always fp32 on the CPU: built under a meta/cuda default device or a low-precision model
    # dtype, the tables would lose the precision YaRN's long-range positions need.
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    if rope.kind == "default":
        return 1.0 / pos_freqs, 1.0
    if rope.attention_factor is not None:
        factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        factor = _yarn_mscale(rope.factor, rope.mscale) / _yarn_mscale(rope.factor, rope.mscale_all_dim)
    else:
        factor = _yarn_mscale(rope.factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 keeps the original frequency, 0 interpolates it fully
    inv = (1.0 / (rope.factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv, factor


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables grown on demand; `forward(x[..., T, H, D], positions[T])`."""

    def __init__(self, rope: RopeConfig, dim: int, interleave: bool):
        super().__init__()
        # A plain attribute, not a buffer: `model.to(bfloat16)` or `to_empty` must never touch it.
        self.inv_freq, self.factor = inv_freq_and_factor(rope, dim)
        self.interleave = interleave
        self._cos = self._sin = None

    def _tables(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] < n or self._cos.device != device:
            size = max(n, 2 * (0 if self._cos is None else self._cos.shape[0]), 256)
            freqs = torch.arange(size, device=device, dtype=torch.float32)[:, None] * self.inv_freq.to(device)[None]
            self._cos, self._sin = freqs.cos() * self.factor, freqs.sin() * self.factor  # [P, D/2]
        return self._cos, self._sin

    def reserve(self, n: int, device) -> None:
        """Builds the tables for positions < n now: a captured graph reads them and must never see them regrow."""
        self._tables(n, device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, num_positions: int | None = None,
                derived: dict | None = None) -> torch.Tensor:
        """`num_positions`: a bound on positions known on the host; without it the largest is read from the device.
        `derived`: the batch's per-step dict (`ForwardBatch.derived`), where the positions' cos/sin are kept for every layer."""
        derived = {} if derived is None else derived
        key = ("rope", x.dtype)
        if key not in derived:
            if num_positions is None:
                num_positions = int(positions.max()) + 1 if positions.numel() else 1
            cos_t, sin_t = self._tables(max(num_positions, 1), x.device)
            # [T, 1, D/2], broadcast over heads
            derived[key] = (cos_t[positions].to(x.dtype).unsqueeze(-2), sin_t[positions].to(x.dtype).unsqueeze(-2))
        cos, sin = derived[key]
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
