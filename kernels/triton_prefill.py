"""Varlen causal flash-attention forward for MLA prefill, as a Triton kernel: one launch per layer for a step.

Each program attends BLOCK_M queries of one sequence for one head, walking that sequence's keys in
BLOCK_N tiles with an online softmax in fp32, and stops at the last key its queries may see (causal,
queries right-aligned to the context: chunked prefill over a cached prefix). Which sequence and which
queries a program owns comes from the step's block map (`prefill.Varlen.blocks`, built once per step on
the host), so no launch waits on the device. Key and query head dims may differ from the value's
(DeepSeek: 192 vs 128): the key width is split into a power-of-two part and a remainder, and values
keep their own width, so nothing is padded in memory. Crosses: the `prefill.varlen_prefill` signature.
Runs under `TRITON_INTERPRET=1` on CPU tensors, which is how it is tested without a GPU; there (triton 3.9)
`tl.dot` of bf16 tiles returns garbage, so the interpreter widens the already-rounded tiles to fp32 first.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rayinfer.kernels import backends, probe
from rayinfer.kernels.prefill import BLOCK_M, Varlen


@triton.jit
def _widen(x, WIDEN: tl.constexpr):
    if WIDEN:
        x = x.to(tl.float32)
    return x


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_q_ptr, cu_k_ptr, blocks_ptr, scale,
                    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
                    DQK: tl.constexpr, DV: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                    WIDEN: tl.constexpr):
    blk, head = tl.program_id(0), tl.program_id(1)
    seq = tl.load(blocks_ptr + 2 * blk)
    first = tl.load(blocks_ptr + 2 * blk + 1)
    q0, k0 = tl.load(cu_q_ptr + seq), tl.load(cu_k_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q0
    k_len = tl.load(cu_k_ptr + seq + 1) - k0
    m = first + tl.arange(0, BLOCK_M)  # [M] queries of this sequence
    qpos = k_len - q_len + m  # their positions in the context
    m_ok = m < q_len
    da = tl.arange(0, DA)
    dv = tl.arange(0, BLOCK_DV)
    q_rows = q_ptr + (q0 + m).to(tl.int64)[:, None] * sq_t + head * sq_h
    qa = _widen(tl.load(q_rows + da[None, :], mask=m_ok[:, None], other=0.0), WIDEN)
    if DB > 0:
        db = DA + tl.arange(0, DB)  # the key width past DA (masked to DQK)
        qb = _widen(tl.load(q_rows + db[None, :], mask=m_ok[:, None] & (db[None, :] < DQK), other=0.0), WIDEN)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # Keys past the block's last query are invisible to all of it; key 0 is visible to every query (q_len <= k_len).
    end = tl.minimum(k_len, k_len - q_len + first + BLOCK_M)
    for n0 in range(0, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)  # [N] key positions
        n_ok = n < k_len
        k_rows = k_ptr + (k0 + n).to(tl.int64)[:, None] * sk_t + head * sk_h
        ka = _widen(tl.load(k_rows + da[None, :], mask=n_ok[:, None], other=0.0), WIDEN)
        s = tl.dot(qa, tl.trans(ka), input_precision=PREC)
        if DB > 0:
            kb = _widen(tl.load(k_rows + db[None, :], mask=n_ok[:, None] & (db[None, :] < DQK), other=0.0), WIDEN)
            s += tl.dot(qb, tl.trans(kb), input_precision=PREC)
        s = tl.where(n_ok[None, :] & (n[None, :] <= qpos[:, None]), s * scale, float("-inf"))  # [M, N]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_ptr + (k0 + n).to(tl.int64)[:, None] * sv_t + head * sv_h + dv[None, :],
                     mask=n_ok[:, None] & (dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(_widen(p.to(vt.dtype), WIDEN), _widen(vt, WIDEN), input_precision=PREC)
        m_i = m_new
    o_rows = o_ptr + (q0 + m).to(tl.int64)[:, None] * so_t + head * so_h
    tl.store(o_rows + dv[None, :], (acc / l_i[:, None]).to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (dv[None, :] < DV))


def varlen_prefill_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Varlen,
                          scale: float) -> torch.Tensor:
    """q [Tq, h, dqk], k [Tk, h, dqk], v [Tk, h, dv] (any token/head strides, last dim unit) -> [Tq, h, dv]."""
    assert meta.blocks is not None, "the step's Varlen was built without the Triton block map"
    tq, h, dqk = q.shape
    dv = v.shape[-1]
    assert k.shape[1:] == (h, dqk) and v.shape[:2] == k.shape[:2], (q.shape, k.shape, v.shape)
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1, "head dims must be contiguous"
    k, v = k.to(q.dtype), v.to(q.dtype)
    out = torch.empty(tq, h, dv, dtype=q.dtype, device=q.device)
    da = max(16, 1 << (dqk.bit_length() - 1))  # the largest power of two within dqk
    db = 0 if dqk <= da else max(16, triton.next_power_of_2(dqk - da))
    # Wide fp32 tiles would spill; the interpreter (CPU tests) does not care.
    block_n = 32 if q.dtype == torch.float32 and q.is_cuda else 64
    _prefill_kernel[(meta.blocks.shape[0], h)](
        q, k, v, out, meta.cu_q, meta.cu_k, meta.blocks, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        DQK=dqk, DV=dv, DA=da, DB=db, BLOCK_DV=max(16, triton.next_power_of_2(dv)), BLOCK_M=BLOCK_M,
        BLOCK_N=block_n, PREC="ieee" if q.dtype == torch.float32 else None,
        WIDEN=backends.triton_interpreting())
    return out


def probe_triton_prefill(device: str = "cuda", heads: int = 4) -> None:
    """Health probe (run in a child by kernels.probe): the kernel against the reference on a small varlen batch."""
    from rayinfer.kernels.prefill import reference

    g = torch.Generator(device=device).manual_seed(0)
    q_lens, k_lens = [1, 70, 130], [1, 70, 200]
    meta = Varlen.build(q_lens, k_lens, torch.device(device), with_blocks=True)
    q = torch.randn(sum(q_lens), heads, 192, device=device, generator=g).bfloat16()
    k = torch.randn(sum(k_lens), heads, 192, device=device, generator=g).bfloat16()
    v = torch.randn(sum(k_lens), heads, 128, device=device, generator=g).bfloat16()
    probe.check_close(varlen_prefill_triton(q, k, v, meta, 0.07), reference(q, k, v, meta, 0.07), "triton_prefill")
