"""Decode gangs autoscale on a real local server: a burst of streams, kept up until it does, brings a second gang
of 2 CPU ranks, a quiet spell takes it away again, and the gang leaving drains: every stream, including those still running on
it while it goes, ends whole, and `rayinfer_gangs{role="decode"}` follows."""
import asyncio
import time

import httpx
import openai
import pytest
from ray import serve

from rayinfer.actors.cluster import free_port
from rayinfer.actors.server import APP_NAME, start
from rayinfer.config import AutoscalingConfig, RoleConfig, ServeConfig
from rayinfer.report import parse_prometheus

DECODE_EP = 2


@pytest.fixture(scope="module")
def server(ray_cluster):
    serve.shutdown()
    decode = RoleConfig(ep_size=DECODE_EP, autoscaling=AutoscalingConfig(
        min_gangs=1, max_gangs=2, target_ongoing_requests=2, upscale_delay_s=1, downscale_delay_s=4, look_back_s=2,
        drain_timeout_s=120))
    url, _ = start(ServeConfig(port=free_port(), max_queue=64, decode=decode))
    yield url
    serve.delete(APP_NAME)
    serve.shutdown()


def decode_gangs(url: str) -> int:
    values = parse_prometheus(httpx.get(url + "/metrics", timeout=30).text)
    return int(next(v for k, v in values.items() if k.startswith("rayinfer_gangs{") and 'role="decode"' in k))


def decode_replicas() -> int:
    return serve.status().applications[APP_NAME].deployments["decode"].replica_states.get("RUNNING", 0)


async def _stream(client: openai.AsyncOpenAI, i: int, max_tokens: int) -> tuple[int, str | None]:
    """-> (output tokens billed, finish reason) of one streamed completion."""
    usage, finish = None, None
    stream = await client.completions.create(model="tiny", prompt=f"stream {i}: tell me a long story", stream=True,
                                             max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True},
                                             stream_options={"include_usage": True})
    async for chunk in stream:
        finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
        usage = chunk.usage or usage
    return usage.completion_tokens, finish


async def _until(check, timeout_s: float, what: str) -> float:
    t0 = time.time()
    while not await asyncio.to_thread(check):
        assert time.time() - t0 < timeout_s, f"{what} did not happen within {timeout_s}s"
        await asyncio.sleep(0.5)
    return time.time() - t0


async def _keep_busy(client: openai.AsyncOpenAI, streams: int, max_tokens: int, until: asyncio.Event) -> list:
    """`streams` streams in flight, each followed by another as it ends, until `until` is set: a load that lasts
    as long as scaling takes, however fast the engine is. -> every stream's result (or error)."""
    results: list = []

    async def worker(w: int) -> None:
        while not until.is_set():
            try:
                results.append(await _stream(client, w, max_tokens))
            except Exception as e:  # noqa: BLE001 - reported by the test's assertion
                results.append(e)

    await asyncio.gather(*(worker(w) for w in range(streams)))
    return results


def test_decode_gangs_scale_up_under_a_burst_and_down_when_idle_without_failures(server):
    url = server
    assert decode_gangs(url) == 1 and decode_replicas() == DECODE_EP

    async def day_and_night():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        scaled = asyncio.Event()
        day = asyncio.create_task(_keep_busy(client, 12, 200, scaled))  # 6 per rank; the target is 2
        up_s = await _until(lambda: decode_replicas() == 2 * DECODE_EP and decode_gangs(url) == 2, 300, "scale-up")
        scaled.set()
        # night: the burst ends; 4 long streams (about one per rank) stay, 1 per rank wanted: the spare gang
        # must go while some of them still run on it
        night = [asyncio.create_task(_stream(client, 100 + i, 1200)) for i in range(4)]
        day_results = await day
        down_s = await _until(lambda: decode_replicas() == DECODE_EP and decode_gangs(url) == 1, 300, "scale-down")
        running_at_scale_down = sum(not t.done() for t in night)
        night_results = await asyncio.gather(*night, return_exceptions=True)
        print(f"scale-up after {up_s:.1f}s ({len(day_results)} day streams), scale-down {down_s:.1f}s after the "
              f"burst ended, {running_at_scale_down} of 4 night streams still running then")
        return day_results, night_results, running_at_scale_down

    day_results, night_results, running = asyncio.run(day_and_night())
    failed = [r for r in day_results + night_results if isinstance(r, BaseException)]
    assert not failed, f"{len(failed)} of {len(day_results + night_results)} requests failed, first: {failed[0]!r}"
    assert len(day_results) >= 12 and day_results == [(200, "length")] * len(day_results)
    assert night_results == [(1200, "length")] * 4
    assert running == 4, "the night streams ended before the spare gang went: nothing was drained"
