"""The OpenAI endpoint end to end: a real server on 127.0.0.1 (prefill + decode gangs of 2 CPU ranks),
the official `openai` client, raw HTTP for hostile input, and the ranks' own counters."""
import asyncio
import json
import re
import time

import httpx
import openai
import pytest
import ray
from ray import serve

from rayinfer import LLM, SamplingParams
from rayinfer.actors.cluster import free_port
from rayinfer.actors.server import APP_NAME, start
from rayinfer.config import ServeConfig
from rayinfer.messages import Delta, EngineRequest, KVHandoff, pack, unpack

PROMPTS = [f"Request {i}: " + "lorem ipsum "[: 3 + i % 9] * (1 + i % 5) for i in range(64)]


@pytest.fixture(scope="module")
def server(ray_cluster):
    serve.shutdown()  # earlier tests may have started Serve without an HTTP proxy
    port = free_port()
    config = ServeConfig(port=port, max_queue=64, kv_transfer_timeout_s=2.0)
    url, _ = start(config)
    yield url, config
    serve.delete(APP_NAME)
    serve.shutdown()


@pytest.fixture(scope="module")
def offline():
    return LLM("tiny")


def _client(url, cls=openai.OpenAI):
    return cls(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _rank_stats(role: str) -> list[dict]:
    return serve.get_deployment_handle(role, app_name=APP_NAME).broadcast("stats").results(timeout_s=30)


def test_completions_and_chat_streamed_and_not(server, offline):
    url, config = server
    client = _client(url)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    want = offline.generate(["Hello, world"], SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)[0]
    c = client.completions.create(model="tiny", prompt="Hello, world", max_tokens=12, temperature=0)
    assert c.choices[0].text == want.text and c.choices[0].finish_reason == "length"
    assert c.usage.completion_tokens == 12 and c.usage.prompt_tokens == len(want.prompt_token_ids)
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="tiny", prompt="Hello, world", max_tokens=12, temperature=0, stream=True))
    assert streamed == want.text

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids = offline.tokenizer.encode(offline.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    want = offline.generate([ids], SamplingParams(max_tokens=10, temperature=0), use_tqdm=False)[0]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                       logprobs=True, top_logprobs=2)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert len(r.choices[0].logprobs.content) == 10 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    usage = chunks[-1].usage
    assert usage.completion_tokens == 10 and usage.prompt_tokens == len(ids)
    # a repeated long prompt is served from the prefix cache, and usage says so
    long = "The same long prompt, repeated to fill pages. " * 8
    client.completions.create(model="tiny", prompt=long, max_tokens=2, temperature=0)
    again = client.completions.with_raw_response.create(model="tiny", prompt=long, max_tokens=2, temperature=0)
    body = json.loads(again.text)["usage"]
    assert body["prompt_tokens_details"]["cached_tokens"] >= 256
    assert body["prompt_cache_hit_tokens"] + body["prompt_cache_miss_tokens"] == body["prompt_tokens"]


def test_logit_bias_forces_every_token_on_prefill_and_decode_ranks(server, offline):
    """+100 on one token: the prefill rank's first token and every decode-rank token are that token, sampled
    at temperature 1, streamed and not; -100 on the greedy first token moves it."""
    url, _ = server
    client = _client(url)
    forced = offline.tokenizer.decode([65] * 6)
    c = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=1.0, seed=1,
                                  logit_bias={"65": 100})
    assert c.choices[0].text == forced, c.choices[0].text
    chunks = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                            temperature=1.0, logit_bias={"65": 100}, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == forced
    greedy = offline.generate(["Hello"], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)[0]
    banned = client.completions.create(model="tiny", prompt=[int(t) for t in greedy.prompt_token_ids], max_tokens=1,
                                       temperature=0, logit_bias={str(greedy.token_ids[0]): -100}, logprobs=1)
    assert banned.choices[0].text != greedy.text


def test_structured_outputs_on_the_disaggregated_default(server):
    """parse() with a Pydantic model, a streamed json_schema and structured_outputs.choice: the prefill rank's first
    token and the decode rank's (after the handoff) all obey the grammar."""
    import pydantic

    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=6)
        age: int = pydantic.Field(ge=0, le=99)

    url, _ = server
    client = _client(url)
    messages = [{"role": "user", "content": "Who?"}]
    for seed in (1, 2):
        got = client.chat.completions.parse(model="tiny", messages=messages, response_format=Person, max_tokens=40,
                                            temperature=1.0, seed=seed)
        assert isinstance(got.choices[0].message.parsed, Person), got.choices[0].message.content
    fmt = {"type": "json_schema", "json_schema": {"name": "P", "schema": Person.model_json_schema(), "strict": True}}
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=messages, response_format=fmt, max_tokens=40, temperature=1.0, seed=5, stream=True)
        if c.choices)
    Person.model_validate_json(text)
    c = client.completions.create(model="tiny", prompt="Pick", max_tokens=8, temperature=1.0,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no way"]}})
    assert c.choices[0].text in ("yes", "no way")
    with pytest.raises(openai.BadRequestError, match="does not compile"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"structured_outputs": {"regex": "(a"}})


def test_named_tool_choice_returns_arguments_that_match_the_schema(server):
    """A named tool_choice constrains the output to the function's parameters, streamed and not; "required" to a
    list of calls to the tools."""
    import pydantic

    class Args(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=5)
        days: int = pydantic.Field(ge=1, le=9)

    url, _ = server
    client = _client(url)
    tool = {"type": "function", "function": {"name": "forecast", "parameters": Args.model_json_schema()}}
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Paris?"}], tools=[tool], max_tokens=48,
              tool_choice={"type": "function", "function": {"name": "forecast"}}, temperature=1.0, seed=3)
    got = client.chat.completions.create(**kw).choices[0]
    call = got.message.tool_calls[0]
    assert (len(got.message.tool_calls), call.function.name, got.finish_reason) == (1, "forecast", "stop")
    Args.model_validate_json(call.function.arguments)
    args, names = "", []
    for chunk in client.chat.completions.create(**kw, stream=True):
        for d in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            names += [d.function.name] if d.function.name else []
            args += d.function.arguments or ""
    assert names == ["forecast"]
    Args.model_validate_json(args)
    kw.update(tool_choice="required", parallel_tool_calls=False, max_tokens=96)
    got = client.chat.completions.create(**kw).choices[0]
    assert (got.finish_reason, [c.function.name for c in got.message.tool_calls]) == ("tool_calls", ["forecast"])
    Args.model_validate_json(got.message.tool_calls[0].function.arguments)


def test_echo_logprobs_equal_the_offline_prompt_logprobs(server, offline):
    """echo + logprobs (max_tokens 0 and 3, streamed and not) and vLLM's prompt_logprobs: the prefill rank computes
    every prompt position (a cached prefix too) and its values are the offline engine's within 1e-4 (fp32)."""
    url, _ = server
    client = _client(url)
    prompt = "Score this sentence token by token, please: the quick brown fox jumps over the lazy dog. " * 2
    client.completions.create(model="tiny", prompt=prompt, max_tokens=1)  # its pages are now in the prefix cache
    want = offline.generate([prompt], SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=1),
                            use_tqdm=False)[0]
    ids = want.prompt_token_ids
    ref = [e[t] for e, t in zip(want.prompt_logprobs[1:], ids[1:])]

    def close(got):
        assert got[0] is None and len(got) == len(ids) and max(abs(a - b) for a, b in zip(got[1:], ref)) < 1e-4

    for max_tokens in (0, 3):
        c = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, echo=True,
                                      logprobs=1)
        ch = c.choices[0]
        assert ch.text == prompt + want.text[:len(ch.text) - len(prompt)] and c.usage.completion_tokens == max_tokens
        assert len(ch.logprobs.tokens) == len(ids) + max_tokens and ch.logprobs.top_logprobs[0] is None
        close(ch.logprobs.token_logprobs[:len(ids)])
    assert ch.text == prompt + want.text
    chunks = [x.choices[0] for x in client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0,
                                                              echo=True, logprobs=1, stream=True)]
    assert "".join(x.text for x in chunks) == ch.text
    assert sum((x.logprobs.token_logprobs for x in chunks), []) == ch.logprobs.token_logprobs
    c = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, extra_body={"prompt_logprobs": 0})
    close([e and e[str(t)]["logprob"] for e, t in zip(c.choices[0].model_extra["prompt_logprobs"], ids)])
    messages = [{"role": "user", "content": prompt}]  # chat: vLLM returns them beside the choices
    ids = offline.tokenizer.encode(offline.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    want = offline.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    ref = [e[t] for e, t in zip(want.prompt_logprobs[1:], ids[1:])]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1, extra_body={"prompt_logprobs": 0})
    close([e and e[str(t)]["logprob"] for e, t in zip(r.model_extra["prompt_logprobs"], ids)])


def test_chat_prefix_completion_continues_the_text_and_fim_needs_fim_tokens(server, offline):
    """DeepSeek's prefix completion: the reply continues the assistant text (the rendered turn left open), as the
    offline engine continues that prompt, streamed and not. `suffix` on tiny (no FIM tokens): a 400 naming them."""
    url, _ = server
    client = _client(url)
    ask = [{"role": "user", "content": "Write a loop"}]
    tok = offline.tokenizer
    ids = tok.encode(tok.apply_chat_template(ask + [{"role": "assistant", "content": "for i in"}],
                                             add_generation_prompt=False).removesuffix("<｜end▁of▁sentence｜>"),
                     add_special_tokens=False)
    want = offline.generate([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    kw = dict(model="tiny", messages=ask + [{"role": "assistant", "content": "for i in", "prefix": True}],
              max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    got = client.chat.completions.create(**kw)
    assert got.choices[0].message.content == want.text and got.usage.prompt_tokens == len(ids)
    assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                   if c.choices) == want.text
    with pytest.raises(openai.BadRequestError, match="FIM tokens") as e:
        client.completions.create(model="tiny", prompt="def f(", suffix="):\n    pass", max_tokens=4)
    assert e.value.param == "suffix"


def test_64_concurrent_streams_match_offline(server, offline):
    url, _ = server
    want = [o.text for o in offline.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)]

    async def one(client, prompt):
        text = ""
        async for ch in await client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                                         stream=True):
            text += ch.choices[0].text
        return text

    async def run():
        async with _client(url, openai.AsyncOpenAI) as client:
            return await asyncio.gather(*(one(client, p) for p in PROMPTS))

    got = asyncio.run(run())
    assert got == want


def _metric_sum(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_show_prefill_on_prefill_ranks_and_decode_on_decode_ranks(server):
    url, _ = server
    deadline, text = time.time() + 30, ""
    while time.time() < deadline:  # Ray exports metrics about once a second
        text = httpx.get(url + "/metrics", timeout=10).text
        if _metric_sum(text, "rayinfer_rank_decode_tokens_total", role="decode") > 900 and \
                _metric_sum(text, "rayinfer_rank_kv_transfers_total", role="decode", outcome="done") >= 64:
            break
        time.sleep(1)
    prefill_on_prefill = _metric_sum(text, "rayinfer_rank_prefill_tokens_total", role="prefill")
    decode_on_decode = _metric_sum(text, "rayinfer_rank_decode_tokens_total", role="decode")
    prefill_on_decode = _metric_sum(text, "rayinfer_rank_prefill_tokens_total", role="decode")
    failed = _metric_sum(text, "rayinfer_rank_kv_transfers_total", role="decode", outcome="failed")
    preempted = _metric_sum(text, "rayinfer_rank_preemptions_total", role="decode")
    print(f"\n[serve] prefill tokens on prefill ranks {prefill_on_prefill:.0f}, decode tokens on decode ranks "
          f"{decode_on_decode:.0f}; on decode ranks: {prefill_on_decode:.0f} prompt tokens recomputed, "
          f"{failed:.0f} failed KV transfers, {preempted:.0f} preemptions")
    assert prefill_on_prefill > 1000 and decode_on_decode > 900
    assert _metric_sum(text, "rayinfer_rank_decode_tokens_total", role="prefill") == 0
    # A decode rank computes prompt tokens only as a fallback: a KV transfer that failed (this module's 2 s
    # timeout can expire on a loaded machine) or a sequence preempted for lack of pages and recomputed.
    assert prefill_on_decode == 0 or failed + preempted > 0
    assert failed <= 2  # the handoff works: at most a couple of the 64+ transfers time out
    # ...and those failures explain every such token, count for count: each request a decode rank took without
    # its KV is one failed transfer, and the prompt tokens computed there are at most what those requests and
    # the preempted sequences hold (prefix-cache hits can make it fewer, nothing can make it more).
    stats = _rank_stats("decode")
    assert sum(s["requests_without_kv"] for s in stats) == sum(s["kv_transfers"]["failed"] for s in stats)
    assert sum(s["num_preemptions"] for s in stats) >= preempted
    budget = sum(s["recompute_budget_tokens"] for s in stats)
    assert sum(s["prefill_tokens_computed"] for s in stats) <= budget, (prefill_on_decode, failed, preempted, budget)
    assert _metric_sum(text, "rayinfer_rank_kv_transfers_total", role="decode", outcome="done") >= 64
    for name in ("rayinfer_time_to_first_token_seconds_count", "rayinfer_prompt_tokens_total",
                 "rayinfer_generation_tokens_total", "rayinfer_rank_kv_usage", "rayinfer_ingress_queue_depth"):
        assert name in text, name


HOSTILE = [  # (raw body or JSON-able object, path, status, fragment of the message)
    (b"{not json", "completions", 400, "not valid JSON"),
    (b"", "completions", 400, "not valid JSON"),
    ([1, 2, 3], "completions", 400, "JSON object"),
    ({"prompt": "x"}, "completions", 400, "model"),
    ({"model": "gpt-4", "prompt": "x"}, "completions", 404, "gpt-4"),
    ({"model": "tiny"}, "completions", 400, "prompt"),
    ({"model": "tiny", "prompt": ""}, "completions", 400, "prompt"),
    ({"model": "tiny", "prompt": [10 ** 9]}, "completions", 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "completions", 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "ten"}, "completions", 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 100000}, "completions", 400, "maximum context length"),
    ({"model": "tiny", "prompt": "x", "temperature": 9}, "completions", 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "temperature": True}, "completions", 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, "completions", 400, "top_p"),
    ({"model": "tiny", "prompt": "x", "n": 99}, "completions", 400, "n"),
    ({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "completions", 400, "stop"),
    ({"model": "tiny", "prompt": "x", "logprobs": 50}, "completions", 400, "logprobs"),
    ({"model": "tiny", "prompt": "x", "presence_penalty": -5}, "completions", 400, "presence_penalty"),
    ({"model": "tiny", "prompt": "x", "seed": "abc"}, "completions", 400, "seed"),
    ({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, "completions", 400, "stream"),
    ({"model": "tiny", "prompt": "x", "frobnicate": 1}, "completions", 400, "frobnicate"),
    ({"model": "tiny", "prompt": "x", "suffix": "y"}, "completions", 400, "FIM tokens"),
    ({"model": "tiny", "messages": []}, "chat/completions", 400, "messages"),
    ({"model": "tiny", "messages": "hello"}, "chat/completions", 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "chat/completions", 400, "role"),
    ({"model": "tiny", "messages": [{"role": "user"}]}, "chat/completions", 400, "content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "chat/completions", 400,
     "top_logprobs"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "chat/completions", 400, "tools"),
]


def test_hostile_requests_get_openai_errors_and_server_stays_healthy(server):
    url, _ = server
    assert len(HOSTILE) >= 20
    with httpx.Client(base_url=url, timeout=30) as http:
        for body, path, status, fragment in HOSTILE:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = http.post(f"/v1/{path}", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == status, (body, r.status_code, r.text)
            err = r.json()["error"]
            assert fragment.lower() in err["message"].lower(), (body, err)
            assert err["type"] in ("invalid_request_error", "not_found_error")
        assert http.get("/health").status_code == 200
    c = _client(url).completions.create(model="tiny", prompt="still fine", max_tokens=3, temperature=0)
    assert len(c.choices[0].text) > 0 or c.usage.completion_tokens == 3


def test_burst_beyond_queue_gets_429_with_retry_after(server):
    url, config = server

    async def one(http):
        return await http.post("/v1/completions", json={"model": "tiny", "prompt": "burst", "max_tokens": 40,
                                                        "temperature": 0, "ignore_eos": True})

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=120,
                                     limits=httpx.Limits(max_connections=300)) as http:
            return await asyncio.gather(*(one(http) for _ in range(3 * config.max_queue)))

    responses = asyncio.run(run())
    codes = [r.status_code for r in responses]
    print(f"\n[serve] burst of {len(codes)}: {codes.count(200)} served, {codes.count(429)} refused with 429")
    assert set(codes) <= {200, 429} and codes.count(429) > 0 and codes.count(200) >= config.max_queue // 2
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "rate_limit_error"
    assert httpx.get(url + "/health").status_code == 200


def test_mid_stream_disconnects_free_all_kv(server):
    url, _ = server

    async def read_a_bit_then_leave(http, i):
        async with http.stream("POST", "/v1/completions", json={
                "model": "tiny", "prompt": f"disconnect {i} " * 5, "max_tokens": 2000, "temperature": 0,
                "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    return  # leaving the context manager closes the connection mid-stream

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            await asyncio.gather(*(read_a_bit_then_leave(http, i) for i in range(50)))

    asyncio.run(run())
    left = time.time()
    deadline = left + 30
    while time.time() < deadline:
        stats = _rank_stats("prefill") + _rank_stats("decode")
        if all(s["kv_blocks_used"] == 0 and s["num_requests"] == 0 for s in stats):
            break
        time.sleep(0.5)
    print(f"all KV freed {time.time() - left:.2f}s after the clients left")
    if not all(s["kv_blocks_used"] == 0 and s["num_requests"] == 0 for s in stats):
        # Which request is left, with how many tokens, and whether the ingress still streams it.
        depth = _metric_sum(httpx.get(url + "/metrics", timeout=10).text, "rayinfer_ingress_queue_depth")
        pytest.fail(f"KV left after the disconnects (ingress queue depth {depth:.0f}): "
                    f"{[(s['role'], s['rank'], s['kv_blocks_used'], s['live_requests']) for s in stats]}")


@ray.remote(num_cpus=0)
def _never():
    time.sleep(3600)


def test_failed_kv_transfer_falls_back_to_reprefill(server, offline):
    """A decode rank handed KV it cannot use (wrong payload, never arrives) or none at all re-prefills."""
    import torch

    prompt = offline.tokenizer.encode("transfer failure test")
    params = SamplingParams(max_tokens=8, temperature=0)
    want = offline.generate([prompt], params, use_tqdm=False)[0].token_ids
    decode = serve.get_deployment_handle("decode", app_name=APP_NAME)
    bad = ray.put(torch.zeros(3, len(prompt), 40))  # the wrong latent width
    before = sum(s["kv_transfers"]["failed"] for s in _rank_stats("decode"))
    for i, ref in enumerate((bad, _never.remote(), None)):
        req = EngineRequest(f"kvfail-{i}", prompt, params, time.time(), [want[0]], 0)
        handoff = KVHandoff([ref], len(prompt), time.time(), "test") if ref is not None else None
        got = [want[0]]
        for raw in decode.options(stream=True).decode.remote(pack(req), handoff):
            got += unpack(raw, Delta).token_ids
        assert got == want
    assert sum(s["kv_transfers"]["failed"] for s in _rank_stats("decode")) - before == 2


def test_serve_refuses_a_busy_port(server):
    url, config = server
    from rayinfer.actors.server import check_port_free
    from rayinfer.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(f"127.0.0.1:{config.port}")):
        check_port_free("127.0.0.1", config.port)


def _listening_sockets() -> dict[int, str]:
    """inode -> local address of every listening TCP socket on this machine (from /proc/net)."""
    import ipaddress

    found = {}
    for name, width in (("tcp", 8), ("tcp6", 32)):
        with open(f"/proc/net/{name}") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] != "0A":  # LISTEN
                    continue
                hexip = cols[1].split(":")[0]
                raw = bytes.fromhex(hexip)
                # /proc prints each 32-bit word little-endian
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found[int(cols[9])] = str(ipaddress.ip_address(raw))
    return found


def test_local_cluster_listens_on_loopback_only(server):
    """Ray, the Serve proxy, the replicas' gRPC servers and gloo: nothing of ours faces the network."""
    import ipaddress
    import os

    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    sockets, ours = _listening_sockets(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            if "ray" not in cmd and "gcs_server" not in cmd and int(pid) != os.getpid():
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and int(link[8:-1]) in sockets:
                    ours.append((cmd[:60], sockets[int(link[8:-1])]))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    assert len(ours) >= 10, ours  # GCS, raylet, proxy, replicas... were all seen
    exposed = [(cmd, addr) for cmd, addr in ours
               if not ipaddress.ip_address(addr).is_loopback
               and not (addr.startswith("::ffff:") and ipaddress.ip_address(addr).ipv4_mapped.is_loopback)]
    assert not exposed, exposed


def test_rebalance_command_reaches_every_gang_and_changes_no_output(server, offline, capsys):
    """`rayinfer rebalance`: each gang re-places its experts from the load it measured, between steps."""
    from rayinfer.actors.server import rebalance
    from rayinfer.cli import main

    url, config = server
    client = _client(url)
    prompts = PROMPTS[:8]
    want = [o.text for o in offline.generate(prompts, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)]
    got = lambda: [client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text
                   for p in prompts]  # noqa: E731
    assert got() == want  # the ranks have measured some load now
    done = rebalance(None)
    assert set(done) == {"prefill", "decode"}
    for role, gangs in done.items():
        assert len(gangs) == 1 and gangs[0]["role"] == role and gangs[0]["rank"] == 0
        assert "skipped" not in gangs[0] and gangs[0]["imbalance_before"] >= 1.0
    assert got() == want
    assert all(s["eplb_rebalances"] >= 1 for s in _rank_stats("prefill") + _rank_stats("decode"))
    assert main(["rebalance"]) == 0
    printed = capsys.readouterr().out
    assert "prefill gang" in printed and "decode gang" in printed and "imbalance before" in printed
