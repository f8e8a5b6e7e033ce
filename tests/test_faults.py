"""A rank's death loses no request, on a real server on 127.0.0.1 (1 prefill gang + 2 decode gangs, 2 ranks each):
24 concurrent streams, half greedy and half seeded at temperature 0.8, see a kill -9 of a decode rank mid-stream,
or of a prefill rank mid-prefill, as nothing at all: no failure, no error event, one finish reason, usage once,
and the same text and tokens as a run without the fault. Afterwards no rank holds anything."""
import asyncio
import json
import sys
from pathlib import Path

import pytest
from ray import serve

from rayinfer.actors.cluster import free_port
from rayinfer.actors.server import APP_NAME, start
from rayinfer.config import ServeConfig
from rayinfer.config.serve import RoleConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _faults as F  # noqa: E402

STREAMS = 24


@pytest.fixture(scope="module")
def server(ray_cluster):
    serve.shutdown()
    url, _ = start(ServeConfig(port=free_port(), max_queue=64, decode=RoleConfig(num_gangs=2),
                               kv_transfer_timeout_s=2.0, resume_deadline_s=60.0))
    yield url
    serve.delete(APP_NAME)
    serve.shutdown()


SEEDED_T = F.SEEDED_TEMPERATURE


def check_invisible(got: list[dict], ref: list[dict]) -> list[int]:
    """Asserts no stream failed and every greedy one matches the no-fault run; -> seeded streams that differ."""
    failures = [(i, r["status"], r["errors"], r["finish"]) for i, r in enumerate(got) if F.failed(r)]
    assert not failures, f"{len(failures)}/{len(got)} streams failed: {failures[:4]}"
    assert not [i for i, r in enumerate(ref) if F.failed(r)], "the no-fault run itself failed"
    greedy = [i for i, r in enumerate(got) if not r["seeded"] and F.differs(r, ref[i])]
    assert not greedy, f"greedy streams {greedy} differ from the no-fault run"
    return [i for i, r in enumerate(got) if r["seeded"] and F.differs(r, ref[i])]


def check_seeded(seeded: list[int]) -> None:
    # Sampling noise is a function of (seed, position): a seeded stream resumed elsewhere samples what it would have.
    assert not seeded, f"seeded streams {seeded} differ from the no-fault run"


def run(url, payloads, fault=None):
    return asyncio.run(F.run_streams(url, payloads, fault))


def wait_clean(timeout_s: float = 60.0) -> None:
    left = asyncio.run(F.settled(timeout_s))
    assert not left, f"ranks still hold (role, rank, pid, exports, KV objects, accepted KV, pages, requests): {left}"


# Every third stream is held to a JSON schema whose output spans the kill: a resumed one must stay valid JSON (the
# grammar replays the tokens it already sent) and equal the no-fault run's.
DIGITS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 24, "maxItems": 24}


def constrained(i: int, payload: dict) -> dict:
    if i % 3:
        return payload
    return dict({k: v for k, v in payload.items() if k != "ignore_eos"}, max_tokens=200,
                structured_outputs={"json": DIGITS})


def test_decode_rank_killed_mid_stream(server):
    payloads = [constrained(i, F.body(i, p, 48)) for i, p in enumerate(F.prompts(STREAMS, 40, tag=1))]
    ref, _ = run(server, payloads)

    async def kill_busy_decode_rank(progress):
        await F.wait_for(lambda: sum(progress) >= 6 * STREAMS, 120)
        busy = max(await asyncio.to_thread(F.rank_stats, "decode"), key=lambda s: s["num_requests"])
        assert busy["num_requests"] > 0, "no decode rank holds a request mid-stream"
        return F.kill([busy])

    before = F.resumed(server)
    got, dead = run(server, payloads, kill_busy_decode_rank)
    assert F.resumed(server) > before, "the kill hit no stream: nothing was resumed"
    assert 0 < min(len(r["tokens"]) for r in got)
    for r in got[::3]:
        digits = json.loads(r["text"])
        assert len(digits) == 24 and all(isinstance(d, int) and 0 <= d <= 9 for d in digits), r["text"]
    seeded = check_invisible(got, ref)
    wait_clean()
    check_seeded(seeded)


def test_prefill_rank_killed_mid_prefill(server):
    # The fault run goes first, on prompts no rank has seen, so that the prefills really are computing.
    payloads = [F.body(i, p, 16) for i, p in enumerate(F.prompts(STREAMS, 1500, tag=2))]

    async def kill_prefilling_rank(progress):
        busy = await F.wait_for(lambda: [s for s in F.rank_stats("prefill") if s["num_requests"] > 0], 120)
        await asyncio.sleep(0.3)
        assert sum(progress) < STREAMS, "every prefill finished before the kill"
        return F.kill(busy[:1])

    before = F.resumed(server)
    got, dead = run(server, payloads, kill_prefilling_rank)
    assert F.resumed(server) > before, "the kill hit no prefill: nothing was resumed"
    ref, _ = run(server, payloads)
    seeded = check_invisible(got, ref)
    wait_clean()
    check_seeded(seeded)
