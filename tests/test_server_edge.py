"""The HTTP edge of a real server on 127.0.0.1, started with API keys and a KV cache far smaller than the
model's context: hostile input (huge bodies, bad Unicode, deep nesting, wrong routes and methods),
401s, the max_tokens default that fits the cache, vLLM's benchmark bodies, /tokenize, `extra_body`."""
import asyncio
import json
import time

import httpx
import openai
import pytest
from ray import serve

from rayinfer.actors.cluster import free_port
from rayinfer.actors.server import APP_NAME, start
from rayinfer.config import ServeConfig

KEYS = ("first-key", "second-key")
AUTH = {"Authorization": f"Bearer {KEYS[1]}"}
TEN_MB = 10 * 2**20


@pytest.fixture(scope="module")
def server(ray_cluster):
    serve.shutdown()
    config = ServeConfig(port=free_port(), max_queue=64, kv_cache_memory=2**18, api_keys=KEYS)
    url, _ = start(config)
    yield url
    serve.delete(APP_NAME)
    serve.shutdown()


def _post(http, path, body, headers=AUTH):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(path, content=raw, headers={"content-type": "application/json", **headers})


def _is_error(r, status, fragment=""):
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and fragment.lower() in err["message"].lower(), err
    return err


def test_api_key_is_required_on_v1_but_not_health(server):
    with httpx.Client(base_url=server, timeout=60) as http:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEYS[0]}):
            err = _is_error(_post(http, "/v1/completions", body, headers), 401, "API key")
            assert err["type"] == "authentication_error" and KEYS[0] not in json.dumps(err)
        _is_error(http.get("/v1/models"), 401)
        _is_error(_post(http, "/tokenize", {"prompt": "x"}, {}), 401)
        assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200
        for key in KEYS:
            assert _post(http, "/v1/completions", body, {"Authorization": f"Bearer {key}"}).status_code == 200


def test_wrong_routes_methods_and_hostile_bodies_get_openai_errors(server):
    with httpx.Client(base_url=server, timeout=60, headers=AUTH) as http:
        err = _is_error(http.get("/v1/completions"), 405, "POST")
        assert err["type"] == "invalid_request_error"
        _is_error(http.post("/v1/models"), 405, "GET")
        _is_error(http.get("/v1/nothing-here"), 404, "/v1/nothing-here")
        _is_error(http.delete("/v1/chat/completions"), 405)
        for raw, fragment in ((b'{"model": "tiny", "prompt": "\\ud800abc"}', "surrogate"),
                              (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}', "surrogate"),
                              (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
                              (b'"a string"', "JSON object"), (b"42", "JSON object"), (b"\xff", "UTF-8")):
            for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
                _is_error(_post(http, path, raw), 400, fragment)
        assert http.get("/health").status_code == 200
        r = _post(http, "/v1/completions", {"model": "tiny", "prompt": "still fine", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_three_10mb_bodies_do_not_stall_a_small_request(server):
    async def huge(http, i):
        t0 = time.perf_counter()
        r = await http.post("/v1/completions", content=b'{"model": "tiny", "prompt": "' + b"x" * TEN_MB + b'"}',
                            headers={"content-type": "application/json", **AUTH})
        return r, time.perf_counter() - t0

    async def small(http):
        await asyncio.sleep(0.05)  # sent while the big bodies are in flight
        t0 = time.perf_counter()
        r = await http.post("/v1/completions", json={"model": "tiny", "prompt": "small", "max_tokens": 4},
                            headers=AUTH)
        return r, time.perf_counter() - t0

    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=120) as http:
            return await asyncio.gather(*(huge(http, i) for i in range(3)), small(http))

    *bigs, (r_small, t_small) = asyncio.run(run())
    print(f"\n[edge] 10 MB bodies rejected after {', '.join(f'{t:.2f}s' for _, t in bigs)}; "
          f"the small request completed in {t_small:.2f}s")
    for r, _ in bigs:
        _is_error(r, 413, "max_request_bytes")
    assert r_small.status_code == 200, r_small.text
    assert max(t for _, t in bigs) < 15 and t_small < 15  # generous: the figures above are what counts


def test_default_max_tokens_fits_a_small_kv_cache(server):
    stats = serve.get_deployment_handle("decode", app_name=APP_NAME).broadcast("stats").results(timeout_s=30)
    capacity = min(s["kv_capacity_tokens"] for s in stats)
    assert capacity < 4096  # smaller than tiny's context, so the old default (context - prompt) cannot fit
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEYS[0], max_retries=0, timeout=300)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=0,
                                       extra_body={"ignore_eos": True})
    # disaggregated: the decode rank counts the handed-off first token twice, so one token less than the cache
    assert r.usage.prompt_tokens + r.usage.completion_tokens == capacity - 1 and r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match=f"at most {capacity - 1} tokens of KV cache"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=capacity)


def test_vllm_benchmark_bodies_and_openai_extra_body(server):
    from test_http_edge import VLLM_CHAT, VLLM_COMPLETION

    with httpx.Client(base_url=server, timeout=120, headers=AUTH) as http:
        for path, body in (("/v1/completions", VLLM_COMPLETION), ("/v1/chat/completions", VLLM_CHAT)):
            with http.stream("POST", path, json=body) as r:
                assert r.status_code == 200
                events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            assert events[-1]["usage"]["completion_tokens"] == 8, events[-1]
        tok = _post(http, "/tokenize", {"model": "tiny", "prompt": "hello", "return_token_strs": True}).json()
        assert tok["count"] == len(tok["tokens"]) == len(tok["token_strs"])
        assert _post(http, "/detokenize", {"tokens": tok["tokens"]}).json() == {"prompt": "hello"}
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEYS[0], max_retries=0, timeout=120)
    c = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0, extra_body={
        "repetition_penalty": 1.0, "min_tokens": 2, "top_k": 5, "min_p": 0.0, "stop_token_ids": [],
        "skip_special_tokens": True, "include_stop_str_in_output": False, "spaces_between_special_tokens": True})
    assert c.usage.completion_tokens >= 2
    with pytest.raises(openai.BadRequestError, match="frobnicate"):
        client.completions.create(model="tiny", prompt="Hello", max_tokens=2, extra_body={"frobnicate": 1})
