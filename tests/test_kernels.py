"""Reference kernels against straightforward formulas."""
import os

import pytest
import torch
import torch.nn.functional as F

from rayinfer.kernels import fp8
from rayinfer.kernels.mla import PAGE_SIZE, mla_decode
from rayinfer.kernels.moe import grouped_ffn


def test_fp8_block_roundtrip_and_layout():
    w = torch.randn(300, 200) * torch.logspace(-2, 1, 200)  # columns of very different scale
    q, s = fp8.quantize_weight_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2) and s.dtype == torch.float32
    back = fp8.dequantize_weight_blocks(q, s)
    # e4m3 keeps 3 mantissa bits: relative error per element <= 2^-4 of the block max
    for bi in range(3):
        for bj in range(2):
            blk = (slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128))
            assert (back[blk] - w[blk]).abs().max() <= w[blk].abs().max() / 16
    assert torch.allclose(s[0, 0], w[:128, :128].abs().max() / 448)


def test_fp8_activation_groups_and_linear():
    x = torch.randn(5, 256)
    xq, xs = fp8.quantize_act_groups(x)
    assert xs.shape == (5, 2)
    err = (xq.float().view(5, 2, 128) * xs[..., None] - x.view(5, 2, 128)).abs().amax(-1)  # [5, 2]
    assert (err <= x.view(5, 2, 128).abs().amax(-1) / 16).all()
    w = torch.randn(64, 256)
    wq, ws = fp8.quantize_weight_blocks(w)
    assert torch.allclose(fp8.linear(x, wq, ws), x @ fp8.dequantize_weight_blocks(wq, ws).T, atol=1e-5)
    assert torch.equal(fp8.linear(x, w), F.linear(x, w))


def _attend(q, keys, dv, scale):
    """q [s_q, h, D] over keys [S, D]: plain causal softmax attention, the last s_q keys being the queries'."""
    s_q, s = q.shape[0], keys.shape[0]
    scores = torch.einsum("qhd,sd->qhs", q, keys) * scale
    mask = torch.ones(s_q, s, dtype=torch.bool).tril(s - s_q)
    return torch.einsum("qhs,sr->qhr", scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1), keys[:, :dv])


def test_mla_decode_over_scattered_pages():
    g = torch.Generator().manual_seed(0)
    h, d, dv, lens = 4, 40, 32, [1, 64, 65, 150]
    n_pages = sum(-(-n // PAGE_SIZE) for n in lens) + 3
    cache = torch.randn(n_pages, PAGE_SIZE, d, generator=g)
    perm = torch.randperm(n_pages, generator=g).tolist()  # pages deliberately out of order
    width = max(-(-n // PAGE_SIZE) for n in lens)
    table, seqs = [], []
    for n in lens:
        pages = [perm.pop() for _ in range(-(-n // PAGE_SIZE))]
        table.append(pages + [0] * (width - len(pages)))
        seqs.append(cache[pages].view(-1, d)[:n].clone())
        # Rows no sequence owns (tails of last pages, spare pages) may hold anything, NaN included.
        tail = cache[pages[-1]]
        tail[n - (len(pages) - 1) * PAGE_SIZE:] = float("nan")
    used = {p for row, n in zip(table, lens) for p in row[:-(-n // PAGE_SIZE)]}
    for p in set(range(n_pages)) - used:
        cache[p] = float("nan")
    for s_q in (1, 2):
        q = torch.randn(len(lens), s_q, h, d, generator=g)
        out = mla_decode(q, cache, torch.tensor(table), torch.tensor(lens), dv, 0.3)
        for b, keys in enumerate(seqs):
            if keys.shape[0] >= s_q:
                assert torch.allclose(out[b], _attend(q[b], keys, dv, 0.3), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_ffn_matches_per_token(dtype):
    """fp32 on CPU runs the per-slot loop, bf16 the padded batched path (an empty slot among them); both
    scale each row's activation by its routing weight before the down projection."""
    g = torch.Generator().manual_seed(1)
    s, h, i = 3, 16, 8
    w13, w2 = torch.randn(s, 2 * i, h, generator=g), torch.randn(s, h, i, generator=g)
    counts = [2, 0, 3]
    x = torch.randn(5, h, generator=g)
    weights = torch.rand(5, generator=g)
    out = grouped_ffn(x.to(dtype), counts, w13.to(dtype), w2.to(dtype), row_weights=weights).float()
    slot_of_row = [0, 0, 2, 2, 2]
    tol = 1e-5 if dtype == torch.float32 else 0.1
    for r, e in enumerate(slot_of_row):
        gate, up = (w13[e] @ x[r]).chunk(2)
        assert torch.allclose(out[r], weights[r] * (w2[e] @ (F.silu(gate) * up)), atol=tol, rtol=0.05)


def test_flash_mla_adapter_checks_shapes_and_builds_metadata_once_per_step(monkeypatch):
    """With a stand-in FlashMLA: metadata is built once for all layers of a step; wrong dims never reach it."""
    from rayinfer.kernels import backends, mla

    calls = {"meta": 0, "run": 0}

    class FakeFlashMLA:
        @staticmethod
        def get_mla_metadata(seqlens, sq_h, h_kv):
            calls["meta"] += 1
            assert seqlens.dtype == torch.int32 and h_kv == 1
            return "schedule", None

        @staticmethod
        def flash_mla_with_kvcache(q, kcache, table, seqlens, dv, meta, splits, softmax_scale, causal):
            calls["run"] += 1
            assert kcache.shape[2] == 1 and meta == "schedule" and splits is None and table.dtype == torch.int32
            return mla_decode(q.float(), kcache.squeeze(2).float(), table, seqlens, dv, softmax_scale).bfloat16(), None

    monkeypatch.setattr(backends, "usable", lambda name, *t: True)
    monkeypatch.setattr(backends, "module", lambda name: FakeFlashMLA)
    q = torch.randn(2, 1, 4, 576).bfloat16()
    cache = torch.randn(3, PAGE_SIZE, 576).bfloat16()
    table, lens = torch.tensor([[0, 1], [2, 0]]), torch.tensor([70, 5])
    step = {}
    for _layer in range(3):
        out = mla_decode(q, cache, table, lens, 512, 0.1, step_cache=step)
    assert calls == {"meta": 1, "run": 3} and out.shape == (2, 1, 4, 512)
    assert "head dims" in mla.flash_mla_preconditions(q[..., :40], cache[..., :40], 32)
    mla_decode(q[..., :40], cache[..., :40], table, lens, 32, 0.1, step_cache={})  # the reference, not the fake
    assert calls["run"] == 3


def test_the_triton_interpreter_does_not_leak_out_of_its_tests():
    """Only the tests that take the `triton_interpreter` fixture run under TRITON_INTERPRET (collecting a Triton test
    module must not switch it on for the session: probe children and subprocesses inherit it)."""
    from conftest import TRITON_INTERPRET_AT_START

    assert os.environ.get("TRITON_INTERPRET") == TRITON_INTERPRET_AT_START


class UpstreamFlashMLA:
    """FlashMLA upstream main (9241ae3) as documented: `get_mla_metadata(*args)` returns (an empty schedule object,
    None); `flash_mla_with_kvcache` insists on that object and num_splits=None, fills the schedule on first use and
    allows reuse only with the same shapes, causality and lengths; head_dim_v 512, int32 tables and lengths,
    4-D bf16 cache of 64-token pages, unit last strides; returns (out [B, s_q, h, 512], lse [B, h, s_q] fp32)."""

    class Sched:
        def __init__(self):
            self.config = None

    calls = 0

    @staticmethod
    def get_mla_metadata(*args, **kwargs):
        return UpstreamFlashMLA.Sched(), None

    @staticmethod
    def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                               num_splits=None, softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None):
        sched = tile_scheduler_metadata
        assert isinstance(sched, UpstreamFlashMLA.Sched), "tile_scheduler_metadata must be of type FlashMLASchedMeta"
        assert num_splits is None, "num_splits must be None"
        assert head_dim_v == 512 and q.dtype == k_cache.dtype == torch.bfloat16 and q.shape[-1] == 576
        assert k_cache.dim() == 4 and k_cache.shape[1] == 64 and k_cache.shape[2] == 1
        assert q.stride(-1) == 1 and k_cache.stride(-1) == 1
        assert block_table.dtype == cache_seqlens.dtype == torch.int32
        config = (q.shape[:3], k_cache.shape[1:3], causal, cache_seqlens.tolist())
        assert sched.config in (None, config), "inputs inconsistent with sched_meta"
        sched.config = config
        UpstreamFlashMLA.calls += 1
        out = mla_decode(q.float(), k_cache.squeeze(2).float(), block_table, cache_seqlens, head_dim_v,
                         softmax_scale, causal).bfloat16()
        return out, torch.zeros(q.shape[0], q.shape[2], q.shape[1])


def test_flash_mla_adapter_against_the_upstream_main_api(monkeypatch):
    from rayinfer.kernels import backends, mla

    monkeypatch.setattr(backends, "usable", lambda name, *t: True)
    monkeypatch.setattr(backends, "module", lambda name: UpstreamFlashMLA)
    assert mla.flash_mla_api_mismatch(UpstreamFlashMLA) is None
    g = torch.Generator().manual_seed(5)
    cache = torch.randn(4, PAGE_SIZE, 576, generator=g).bfloat16()
    table, lens = torch.tensor([[0, 1], [2, 3]]), torch.tensor([70, 5])
    UpstreamFlashMLA.calls = 0
    for s_q in (1, 2):  # a decode step, then a step verifying two tokens a sequence: a schedule for each
        q = torch.randn(2, s_q, 16, 576, generator=g).bfloat16()
        step = {}
        outs = [mla.mla_decode(q, cache, table, lens, 512, 0.1, step_cache=step) for _layer in range(3)]
        want = mla.reference_decode(q.float(), cache.float(), table, lens, 512, 0.1)
        assert all(torch.allclose(o.float(), want, atol=2e-2) for o in outs) and len(step) == 1
    assert UpstreamFlashMLA.calls == 6
    with pytest.raises(NotImplementedError, match="cannot be rebuilt in place"):
        mla.refresh_step_cache(step)  # the schedule object is filled by FlashMLA itself: graphs stay eager


def test_flash_mla_api_check_names_an_incompatible_signature():
    from rayinfer.kernels import mla

    class Old:
        @staticmethod
        def get_mla_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k):
            return torch.zeros(1), torch.zeros(1)

        @staticmethod
        def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                                   num_splits, softmax_scale=None, causal=False):
            raise AssertionError("not called")

    class Broken:
        get_mla_metadata = Old.get_mla_metadata

        @staticmethod
        def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v):
            raise AssertionError("not called")

    assert mla.flash_mla_api_mismatch(Old) is None  # the older releases' two-tensor API is still taken
    assert "5 positional arguments" in mla.flash_mla_api_mismatch(Broken)
    assert "no inspectable" in mla.flash_mla_api_mismatch(object())


def test_flash_mla_adapter_matches_the_installed_package_signature():
    """Where FlashMLA is installed (a GPU node built from source), its real signatures take our calls."""
    import importlib.util

    from rayinfer.kernels import mla

    if importlib.util.find_spec("flash_mla") is None:
        pytest.skip("flash_mla is not installed here (it builds from source on GPU nodes)")
    try:
        import flash_mla
    except Exception as e:  # noqa: BLE001 - its CUDA extension needs a GPU build
        pytest.skip(f"flash_mla does not import here: {type(e).__name__}: {e}")
    assert mla.flash_mla_api_mismatch(flash_mla) is None
