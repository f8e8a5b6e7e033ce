"""One request's failure is its own, offline: bad input is a ValueError naming it before the engine takes it,
and a step that raises for one sequence (the runner's fault hook in sampling, a forward that raises for it)
fails that request alone while every other request in the same batches finishes with the tokens of a run
without it, and no page stays held."""
import asyncio

import pytest
import torch

from rayinfer import LLM, SamplingParams
from rayinfer.engine.async_engine import AsyncEngine
from rayinfer.messages import EngineRequest, RequestFailed

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=10, temperature=0.8, seed=5, ignore_eos=True)
MARK = [7, 7, 7, 7]  # the culprit's prompt starts with this


def _prompts(n=8):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(10, 250, (int(k),), generator=g).tolist() for k in torch.randint(4, 80, (n,), generator=g)]


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def reference(llm):
    prompts = _prompts()
    params = [GREEDY if i % 2 else SEEDED for i in range(len(prompts))]
    return prompts, params, [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("params, match", [
    (SamplingParams(stop_token_ids=[99999], min_tokens=1), "stop_token_ids .*outside the vocabulary"),
    (SamplingParams(stop_token_ids=[320]), "stop_token_ids .*outside the vocabulary"),
])
def test_add_request_refuses_ids_outside_the_vocabulary(llm, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate([[5, 6, 7]], params, use_tqdm=False)
    assert not llm.engine.seqs and llm.engine.block_manager.num_allocated_blocks() == 0


def _culprit_fails_alone(llm, reference, fault_on):
    prompts, params, ref = reference
    culprit = 3
    prompts = list(prompts)
    prompts.insert(culprit, MARK + [11, 12, 13])
    params = list(params)
    params.insert(culprit, GREEDY)
    fault_on(lambda s: s.token_ids[:len(MARK)] == MARK)
    try:
        out = llm.generate(prompts, params, use_tqdm=False)
    finally:
        fault_on(None)
    bad = out.pop(culprit)
    assert bad.finish_reason == "error" and "failed in" in bad.error and bad.request_id in bad.error, bad
    assert [o.token_ids for o in out] == ref, "the other requests' output changed"
    assert all(o.finish_reason == "length" for o in out)
    assert not llm.engine.seqs and llm.engine.block_manager.num_allocated_blocks() == 0
    assert not llm.engine.failures
    return bad


def test_a_sequence_failing_in_sampling_fails_alone(llm, reference):
    def fault_on(pred):
        llm.engine.runner.fault = pred

    bad = _culprit_fails_alone(llm, reference, fault_on)
    assert "injected sampling fault" in bad.error and bad.token_ids == []


def test_a_forward_failing_for_one_sequence_is_rerun_without_it(llm, reference):
    model = llm.engine.runner.model
    forward = model.hidden_states

    def fault_on(pred):
        if pred is None:
            model.hidden_states = forward
            return

        def failing(ids, batch):  # the culprit's marker among the step's token ids: this forward raises
            flat = ids.tolist()
            if any(flat[i:i + len(MARK)] == MARK for i in range(len(flat))):
                raise RuntimeError("injected forward fault")
            return forward(ids, batch)
        model.hidden_states = failing

    bad = _culprit_fails_alone(llm, reference, fault_on)
    assert "the forward" in bad.error and "injected forward fault" in bad.error


def test_a_failing_stream_gets_request_failed_and_the_loop_serves_on(llm, reference):
    prompts, params, ref = reference

    async def run():
        engine = AsyncEngine(llm.engine)

        async def one(rid, prompt, p):
            try:
                return [t for d in [d async for d in engine.stream(EngineRequest(rid, prompt, p))] for t in d.token_ids]
            except RequestFailed as e:
                return e

        llm.engine.runner.fault = lambda s: s.request_id == "culprit"
        try:
            got = await asyncio.gather(one("culprit", prompts[0], GREEDY),
                                       *(one(f"r{i}", p, q) for i, (p, q) in enumerate(zip(prompts, params))))
        finally:
            llm.engine.runner.fault = None
        after = await one("after", prompts[1], params[1])
        alive = engine.alive
        engine.shutdown()
        return got, after, alive

    got, after, alive = asyncio.run(run())
    assert isinstance(got[0], RequestFailed) and "'culprit'" in str(got[0])
    assert got[1:] == ref and after == ref[1] and alive
    assert llm.engine.block_manager.num_allocated_blocks() == 0


def test_a_lone_failing_sequence_fails_alone_and_the_engine_serves_on(llm, reference):
    prompts, params, ref = reference
    llm.engine.runner.fault = lambda s: s.token_ids[:len(MARK)] == MARK
    try:
        bad = llm.generate([MARK + [9]], GREEDY, use_tqdm=False)[0]
    finally:
        llm.engine.runner.fault = None
    assert bad.finish_reason == "error" and "injected sampling fault" in bad.error
    assert llm.generate(prompts[:2], params[:2], use_tqdm=False)[1].token_ids == ref[1]
    assert llm.engine.block_manager.num_allocated_blocks() == 0
