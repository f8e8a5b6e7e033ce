"""Decode steps replayed from per-bucket graphs (rayinfer.engine.cuda_graphs), on CPU.

The graphs here are `TapeCapture`s: the recorded aten ops replayed on the recorded tensors, with no model
Python code run at replay, as a CUDA graph replays its kernels. The engine path is the one CUDA takes.
"""
from __future__ import annotations

import pytest
import torch

from rayinfer import LLM, SamplingParams
from rayinfer.config.model import ConfigError
from rayinfer.engine.cuda_graphs import CudaGraphCapture, DecodeGraphs, TapeCapture, graphs_blocker
from rayinfer.engine.model_runner import ModelRunner
from rayinfer.kernels import backends, mla
from rayinfer.kernels.mla import PAGE_SIZE

PROMPTS = [[5 + i, 9, 11 + 2 * i, 40, 7 * i + 3, 17][: 2 + i % 5] for i in range(9)]
# Different lengths: sequences finish at different steps while queued ones join (max_num_seqs 4).
PARAMS = [SamplingParams(max_tokens=2 + (3 * i) % 11, temperature=0.0, ignore_eos=True) for i in range(9)]


def _llm(graphs: bool) -> LLM:
    llm = LLM("tiny", max_num_seqs=4, max_model_len=200)
    if graphs:
        assert llm.engine.runner.use_graphs(TapeCapture()) is None
    return llm


def _spy(runner: ModelRunner) -> dict:
    """Records the items of eager steps, and the buffers and output of every graphed step."""
    seen = {"eager": [], "graphed": []}
    prepare, run = runner.prepare, runner.graphs.run

    def graphed(items):
        g = runner.graphs
        n = sum(1 for seq, _, _ in items if hasattr(seq, "request_id"))
        out = run(items)
        seen["graphed"].append((len(items), n, g.static.data_ptr(), g.tables.data_ptr(), out.data_ptr(),
                                g.static[:, n:len(items)].clone(), g.tables[n:len(items), 0].clone()))
        return out

    runner.prepare = lambda items: seen["eager"].append(items) or prepare(items)
    runner.graphs.run = graphed
    return seen


def test_graphed_decode_matches_eager_across_buckets_joins_and_finishes():
    want = [o.token_ids for o in _llm(False).generate(PROMPTS, PARAMS, use_tqdm=False)]
    llm = _llm(True)
    runner = llm.engine.runner
    seen = _spy(runner)
    got = [o.token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
    assert got == want
    buckets = {b for b, *_ in seen["graphed"]}
    assert buckets == {1, 2, 4} and set(runner.graphs.graphs) == buckets, buckets
    assert runner.graphs.replays == len(seen["graphed"]) > 10
    # Steps that prefill (a new sequence joining) ran eagerly, never padded.
    assert seen["eager"] and all(any(start == 0 or n > 1 for _, start, n in items) for items in seen["eager"])


def test_static_buffers_are_reused_and_dummies_stay_on_the_scratch_page():
    llm = _llm(True)
    runner = llm.engine.runner
    seen = _spy(runner)
    llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert len({(s, t) for _, _, s, t, *_ in seen["graphed"]}) == 1  # one set of input buffers, every replay
    outs = {}
    for b, n, _, _, out, dummy_inputs, dummy_pages in seen["graphed"]:
        outs.setdefault(b, set()).add(out)
        ids, pos, slots, lens = dummy_inputs
        assert (slots // PAGE_SIZE == runner.scratch_page).all() and (lens == 1).all() and (pos == 0).all()
        assert (dummy_pages == runner.scratch_page).all()
    assert all(len(ptrs) == 1 for ptrs in outs.values()), outs  # each bucket's output: one tensor, every replay
    assert any(n < b for b, n, *_ in seen["graphed"])  # some steps were padded


def test_dummies_write_no_real_page():
    llm = _llm(True)
    runner = llm.engine.runner
    run = runner.graphs.run
    checked = []

    def guarded(items):
        before = [c[: runner.num_blocks].clone() for c in runner.kv_caches]
        out = run(items)
        real = {seq.block_ids[start // PAGE_SIZE] * PAGE_SIZE + start % PAGE_SIZE
                for seq, start, _ in items if hasattr(seq, "request_id")}
        for old, cache in zip(before, runner.kv_caches):
            # Bytes, not values: untouched pages may hold NaNs, which never compare equal.
            diff = old.view(torch.uint8) != cache[: runner.num_blocks].view(torch.uint8)
            changed = diff.any(-1).flatten().nonzero().flatten().tolist()
            assert set(changed) <= real, (sorted(changed), sorted(real))
        checked.append(len(items) - len(real))
        return out

    runner.graphs.run = guarded
    llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert sum(checked) > 0  # dummies were present in some checked steps


def test_replay_reads_the_static_buffers_not_python_state():
    """Inputs written straight into the static buffers (no run(), no new ForwardBatch) change what a replay computes."""
    runner = _llm(True).engine.runner
    graphs: DecodeGraphs = runner.graphs
    model = runner.model
    # Three sequences with 70, 5 and 130 cached tokens (random latents), pages laid out by hand.
    lens, pages, first = [70, 5, 130], [], 0
    for n in lens:
        pages.append(list(range(first, first + -(-(n + 1) // PAGE_SIZE))))
        first += len(pages[-1])
    g = torch.Generator().manual_seed(0)
    for c in runner.kv_caches:
        c[:first] = torch.randn(first, PAGE_SIZE, c.shape[-1], generator=g)

    class Seq:
        def __init__(self, i, tok):
            self.block_ids, self.token_ids = pages[i], [0] * lens[i] + [tok]

    graphs.run([(Seq(i, 7 + i), lens[i], 1) for i in range(3)] + [(_scratch(runner), 0, 1)])
    replay, out, _ = graphs.graphs[4]
    first_out = out[:3].clone()
    # A second step, written into the buffers directly: other tokens, sequence 1 one position earlier.
    new_ids, new_pos = [40, 41, 42], [70, 4, 130]
    ids, pos, slots, ctx = graphs.static
    for i in range(3):
        ids[i], pos[i], ctx[i] = new_ids[i], new_pos[i], new_pos[i] + 1
        slots[i] = pages[i][new_pos[i] // PAGE_SIZE] * PAGE_SIZE + new_pos[i] % PAGE_SIZE
    replay()
    from rayinfer.model import ForwardBatch

    tables = graphs.tables[:3].clone()
    eager = model.hidden_states(ids[:3].clone(), ForwardBatch(pos[:3].clone(), [1] * 3, [p + 1 for p in new_pos],
                                                              tables, slots[:3].clone(), runner.kv_caches))
    torch.testing.assert_close(out[:3], eager, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:3], first_out)


def _scratch(runner):
    from rayinfer.engine.decode_buckets import _Dummy

    return _Dummy([runner.scratch_page])


def test_tape_replay_freezes_host_values_like_a_graph():
    buf, state = torch.ones(3), {"k": 2.0}
    replay, out = TapeCapture().capture(lambda: buf * state["k"] + 1)
    buf.fill_(5.0)
    state["k"] = 100.0
    replay()
    assert out.tolist() == [11.0, 11.0, 11.0]  # new buffer content, the host value of capture time


@pytest.mark.parametrize("forward", [lambda b: b * b.sum().item(), lambda b: b + torch.tensor([1.0, 2.0, 3.0]),
                                     lambda b: b[b > 1]])
def test_tape_refuses_what_a_cuda_capture_cannot_hold(forward):
    buf = torch.ones(3)
    with pytest.raises(RuntimeError, match="a CUDA graph cannot hold it"):
        TapeCapture().capture(lambda: forward(buf))


def test_what_stays_eager_fp8_experts_gangs_and_the_default_cpu_engine():
    runner = LLM("tiny", max_num_seqs=4).engine.runner
    assert runner.graphs is None and runner.decode_buckets is None  # CPU: eager unless a capture is injected
    assert "gang" in graphs_blocker(runner.model, ctx=object())
    gang = ModelRunner(runner.config, runner.model, ctx=object())
    assert "gang" in gang.use_graphs(TapeCapture()) and gang.graphs is None
    moe = runner.model.moe_layers[0].experts
    moe.w13_scale = torch.ones(1)
    assert "FP8" in runner.use_graphs(TapeCapture()) and runner.graphs is None


def test_enforce_eager_option():
    assert LLM("tiny", enforce_eager=True).config.enforce_eager is True
    with pytest.raises(ConfigError, match="enforce_eager"):
        LLM("tiny", enforce_eager="yes")


def test_flash_mla_metadata_is_rebuilt_in_place_outside_the_graph(monkeypatch):
    class FakeFlashMLA:
        @staticmethod
        def get_mla_metadata(seqlens, sq_h, h_kv):
            return torch.stack([seqlens, seqlens * 2]), seqlens.cumsum(0).to(torch.int32)

    monkeypatch.setattr(backends, "module", lambda name: FakeFlashMLA)
    lens, table = torch.tensor([3, 70]), torch.tensor([[0, 0], [1, 2]])
    step = {("flash_mla", 16): mla._flash_mla_metadata(lens, table, 16)}
    built = step[("flash_mla", 16)][2:]
    ptrs = [t.data_ptr() for t in built]
    lens.copy_(torch.tensor([4, 9]))
    table[0, 0] = 5
    mla.refresh_step_cache(step)
    seqlens, table32, meta, splits = step[("flash_mla", 16)][2:]
    assert [t.data_ptr() for t in (seqlens, table32, meta, splits)] == ptrs
    assert seqlens.tolist() == [4, 9] and table32[0, 0] == 5 and meta.tolist() == [[4, 9], [8, 18]]
    assert splits.tolist() == [4, 13]
    monkeypatch.setattr(FakeFlashMLA, "get_mla_metadata", staticmethod(lambda s, q, h: ("schedule", None)))
    step = {("flash_mla", 16): mla._flash_mla_metadata(lens, table, 16)}
    with pytest.raises(NotImplementedError, match="str"):
        mla.refresh_step_cache(step)


def test_cuda_capture_refuses_kernels_that_read_the_host(monkeypatch):
    import rayinfer.kernels.moe as kmoe

    runner = LLM("tiny", max_num_seqs=4).engine.runner
    assert "row counts on the host" in CudaGraphCapture.blocker(runner.model, runner.kv_caches[0])  # CPU experts
    monkeypatch.setattr(kmoe, "ffn_backend", lambda *a: "grouped_mm")
    assert "no FlashMLA or Triton" in CudaGraphCapture.blocker(runner.model, runner.kv_caches[0])  # CPU attention
    monkeypatch.setattr(mla, "triton_usable", lambda: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    assert CudaGraphCapture.blocker(runner.model, runner.kv_caches[0]) is None


def test_metadata_that_cannot_live_outside_the_graph_turns_graphs_off():
    llm = _llm(True)
    runner = llm.engine.runner

    def unrebuildable(items):
        raise NotImplementedError("flash_mla metadata of type FlashMLASchedMeta cannot be rebuilt in place")

    runner.graphs.run = unrebuildable
    got = [o.token_ids for o in llm.generate(PROMPTS[:3], PARAMS[:3], use_tqdm=False)]
    assert runner.graphs is None and runner.decode_buckets is None
    assert got == [o.token_ids for o in _llm(False).generate(PROMPTS[:3], PARAMS[:3], use_tqdm=False)]


def test_serve_enforce_eager_reaches_every_roles_engine(monkeypatch):
    import rayinfer.actors.server as server
    from rayinfer import cli

    seen = []
    monkeypatch.setattr(server, "serve_forever", lambda cfg, address, ready: seen.append(cfg))
    assert cli.main(["serve", "--enforce-eager"]) == 0 and cli.main(["serve"]) == 0
    assert [all(c.engine_config(r).enforce_eager for r in c.roles) for c in seen] == [True, False]
