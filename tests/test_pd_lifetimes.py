"""Request lifetimes across prefill/decode disaggregation on a real server on 127.0.0.1: requests cancelled
before their prefill, between prefill and decode, and mid-decode leave nothing behind on any rank (no
exports, no KV objects in Ray's object store, no pages in use), and handed-off KV leaves the object store
as soon as the decode rank holds it, not when the request ends."""
import asyncio
import random
import re
import time

import httpx
import pytest
import ray
from ray import serve

from rayinfer.actors.cluster import free_port
from rayinfer.actors.server import APP_NAME, start
from rayinfer.config import ServeConfig
from rayinfer.messages import Delta, EngineRequest, SamplingParams, pack, unpack

KV_TIMEOUT_S = 2.0
LONG = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def server(ray_cluster):
    serve.shutdown()
    url, _ = start(ServeConfig(port=free_port(), max_queue=64, kv_transfer_timeout_s=KV_TIMEOUT_S))
    yield url
    serve.delete(APP_NAME)
    serve.shutdown()


def _handle(role):
    return serve.get_deployment_handle(role, app_name=APP_NAME)


def _stats() -> list[dict]:
    return [s for role in ("prefill", "decode") for s in _handle(role).broadcast("stats").results(timeout_s=30)]


def _memory_summary(**kw) -> str:
    from ray._private.internal_api import memory_summary

    return memory_summary(address=ray.get_runtime_context().gcs_address, **kw)  # other clusters may run here


def _plasma_objects() -> int:
    return int(re.search(r"Plasma memory usage \S+ MiB, (\d+) objects", _memory_summary(stats_only=True)).group(1))


def _settled_plasma_objects(quiet_s: float = 1.0, timeout_s: float = 15.0) -> int:
    """The object count once it has stopped changing: objects an earlier test module dropped are freed
    asynchronously, and a baseline that still counts them hides the KV object this module looks for."""
    deadline = time.time() + timeout_s
    last, since = _plasma_objects(), time.time()
    while time.time() < deadline:
        time.sleep(0.2)
        now = _plasma_objects()
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= quiet_s:
            break
    return last


def _left(s: dict) -> tuple:
    return (s["kv_exports"], s["kv_objects_alive"], s["kv_accepted_waiting"], s["kv_blocks_used"], s["num_requests"])


def _wait_until(what, timeout_s: float):
    deadline = time.time() + timeout_s
    while True:
        value = what()
        if value or time.time() > deadline:
            return value
        time.sleep(0.2)


def _all_clean(baseline: int, timeout_s: float = 30.0, objects: bool = True):
    """Waits for every rank to hold nothing; with `objects`, for the KV objects to leave the object store too."""
    stats = []

    def clean():
        stats[:] = _stats()
        return all(_left(s) == (0, s["kv_objects_alive"] if not objects else 0, 0, 0, 0) for s in stats) \
            and (not objects or _plasma_objects() <= baseline)
    if not _wait_until(clean, timeout_s):
        print(_memory_summary())  # who holds which object, and from which call site
        pytest.fail(f"left behind (exports, KV objects, accepted KV, pages, requests) per rank: "
                    f"{[(s['role'], s['rank'], s['pid'], _left(s), s['live_requests']) for s in stats]}; "
                    f"object store: {_plasma_objects()} objects, {baseline} before")


def _prompt(tag: int) -> list[int]:
    rng = random.Random(tag)
    return [rng.randrange(5, 261) for _ in range(600)]  # ~0.5 MB of latents: well into the object store


def _objects_alive() -> int:
    return sum(s["kv_objects_alive"] for s in _handle("prefill").broadcast("stats").results(timeout_s=30))


def test_cancel_before_between_and_mid_decode_leaves_nothing(server):
    prefill, decode = _handle("prefill"), _handle("decode")
    decode.stats.remote().result(timeout_s=60)
    baseline = _settled_plasma_objects()

    # Before the prefill finishes: the call is cancelled while the rank computes the prompt.
    early = prefill.prefill.remote(pack(EngineRequest("life-early", _prompt(1), LONG, time.time())))
    time.sleep(0.02)
    early.cancel()

    # Between prefill and decode: the handoff is dropped without a decode call...
    raw, handoff = prefill.prefill.remote(pack(EngineRequest("life-drop", _prompt(2), LONG))).result(timeout_s=60)
    assert unpack(raw, Delta).finish_reason == "handoff" and _objects_alive() == 1
    assert _plasma_objects() > baseline  # the measurement sees the KV object
    del handoff
    assert _wait_until(lambda: _objects_alive() == 0, 10), "a dropped handoff stayed in the object store"

    # ... or a decode rank accepted the KV but the stream never came: the object store lets go at once,
    # the rank drops its copy after the transfer timeout.
    raw, handoff = prefill.prefill.remote(pack(EngineRequest("life-accept", _prompt(3), LONG))).result(timeout_s=60)
    decode.accept_kv.remote("life-accept", 600, handoff).result(timeout_s=60)
    del handoff
    assert _wait_until(lambda: _objects_alive() == 0, 10), "accepted KV stayed in the object store"

    # Mid-decode: the KV left the object store once the decode rank held it, while the request still decodes.
    first = prefill.prefill.remote(pack(req := EngineRequest("life-mid", _prompt(4), LONG))).result(timeout_s=60)
    raw, handoff = first
    req.output_token_ids = unpack(raw, Delta).token_ids
    replica = decode.accept_kv.remote(req.request_id, 600, handoff).result(timeout_s=60)
    del handoff, first
    stream = decode.options(stream=True).decode.remote(pack(req), cost={"replica": replica})
    got = 0
    for raw in stream:
        got += len(unpack(raw, Delta).token_ids)
        if got >= 3:
            break
    assert _wait_until(lambda: _objects_alive() == 0 and _plasma_objects() <= baseline, 10), \
        "the handed-off KV stayed in the object store while the request decoded"
    assert any(s["num_requests"] for s in _stats() if s["role"] == "decode"), "the request should still be decoding"
    stream.cancel()
    _all_clean(baseline, timeout_s=30 + KV_TIMEOUT_S + 5)


def test_http_clients_leaving_at_any_point_leave_nothing(server):
    baseline = _settled_plasma_objects()

    async def leave_after(http, i, delay):
        body = {"model": "tiny", "prompt": f"lifetime {i} " * (20 + i % 40), "max_tokens": 1500, "temperature": 0,
                "ignore_eos": True, "stream": True}
        try:
            async with asyncio.timeout(delay):
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    async for _ in r.aiter_lines():
                        pass
        except TimeoutError:
            pass  # the client left: before its prefill, between prefill and decode, or mid-decode

    async def stay(http, i):
        r = await http.post("/v1/completions", json={"model": "tiny", "prompt": f"staying {i} " * 30, "max_tokens": 20,
                                                      "temperature": 0, "ignore_eos": True})
        return r.status_code, r.json()

    async def run():
        rng = random.Random(0)
        async with httpx.AsyncClient(base_url=server, timeout=120) as http:
            return await asyncio.gather(*(leave_after(http, i, rng.uniform(0.0, 3.0)) for i in range(24)),
                                        *(stay(http, i) for i in range(4)))

    stayed = asyncio.run(run())[-4:]
    # Clients that stay get their whole answer through the same prefill -> accept KV -> decode path.
    assert all(code == 200 and body["usage"]["completion_tokens"] == 20 for code, body in stayed), stayed
    _all_clean(baseline, timeout_s=30 + KV_TIMEOUT_S + 5, objects=False)  # ranks: no exports, accepted KV, pages
    alive = _wait_until(lambda: _objects_alive() == 0 and _plasma_objects() <= baseline, 20)
    assert alive, (f"{_objects_alive()} KV objects still referenced after the clients left (the ingress collects "
                   f"cancelled calls' garbage a moment after they are cancelled)")
