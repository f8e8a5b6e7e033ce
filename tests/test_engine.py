"""The engine on the real `tiny` model: batch invariance, preemption, prefix caching, logprobs, sampling, stops."""
import asyncio

import pytest
import torch

from rayinfer import LLM, SamplingParams
from rayinfer.engine.async_engine import AsyncEngine
from rayinfer.messages import EngineRequest

from helpers import hand_off

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _prompts(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 140, (n,), generator=g).tolist()
    return [torch.randint(5, 261, (k,), generator=g).tolist() for k in lengths]


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def alone(llm):
    return [llm.generate([p], GREEDY, use_tqdm=False)[0].token_ids for p in _prompts()]


def test_batch_invariance(llm, alone):
    together = llm.generate(_prompts(), GREEDY, use_tqdm=False)
    assert [o.token_ids for o in together] == alone
    assert all(o.finish_reason == "length" and len(o.token_ids) == 12 for o in together)


def test_batch_invariance_under_preemption(alone):
    tight = LLM("tiny", kv_cache_tokens=640, max_num_batched_tokens=512)  # 10 pages for 32 requests
    got = tight.generate(_prompts(), GREEDY, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in got] == alone
    assert tight.engine.block_manager.num_allocated_blocks() == 0


def test_prefix_caching_repeated_prompt(llm):
    prompt = _prompts(1, seed=7)[0] * 3
    prompt = (prompt * 3)[:300]
    a = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    b = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert b.num_cached_tokens >= 256 and b.token_ids == a.token_ids


def test_abort_frees_blocks(llm):
    eng = llm.engine
    eng.add_request(EngineRequest("ab", _prompts(1, seed=3)[0] * 4, SamplingParams(max_tokens=50)))
    eng.step()
    eng.step()
    assert eng.block_manager.num_allocated_blocks() > 0
    assert eng.abort("ab").finish_reason == "abort"
    assert eng.block_manager.num_allocated_blocks() == 0


def test_greedy_logprobs_match_transformers(llm):
    from transformers import DeepseekV3ForCausalLM

    hf = DeepseekV3ForCausalLM.from_pretrained(llm.engine.runner.checkpoint_path, dtype=torch.float32).eval()
    prompts = _prompts(4, seed=11)
    outs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=3),
                        use_tqdm=False)
    worst = 0.0
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([p + o.token_ids])).logits[0].float(), dim=-1)
        for i, (tok, lp) in enumerate(zip(o.token_ids, o.logprobs)):
            row = ref[len(p) - 1 + i]
            assert tok == int(row.argmax())
            assert len(lp) >= 3 and tok in lp
            worst = max(worst, max(abs(v - float(row[t])) for t, v in lp.items()))
    print(f"\n[engine] greedy logprobs vs transformers: max |dlogprob| = {worst:.2e}")
    assert worst <= 1e-4


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    p = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    prompt = _prompts(1, seed=5)[0]
    a = llm.generate([prompt], p, use_tqdm=False)[0].token_ids
    mixed = llm.generate(_prompts(6, seed=9) + [prompt], [SamplingParams(max_tokens=16, temperature=1.0)] * 6 + [p],
                         use_tqdm=False)
    assert mixed[-1].token_ids == a
    other = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0.9, seed=99, ignore_eos=True),
                         use_tqdm=False)[0].token_ids
    assert other != a


def _continue(engine, req):
    """Runs `req` alone on `engine` to the end; returns the tokens it adds and its sequence."""
    engine.add_request(req)
    seq = engine.seqs[req.request_id]
    out = []
    while engine.has_unfinished():
        out += [t for d in engine.step() if d.request_id == req.request_id for t in d.token_ids]
    return out, seq


@pytest.mark.parametrize("seed", [1234, None])
def test_request_resumed_from_its_tokens_samples_the_same_continuation(llm, seed):
    p = SamplingParams(max_tokens=16, temperature=1.0, top_k=40, repetition_penalty=1.2, seed=seed, ignore_eos=True)
    prompt = _prompts(1, seed=21)[0]
    full, seq = _continue(llm.engine, EngineRequest(f"whole{seed}", prompt, p))
    assert len(full) == 16
    # An unseeded request carries the seed it drew, as a prefill handoff's rng_state does; a seeded one needs nothing.
    rng = None if seed is not None else seq.sample_seed.to_bytes(8, "little")
    other = LLM("tiny", max_num_batched_tokens=512, seed=77)  # another rank, another engine seed
    for k in (1, 7):
        got, _ = _continue(other.engine, EngineRequest(f"resumed{k}", prompt, p, output_token_ids=full[:k],
                                                       rng_state=rng))
        assert full[:k] + got == full, k


def test_min_tokens_holds_back_stop_tokens_and_stop_strings(llm):
    prompt = "Stop strings test: "
    greedy = dict(max_tokens=40, temperature=0)
    base = llm.generate([prompt], SamplingParams(**greedy, ignore_eos=True), use_tqdm=False)[0]
    ids = base.token_ids
    early = llm.generate([prompt], SamplingParams(**greedy, stop_token_ids=[ids[1]]), use_tqdm=False)[0]
    assert early.finish_reason == "stop" and early.token_ids == ids[:2]
    held = llm.generate([prompt], SamplingParams(**greedy, stop_token_ids=[ids[1]], min_tokens=3), use_tqdm=False)[0]
    assert held.token_ids[0] == ids[0] and ids[1] not in held.token_ids[:3] and len(held.token_ids) > 3
    stop = next(base.text[i:i + 2] for i in range(4, 12) if "\ufffd" not in base.text[i:i + 2])
    out = llm.generate([prompt], SamplingParams(**greedy, ignore_eos=True, stop=[stop], min_tokens=40),
                       use_tqdm=False)[0]
    assert out.finish_reason == "length" and out.text == base.text


def test_stop_strings_are_honoured_and_not_emitted(llm):
    prompt = "Stop strings test: "
    base = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    text = base.text
    stop = next(text[i:i + 2] for i in range(4, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    cut = text.index(stop)
    out = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop, "never"]),
                       use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.text == text[:cut] and stop not in out.text


def test_streamed_text_never_leaks_a_stop_string(llm):
    base = llm.generate(["abc"], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    stop = next(base.text[i:i + 3] for i in range(6, len(base.text) - 3) if "\ufffd" not in base.text[i:i + 3])

    async def collect():
        engine = AsyncEngine(llm.engine)
        ids = llm.tokenizer.encode("abc")
        chunks = [d async for d in engine.stream(EngineRequest("st", ids, SamplingParams(
            max_tokens=30, temperature=0, ignore_eos=True, stop=stop)))]
        engine.shutdown()
        return chunks

    chunks = asyncio.run(collect())
    assert chunks[-1].finish_reason == "stop"
    assert "".join(c.text for c in chunks) == base.text[:base.text.index(stop)]
    assert all(stop not in c.text for c in chunks)


@pytest.mark.parametrize("kw,name", [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                                     (dict(top_k=-5), "top_k"), (dict(max_tokens=-1), "max_tokens"),
                                     (dict(min_p=2), "min_p"), (dict(presence_penalty=3), "presence_penalty"),
                                     (dict(stop=[""]), "stop"), (dict(logprobs=99), "logprobs"),
                                     (dict(prompt_logprobs=21), "prompt_logprobs"),
                                     (dict(seed="x"), "seed"), (dict(stop_token_ids=[-1]), "stop_token_ids")])
def test_invalid_sampling_params_name_the_parameter(kw, name):
    with pytest.raises(ValueError, match=f"SamplingParams.{name}="):
        SamplingParams(**kw)


def test_async_stream_and_abort_on_cancel(llm):
    async def run():
        engine = AsyncEngine(llm.engine)
        got = [d async for d in engine.stream(EngineRequest("s1", [5, 6, 7], SamplingParams(max_tokens=5)))]
        gen = engine.stream(EngineRequest("s2", [5, 6, 7], SamplingParams(max_tokens=500, ignore_eos=True)))
        await gen.__anext__()
        await gen.aclose()  # a consumer that goes away aborts its request
        for _ in range(100):
            if not llm.engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            async for _ in engine.stream(EngineRequest("bad", [10**6], SamplingParams())):
                pass
        engine.shutdown()
        return got

    got = asyncio.run(run())
    assert sum(len(d.token_ids) for d in got) <= 5 and got[-1].finish_reason in ("length", "stop")
    assert not llm.engine.has_unfinished() and llm.engine.block_manager.num_allocated_blocks() == 0


def test_handoff_between_engines_decodes_like_one_engine(alone):
    """Prefill engine -> latents -> decode engine whose cache holds only a few requests at once, so most
    arrive with KV and wait: each is imported when admitted and decodes exactly what one engine does."""
    from rayinfer.config import EngineConfig
    from rayinfer.engine.engine import Engine

    prefill = Engine(EngineConfig.from_options("tiny", scheduler_mode="prefill"))
    decode = Engine(EngineConfig.from_options("tiny", scheduler_mode="decode", kv_cache_tokens=640))
    prompts = _prompts()[:12]
    got = hand_off(prefill, decode, prompts, GREEDY)
    assert decode.block_manager.num_allocated_blocks() == 0  # waiting requests hold no pages
    while decode.has_unfinished():
        for d in decode.step():
            got[d.request_id] += d.token_ids
    assert [got[str(i)] for i in range(len(prompts))] == alone[:12]
    assert decode.counters["kv_imported_tokens"] + decode.counters["prefill_tokens_computed"] >= sum(map(len, prompts))
    assert decode.counters["kv_imported_tokens"] > 0 and decode.block_manager.num_allocated_blocks() == 0


def test_outbox_carries_one_batch_per_step_for_all_its_requests(llm):
    """Requests submitted into one Outbox (a rank's channel to one ingress replica) come out as batches, each with
    what the steps since the last take made for all of them: every token of every request in order, each request's
    end completing its future; a request the engine refuses fails its future alone and puts nothing in them."""
    from rayinfer.engine.async_engine import Outbox

    base = llm.generate(["ab", "cde", "f"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                        use_tqdm=False)

    async def run():
        engine, box = AsyncEngine(llm.engine), Outbox()
        ids = [llm.tokenizer.encode(p) for p in ("ab", "cde", "f")]
        done = [engine.submit(EngineRequest(f"o{i}", x, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)),
                              box) for i, x in enumerate(ids)]
        bad = engine.submit(EngineRequest("bad", [10**6], SamplingParams()), box)
        batches = []
        while not all(d.done() for d in done) or not batches or box._items:
            batches.append(await box.take(5.0))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await bad
        await asyncio.gather(*done)
        engine.shutdown()
        return batches

    batches = [b for b in asyncio.run(run()) if b]
    assert len(batches) < sum(len(b) for b in batches) and max(len({d.request_id for d in b}) for b in batches) == 3
    for i, want in enumerate(base):
        mine = [d for b in batches for d in b if d.request_id == f"o{i}"]
        assert [t for d in mine for t in d.token_ids] == want.token_ids and mine[-1].finish_reason == "length"
    assert not any(d.request_id == "bad" for b in batches for d in b)


def test_null_runner_samples_printable_text_without_the_model_and_only_alone():
    from rayinfer.config import ConfigError

    out = LLM("tiny", null_runner=True).generate(["hi", "there"], SamplingParams(max_tokens=12, ignore_eos=True),
                                                 use_tqdm=False)
    assert [len(o.token_ids) for o in out] == [12, 12] and all(o.finish_reason == "length" for o in out)
    assert all(len(o.text) == 12 and o.text.isprintable() for o in out)
    with pytest.raises(ConfigError, match="null_runner"):
        LLM("tiny", null_runner=True, ep_size=2)
