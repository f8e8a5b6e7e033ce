"""Varlen causal prefill attention: every prefill sequence of a step in one call, V narrower than Q/K allowed.

Owns the step's varlen metadata (`Varlen`: cumulative lengths, max lengths, and the Triton kernel's
query-block -> sequence map, all built once per step on the host), the backend choice and the torch
backends. Sequence i's queries are rows [cu_q[i], cu_q[i+1]) of q and are the LAST q_len positions of
its context, rows [cu_k[i], cu_k[i+1]) of k and v (chunked prefill over a cached prefix: q_len <= k_len).
Crosses: `varlen_prefill(q [Tq, h, dqk], k [Tk, h, dqk], v [Tk, h, dv], meta, scale) -> [Tq, h, dv]`.
Backends: "triton" (kernels.triton_prefill: CUDA once its health probe passed; CPU tests run it under
TRITON_INTERPRET=1), "torch" (one SDPA call over the sequences padded to the longest, with a mask), and
`reference` (one fp32 softmax per sequence: what tests and the probe hold the others to).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rayinfer.kernels import backends
from rayinfer.kernels.transfer import to_device

BLOCK_M = 64  # queries per Triton program; the block map below is cut at this size
BACKENDS = ("triton", "torch", "reference")


@dataclass
class Varlen:
    q_lens: list[int]
    k_lens: list[int]
    cu_q: torch.Tensor  # [B+1] int32
    cu_k: torch.Tensor  # [B+1] int32
    max_q: int
    max_k: int
    blocks: torch.Tensor | None  # [NB, 2] int32 (sequence, first query) of each BLOCK_M query block; Triton only

    @staticmethod
    def build(q_lens: list[int], k_lens: list[int], device: torch.device, with_blocks: bool) -> "Varlen":
        assert len(q_lens) == len(k_lens) and all(0 < q <= k for q, k in zip(q_lens, k_lens)), (q_lens, k_lens)
        cu = torch.zeros(2, len(q_lens) + 1, dtype=torch.int32)
        cu[0, 1:], cu[1, 1:] = torch.tensor(q_lens).cumsum(0), torch.tensor(k_lens).cumsum(0)
        cu = to_device(cu, device)
        blocks = None
        if with_blocks:
            blocks = to_device(torch.tensor([(i, m) for i, q in enumerate(q_lens) for m in range(0, q, BLOCK_M)],
                                            dtype=torch.int32).view(-1, 2), device)
        return Varlen(list(q_lens), list(k_lens), cu[0], cu[1], max(q_lens), max(k_lens), blocks)


def default_backend(device: torch.device) -> str | None:
    """"triton" on CUDA once its probe passed; None elsewhere: the model keeps its grouped per-shape path.

    On CPU the padded one-call "torch" backend loses to the grouped path (it does ~2.6x the attention work
    on prompts of 50..400 tokens and forgoes SDPA's causal fast path): benchmarks/prefill_attention.py."""
    if device.type != "cuda" or not backends.triton_installed("triton_prefill"):
        return None
    from rayinfer.kernels import probe

    return "triton" if probe.healthy("triton_prefill") else None


def varlen_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Varlen, scale: float,
                   backend: str = "torch") -> torch.Tensor:
    """q [Tq, h, dqk], k [Tk, h, dqk], v [Tk, h, dv] -> [Tq, h, dv] in q's dtype (see the module docstring)."""
    assert q.shape[0] == sum(meta.q_lens) and k.shape[0] == v.shape[0] == sum(meta.k_lens), (q.shape, k.shape)
    if backend == "triton":
        from rayinfer.kernels.triton_prefill import varlen_prefill_triton

        return varlen_prefill_triton(q, k, v, meta, scale)
    if backend == "torch":
        return _padded(q, k, v, meta, scale)
    if backend == "reference":
        return reference(q, k, v, meta, scale)
    raise ValueError(f"unknown prefill attention backend {backend!r}: expected one of {BACKENDS}")


def _padded(q, k, v, meta: Varlen, scale: float) -> torch.Tensor:
    """One SDPA call: sequences padded to the longest, queries right-aligned to their context, V padded to dqk."""
    b, dev = len(meta.q_lens), q.device
    qi, ki = torch.arange(meta.max_q, device=dev), torch.arange(meta.max_k, device=dev)
    q_lens, k_lens = meta.cu_q.diff().long(), meta.cu_k.diff().long()  # [B]
    q_ok = qi[None] < q_lens[:, None]  # [B, Mq]
    k_ok = ki[None] < k_lens[:, None]  # [B, Mk]
    q_idx = torch.where(q_ok, meta.cu_q[:-1, None] + qi[None], 0)  # [B, Mq] rows of q; padding reads row 0
    k_idx = torch.where(k_ok, meta.cu_k[:-1, None] + ki[None], 0)
    pos = (k_lens - q_lens)[:, None] + qi[None]  # [B, Mq] context position of each query
    mask = k_ok[:, None, :] & (ki[None, None, :] <= pos[:, :, None])  # [B, Mq, Mk]
    dqk = q.shape[-1]
    vp = F.pad(v, (0, dqk - v.shape[-1])) if v.shape[-1] < dqk else v
    o = F.scaled_dot_product_attention(q[q_idx].transpose(1, 2), k[k_idx].transpose(1, 2), vp[k_idx].transpose(1, 2),
                                       attn_mask=mask[:, None], scale=scale)  # [B, h, Mq, dqk]
    return o.transpose(1, 2)[q_ok][..., : v.shape[-1]]


def reference(q, k, v, meta: Varlen, scale: float) -> torch.Tensor:
    """One fp32 softmax per sequence, written out in full: slow, plainly right."""
    out, qs, ks = [], 0, 0
    for nq, nk in zip(meta.q_lens, meta.k_lens):
        s = torch.einsum("qhd,khd->hqk", q[qs:qs + nq].float(), k[ks:ks + nk].float()) * scale
        visible = torch.arange(nk)[None, :] <= torch.arange(nk - nq, nk)[:, None]  # [q, k]
        p = s.masked_fill(~visible.to(q.device), float("-inf")).softmax(-1)
        out.append(torch.einsum("hqk,khd->qhd", p, v[ks:ks + nk].float()))
        qs, ks = qs + nq, ks + nk
    return torch.cat(out).to(q.dtype)
