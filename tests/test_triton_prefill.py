"""Varlen prefill attention: the Triton kernel (under Triton's CPU interpreter) and the padded torch backend against
the per-sequence reference, the step's varlen metadata, and the model's one-call-per-layer prefill path against the
grouped one on the tiny preset."""
from __future__ import annotations

import pytest
import torch

import rayinfer.model.mla as mla_module
from helpers import PagedCache
from rayinfer.kernels.prefill import BLOCK_M, Varlen, default_backend, reference, varlen_prefill
from rayinfer.model import ForwardBatch, load_model

pytestmark = pytest.mark.usefixtures("triton_interpreter")  # the kernel runs under Triton's CPU interpreter

# (query lens, context lens): a lone key, a chunk over a cached prefix, more than one query block, a full prompt
LENS = ([1, 5, BLOCK_M + 6, 9], [1, 40, BLOCK_M + 30, 9])


def _qkv(q_lens, k_lens, h, dqk, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, d, generator=g).to(dtype) for n, d in ((sum(q_lens), dqk), (sum(k_lens), dqk),
                                                                     (sum(k_lens), dv))]


@pytest.mark.parametrize("dtype,dqk,dv,backend", [
    (torch.float32, 48, 32, "triton"),  # key width past a power of two: split into 32 + 16; dv != dqk
    (torch.bfloat16, 192, 128, "triton"),  # DeepSeek-V3's widths
    (torch.float32, 32, 16, "triton"),  # the tiny preset's: a power of two, no remainder
    (torch.float32, 192, 128, "torch"),
])
def test_varlen_prefill_matches_per_sequence_reference(dtype, dqk, dv, backend):
    q_lens, k_lens = LENS
    meta = Varlen.build(q_lens, k_lens, torch.device("cpu"), with_blocks=backend == "triton")
    q, k, v = _qkv(q_lens, k_lens, 2, dqk, dv, dtype)
    v = torch.randn(v.shape[0], 2, dv + 8).to(dtype)[..., :dv]  # a strided view, as the model's split gives
    got = varlen_prefill(q, k, v, meta, 0.1, backend=backend)
    want = reference(q.float(), k.float(), v.float(), meta, 0.1)
    assert got.shape == (sum(q_lens), 2, dv) and got.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(got.float(), want, atol=tol, rtol=tol), (got.float() - want).abs().max()


def test_health_probe_passes_on_a_working_kernel_and_cpu_keeps_the_grouped_path(triton_interpreter):
    triton_interpreter("rayinfer.kernels.triton_prefill").probe_triton_prefill("cpu", heads=1)  # what a GPU rank runs in a child before trusting the kernel; raises if off
    assert default_backend(torch.device("cpu")) is None


def test_reference_is_causal_with_queries_at_the_end_of_the_context():
    q, k, v = _qkv([2], [3], 1, 16, 16, torch.float32)
    out = reference(q, k, v, Varlen.build([2], [3], torch.device("cpu"), False), 1.0)
    s = q[0, 0] @ k[:2, 0].T  # the first query sits at position 1: sees keys 0 and 1 only
    assert torch.allclose(out[0, 0], s.softmax(-1) @ v[:2, 0], atol=1e-6)
    assert torch.allclose(out[1, 0], (q[1, 0] @ k[:, 0].T).softmax(-1) @ v[:, 0], atol=1e-6)


def test_step_metadata_flattens_prefills_around_decodes():
    cache = PagedCache(load_model("tiny"), [70, 10, 130])
    # sequence 1 decodes (one token after 9 cached); 0 adds a 30-token chunk after 40; 2 prefills 130 from scratch
    batch = cache.batch([0, 1, 2], [40, 9, 0], [30, 1, 130], prefill_attention="triton")
    meta = batch.prefill_varlen
    assert batch.decode_seqs == [1] and not batch.prefill_groups
    assert meta.q_lens == [30, 130] and meta.k_lens == [70, 130] and (meta.max_q, meta.max_k) == (130, 130)
    assert meta.cu_q.tolist() == [0, 30, 160] and meta.cu_k.tolist() == [0, 70, 200] and meta.cu_q.dtype == torch.int32
    assert meta.blocks.tolist() == [[0, 0], [1, 0], [1, 64], [1, 128]]
    assert batch.prefill_rows.tolist() == list(range(30)) + list(range(31, 161))  # row 30 is the decode
    table = cache.block_tables
    want_ctx = [table[0, p // 64].item() * 64 + p % 64 for p in range(70)] + \
        [table[2, p // 64].item() * 64 + p % 64 for p in range(130)]
    assert batch.prefill_ctx_rows.tolist() == want_ctx


def _run_steps(model, backend: str) -> list[torch.Tensor]:
    """Three sequences over two steps: mixed-length prefills (one a first chunk), then that chunk's continuation
    beside a decode and a new one-token prompt."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, model.cfg.vocab_size, (n,), generator=g) for n in (23, 90, 1)]
    cache = PagedCache(model, [24, 90, 2])
    with torch.no_grad():
        first = model(torch.cat([prompts[0], prompts[1][:50]]), cache.batch([0, 1], [0, 0], [23, 50], backend))
        nxt = torch.tensor([7])
        second = model(torch.cat([nxt, prompts[1][50:], prompts[2]]), cache.batch([0, 1, 2], [23, 50, 0], [1, 40, 1],
                                                                                 backend))
    return [first, second]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_model_prefill_in_one_call_per_layer_matches_grouped(backend, monkeypatch):
    model = load_model("tiny")
    want = _run_steps(model, "grouped")
    calls = []
    monkeypatch.setattr(mla_module, "varlen_prefill", lambda *a, **kw: calls.append(kw) or varlen_prefill(*a, **kw))
    got = _run_steps(model, backend)
    assert calls == [{"backend": backend}] * (2 * model.cfg.num_hidden_layers)  # per layer, per step: one
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() <= 1e-4


def test_dense_forward_without_cache_in_one_call_matches_grouped():
    model = load_model("tiny")
    g = torch.Generator().manual_seed(4)
    lens = [3, 17, 1, 70]
    ids = torch.randint(5, model.cfg.vocab_size, (sum(lens),), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad():
        want = model(ids, ForwardBatch(pos, lens, lens, prefill_attention="grouped"))
        got = model(ids, ForwardBatch(pos, lens, lens, prefill_attention="triton"))
    assert (got - want).abs().max().item() <= 1e-4
