"""The front door against hostile clients, on a real server on 127.0.0.1 (prefill + decode gangs of 2 CPU ranks):
the poison request and the fan-out body of issue #18 are refused with 400 and no rank fails; a sequence a rank
fails on purpose (the ranks' `set_fault` hook) fails its own request alone, on a prefill rank and on a decode
rank, while the streams beside it finish as they do without it; and `FUZZ_SECONDS` of random valid and invalid
bodies (every field, extreme sizes and ids, garbage JSON, clients that leave mid-stream) get no 5xx, leave every
rank up (no gang restarted), every KV page free, and a normal request still completes."""
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import httpx
import pytest
from ray import serve

from rayinfer.actors.cluster import free_port
from rayinfer.actors.server import APP_NAME, start
from rayinfer.config import ServeConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _faults as F  # noqa: E402

FUZZ_SECONDS = 120.0  # CI runs the suite once: this is the whole fuzz budget
FUZZ_CLIENTS = 6
VOCAB, MAX_LEN = 320, 4096  # the tiny preset's
MARK = [7, 7, 7, 7]  # a prompt starting with this fails on a rank whose fault hook is set
POISON = {"model": "tiny", "prompt": "hi", "max_tokens": 4, "stop_token_ids": [99999], "min_tokens": 1}
FANOUT = {"model": "tiny", "prompt": ["hi"] * 4000, "n": 16, "max_tokens": 1}
SMALL = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def server(ray_cluster):
    serve.shutdown()
    url, _ = start(ServeConfig(port=free_port(), max_queue=128))
    ranks = _ranks()
    yield url, ranks
    serve.delete(APP_NAME)
    serve.shutdown()


def _ranks() -> list[tuple]:
    """(role, gang, pid) of every rank that answers: a failed or restarted rank changes it."""
    return sorted((role, s["gang_id"], s["pid"]) for role in ("prefill", "decode") for s in F.rank_stats(role))


def check_nothing_failed(url: str, ranks: list[tuple]) -> None:
    assert _ranks() == ranks, "a rank failed or its gang restarted"
    left = asyncio.run(F.settled(60.0))
    assert not left, f"ranks still hold (role, rank, pid, exports, KV objects, accepted KV, pages, requests): {left}"
    r = httpx.post(url + "/v1/completions", json=SMALL, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
    health = httpx.get(url + "/health", timeout=10).json()
    assert health["quarantined"] == 0 and health["resumed"] == 0, health
    assert health["inflight"] == health["queued_choices"] == health["queued_tokens"] == 0, health


def test_poison_and_fanout_are_refused_while_a_small_request_is_served(server):
    url, ranks = server

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            poison = await http.post("/v1/completions", json=POISON)
            fanout = asyncio.create_task(http.post("/v1/completions", json=FANOUT))
            small = await http.post("/v1/completions", json=SMALL)
            return poison, await fanout, small, (await http.get("/health")).json()

    poison, fanout, small, health = asyncio.run(run())
    assert poison.status_code == 400 and poison.json()["error"]["param"] == "stop_token_ids", poison.text
    assert "99999" in poison.json()["error"]["message"] and f"[0, {VOCAB})" in poison.json()["error"]["message"]
    assert fanout.status_code == 400 and "4000 prompts" in fanout.json()["error"]["message"], fanout.text
    assert small.status_code == 200, small.text
    assert set(health) >= {"inflight", "queued_choices", "queued_tokens", "parsing"}
    check_nothing_failed(url, ranks)


def _streams(url: str, bodies: list[dict]) -> list[dict]:
    return asyncio.run(F.run_streams(url, bodies))[0]


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_a_sequence_failing_on_a_rank_fails_alone(server, role):
    url, ranks = server
    bodies = [F.body(i, p, 12) for i, p in enumerate(F.prompts(8, 30, tag=18))]
    ref = _streams(url, bodies)
    assert not [r for r in ref if F.failed(r)], "the run without the fault failed"
    handle = serve.get_deployment_handle(role, app_name=APP_NAME)
    handle.broadcast("set_fault", MARK).results(timeout_s=30)
    try:
        async def run():
            async with httpx.AsyncClient(base_url=url, timeout=120) as http:
                culprit = asyncio.create_task(http.post("/v1/completions", json={
                    "model": "tiny", "prompt": MARK + [9] * 20, "max_tokens": 12, "temperature": 0}))
                got = await F.run_streams(url, bodies)
                return await culprit, got[0]

        culprit, got = asyncio.run(run())
    finally:
        handle.broadcast("set_fault", None).results(timeout_s=30)
    err = culprit.json()["error"]
    assert culprit.status_code == 500 and "failed in sampling" in err["message"] and "not retried" in err["message"]
    bad = [(i, r["status"], r["errors"], r["finish"]) for i, r in enumerate(got) if F.failed(r)]
    assert not bad, f"streams beside the failing one failed: {bad}"
    assert not [i for i, r in enumerate(got) if F.differs(r, ref[i])], "streams beside the failing one changed"
    check_nothing_failed(url, ranks)


# ---- the fuzz ---------------------------------------------------------------------------------------------

_IDS = [0, 5, VOCAB - 1, VOCAB, -1, 99999, 2**31, 2**63, 2**64, 1.0, True, "5", None]
_NUMS = [0, 0.5, 1, 2, -1, -3, 1e308, 1e-308, 3.5, 100, 101, True, "1", None, [], {}]


def _tokens(rng: random.Random) -> list:
    k = rng.choice([1, 3, 20, MAX_LEN - 8, MAX_LEN + 10])
    ids = [rng.randrange(VOCAB) for _ in range(k)]
    if rng.random() < 0.3:
        ids[rng.randrange(k)] = rng.choice(_IDS)
    return ids


def _text(rng: random.Random) -> str:
    return rng.choice(["hi", "Hello, world", "", "é🙂\u0000", "x" * rng.choice([10, 5000, 40000]), "<|eos|>"])


def _prompt(rng: random.Random):
    shape = rng.random()
    if shape < 0.35:
        return _text(rng)
    if shape < 0.55:
        return _tokens(rng)
    if shape < 0.75:
        return [_text(rng) for _ in range(rng.choice([1, 2, 5, 300]))]
    if shape < 0.9:
        return [_tokens(rng)[:rng.choice([1, 8, 64])] for _ in range(rng.choice([1, 3, 257]))]
    return rng.choice([[], [[]], {}, 5, None, [1, "a"], [[1], "a"], True])


def _stop(rng: random.Random):
    return rng.choice(["\n", "", ["a", "b"], ["x"] * rng.choice([4, 5, 100]), [5], None, "y" * 3000])


def _stop_ids(rng: random.Random):
    return rng.choice([[1], [], [rng.choice(_IDS)], [rng.randrange(VOCAB) for _ in range(rng.choice([64, 65, 5000]))],
                       5, None, "1"])


_FIELDS = {
    "max_tokens": lambda r: r.choice([1, 2, 4, 8, 0, -1, MAX_LEN, 2**40, 1.5, True, "4", None]),
    "temperature": lambda r: r.choice(_NUMS), "top_p": lambda r: r.choice(_NUMS),
    "top_k": lambda r: r.choice([-2, -1, 0, 1, 5, VOCAB, 2**40, 1.5, None]),
    "min_p": lambda r: r.choice(_NUMS), "presence_penalty": lambda r: r.choice(_NUMS),
    "frequency_penalty": lambda r: r.choice(_NUMS), "repetition_penalty": lambda r: r.choice(_NUMS),
    "n": lambda r: r.choice([1, 2, 4, 16, 17, 0, -1, 1.0, True, None]),
    "stop": _stop, "stop_token_ids": _stop_ids,
    "seed": lambda r: r.choice([0, 1, -1, 2**63 - 1, 2**63, -(2**63) - 1, 1.5, "1", None]),
    "stream": lambda r: r.choice([True, False, 1, "yes", None]),
    "stream_options": lambda r: r.choice([{"include_usage": True}, {"include_usage": 1}, {"x": 1}, [], None]),
    "ignore_eos": lambda r: r.choice([True, False, 0, None]),
    "logprobs": lambda r: r.choice([0, 1, 5, 6, -1, True, None]),
    "min_tokens": lambda r: r.choice([0, 1, 4, 9, -1, 2**40, None]),
    "logit_bias": lambda r: r.choice([{}, {"5": 10}, {str(VOCAB): 1}, [], None]),
    "echo": lambda r: r.choice([False, True, None]), "best_of": lambda r: r.choice([1, 2, True, None]),
    "suffix": lambda r: r.choice(["", "x", None]), "user": lambda r: r.choice(["u", 5, None]),
    "model": lambda r: r.choice(["tiny", "tinY", "", 5, None]),
    "bogus_field": lambda r: 1,
}
_CHAT_FIELDS = {
    "max_completion_tokens": _FIELDS["max_tokens"],
    "logprobs": lambda r: r.choice([True, False, 1, None]),
    "top_logprobs": lambda r: r.choice([0, 1, 20, 21, -1, None]),
    "tools": lambda r: r.choice([[], [{"type": "function"}], None]),
    "tool_choice": lambda r: r.choice(["none", "auto", None]),
    "response_format": lambda r: r.choice([{"type": "text"}, {"type": "json_object"}, None]),
}


def _messages(rng: random.Random):
    roles = ["user", "system", "assistant", "tool", "", None]
    if rng.random() < 0.1:
        return rng.choice([[], {}, "hi", [5], [{"role": "user"}], None])
    count = rng.choice([1, 2, 3, 50])
    return [{"role": rng.choice(roles) if rng.random() < 0.1 else rng.choice(["user", "system"]),
             "content": rng.choice([_text(rng), [{"type": "text", "text": "hi"}], [{"type": "image_url"}], 5, None])
             if rng.random() < 0.3 else "Hi there"} for _ in range(count)]


def _garbage(rng: random.Random) -> bytes:
    return rng.choice([b"", b"{", b"[]", b"null", b"5", b'"x"', b"{" * 100 + b"}" * 100, b'{"model": "tiny", "prompt": "\\ud800"}',
                       b"\xff\xfe", b'{"model": "tiny", "prompt": ' + b"[" * 70 + b"]" * 70 + b"}",
                       json.dumps({"model": "tiny", "prompt": [[5] * 3] * 20000}).encode()])


def fuzz_request(rng: random.Random) -> tuple[str, bytes]:
    """A random (path, body): mostly a valid request with a few fields changed, sometimes garbage."""
    if rng.random() < 0.06:
        return rng.choice(["/v1/completions", "/v1/chat/completions", "/tokenize"]), _garbage(rng)
    chat = rng.random() < 0.35
    body = {"model": "tiny", "max_tokens": rng.choice([1, 2, 4]), "temperature": rng.choice([0, 0.7]),
            **({"messages": [{"role": "user", "content": "Hi there"}]} if chat else {"prompt": "Hello"})}
    fields = dict(_FIELDS, **_CHAT_FIELDS) if chat else _FIELDS
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        name = rng.choice([*fields, "messages" if chat else "prompt"])
        value = _messages(rng) if name == "messages" else _prompt(rng) if name == "prompt" else fields[name](rng)
        if value is None and rng.random() < 0.5:
            body.pop(name, None)
        else:
            body[name] = value
    if chat and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_completion_tokens"] = 4  # the default is what the context leaves: thousands of tokens to wait for
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if not chat and rng.random() < 0.05:
        path = rng.choice(["/tokenize", "/detokenize"])
    return path, json.dumps(body).encode()


async def _send(http, path: str, raw: bytes, leave_early: bool) -> tuple[int, list[str]]:
    """-> (status, server errors seen in-band): a stream is read to its end, or left after its first chunk."""
    errors = []
    async with http.stream("POST", path, content=raw, headers={"content-type": "application/json"}) as r:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"error"' in line:
                    err = json.loads(line[6:])["error"]
                    if err.get("type") == "server_error":
                        errors.append(err.get("message"))
                if leave_early:
                    break
        else:
            await r.aread()
            if r.status_code >= 500:
                errors.append(r.text[:300])
        return r.status_code, errors


def test_fuzz_the_front_door(server):
    url, ranks = server
    codes: dict = {}
    server_errors: list[tuple] = []

    async def client(k: int):
        rng = random.Random(1800 + k)
        deadline = time.monotonic() + FUZZ_SECONDS
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            while time.monotonic() < deadline:
                path, raw = fuzz_request(rng)
                try:
                    status, errors = await _send(http, path, raw, leave_early=rng.random() < 0.1)
                except httpx.TimeoutException as e:  # a stalled request is a failure to report, with its body
                    status, errors = "timeout", [repr(e)]
                codes[status] = codes.get(status, 0) + 1
                if status == "timeout" or status >= 500 or errors:
                    server_errors.append((status, errors, path, raw[:300]))

    async def clients():
        await asyncio.wait_for(asyncio.gather(*(client(k) for k in range(FUZZ_CLIENTS))), FUZZ_SECONDS + 180)

    t0 = time.monotonic()
    asyncio.run(clients())
    print(f"\n[fuzz] {sum(codes.values())} requests in {time.monotonic() - t0:.0f}s: {dict(sorted(codes.items(), key=str))}")
    assert not server_errors, f"{len(server_errors)} server errors, the first: {server_errors[:3]}"
    assert codes.get(200, 0) > 50 and codes.get(400, 0) > 50, codes  # both valid and invalid bodies got through
    check_nothing_failed(url, ranks)
