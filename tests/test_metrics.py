"""The ingress's metrics without Ray: rank polling through fake handles, rank- and gang-seconds, history."""
import pytest

from rayinfer.actors.metrics import IngressMetrics
from rayinfer.report import parse_prometheus, total


class _Handle:
    """Answers `broadcast("stats").results(...)` like a Serve handle, from a list it is given."""

    def __init__(self, answers):
        self.answers = answers

    def broadcast(self, method):
        assert method == "stats"
        return self

    def results(self, timeout_s=None, return_exceptions=False):
        if isinstance(self.answers, Exception):
            raise self.answers
        return list(self.answers)


def _rank(gang, rank, started_at, **counters):
    return dict(gang_id=gang, rank=rank, replica_id=f"{gang}-{rank}", started_at=started_at, kv_usage=0.25,
                kv_transfers={"done": 3, "failed": 0}, **counters)


def _text(m) -> str:  # the registry as scraped, without taking another sample
    from prometheus_client import generate_latest

    return generate_latest(m.registry).decode()


def _seconds(m, kind, role):
    return total(parse_prometheus(_text(m)), f"rayinfer_{kind}_seconds_total", role=role)


def test_rank_and_gang_seconds_count_each_rank_from_its_start():
    prefill = _Handle([])
    decode = _Handle([])
    m = IngressMetrics("tiny", {"prefill": prefill, "decode": decode, "mixed": None}, period_s=3600)
    t0 = m.start_time
    prefill.answers = [_rank("p0", 0, t0 - 50, prefill_tokens_computed=7), _rank("p0", 1, t0 - 50)]
    decode.answers = [_rank("d0", 0, t0 - 50, decode_tokens_computed=5), RuntimeError("a dead replica")]
    m.sample()
    t1 = m.samples[-1][0]
    assert _seconds(m, "rank", "prefill") == pytest.approx(2 * (t1 - t0))  # counted from the server's start
    assert _seconds(m, "gang", "decode") == pytest.approx(t1 - t0) and _seconds(m, "rank", "decode") == \
        pytest.approx(t1 - t0)
    decode.answers = decode.answers[:1] + [_rank("d1", 0, t1), _rank("d1", 1, t1)]  # a second decode gang
    prefill.answers = RuntimeError("broadcast failed")  # counted as still up
    m.sample()
    t2 = m.samples[-1][0]
    assert _seconds(m, "rank", "decode") == pytest.approx((t2 - t0) + 2 * (t2 - t1))
    assert _seconds(m, "gang", "decode") == pytest.approx((t2 - t0) + (t2 - t1))
    assert _seconds(m, "rank", "prefill") == pytest.approx(2 * (t2 - t0))
    v = parse_prometheus(_text(m))
    assert total(v, "rayinfer_gangs", role="decode") == 2 and total(v, "rayinfer_gangs", role="prefill") == 1
    assert total(v, "rayinfer_rank_prefill_tokens_total", role="prefill", gang="p0", rank="0") == 7
    assert total(v, "rayinfer_rank_kv_transfers_total", role="decode", outcome="done") == 9
    assert all(k.startswith("rayinfer_") for k in v) and 'role="mixed"' not in _text(m)
    m.close()


def test_finished_counts_tpot_and_kv_read_and_history_spans_the_lifetime():
    m = IngressMetrics("tiny", max_samples=4)
    m.finished(10, [1.0, 1.5, 2.0, 2.5])  # 4 tokens read 10, 11, 12, 13 KV tokens
    m.finished(3, [])  # no token sent: nothing read
    v = parse_prometheus(_text(m))
    assert total(v, "rayinfer_kv_tokens_read_total") == 46
    assert total(v, "rayinfer_time_per_output_token_seconds_sum") == 0.5
    assert total(v, "rayinfer_time_per_output_token_seconds_count") == 1
    first = m.samples[0]
    for _ in range(7):
        m.sample()
    assert len(m.samples) <= 4 and m.samples[0] is first  # halved, still from the start
    h = m.history()
    assert h["samples"][0]["t"] == first[0] and h["start_time"] == m.start_time
    recent = m.history(since_s=1e-9)["samples"]
    assert len(recent) == 1 and recent[0]["values"]['rayinfer_kv_tokens_read_total{model="tiny"}'] == 46
