"""`rayinfer report`'s arithmetic on synthetic metrics: DeepSeek's published day, windows, dumps, bad input."""
import json

import pytest

from rayinfer.report import Prices, compute, load_dump, parse_prometheus, series, table, total

DAY = 86400.0
# DeepSeek's published day: 226.75 nodes on average. Its per-role split is not published; the published
# per-node rates (73.7k input tokens/s in prefill, 14.8k output tokens/s in decode) imply one.
PREFILL_NODES, DECODE_NODES = 608e9 / 73.7e3 / DAY, 168e9 / 14.8e3 / DAY


def _values(inp, hit, out, kv, prefill_nodes, decode_nodes, span, gangs=(4, 8), tpot=(0.0, 0)):
    v = {'rayinfer_prompt_tokens_total{model="r1"}': inp, 'rayinfer_cached_prompt_tokens_total{model="r1"}': hit,
         'rayinfer_generation_tokens_total{model="r1"}': out, 'rayinfer_kv_tokens_read_total{model="r1"}': kv,
         'rayinfer_requests_total{endpoint="/v1/chat/completions",model="r1",status="200"}': 1000.0,
         'rayinfer_requests_total{endpoint="/v1/chat/completions",model="r1",status="429"}': 7.0,
         'rayinfer_time_per_output_token_seconds_sum{model="r1"}': tpot[0],
         'rayinfer_time_per_output_token_seconds_count{model="r1"}': tpot[1]}
    for role, nodes, g in (("prefill", prefill_nodes, gangs[0]), ("decode", decode_nodes, gangs[1])):
        v[f'rayinfer_rank_seconds_total{{model="r1",role="{role}"}}'] = nodes * 8 * span
        v[f'rayinfer_gang_seconds_total{{model="r1",role="{role}"}}'] = g * span
        v[f'rayinfer_gangs{{model="r1",role="{role}"}}'] = g
    return v


def _day() -> list:
    zero = {k: 0.0 for k in _values(0, 0, 0, 0, 0, 0, 0)}
    zero.update({k: v for k, v in _values(0, 0, 0, 0, 0, 0, 0, gangs=(6, 10)).items() if "gangs{" in k})
    end = _values(608e9, 342e9, 168e9, 4989 * 168e9, PREFILL_NODES, DECODE_NODES, DAY, tpot=(1e9 / 21, 1e9))
    return [(1000.0, zero), (1000.0 + DAY, end)]


def test_deepseeks_published_day():
    r = compute(_day())
    assert r["window_s"] == DAY and r["requests"] == 1000
    assert (r["input_tokens"], r["cache_hit_tokens"], r["cache_miss_tokens"], r["output_tokens"]) == (
        608e9, 342e9, 266e9, 168e9)
    assert PREFILL_NODES + DECODE_NODES == pytest.approx(226.75, abs=0.2)
    assert r["nodes_avg"] == pytest.approx(PREFILL_NODES + DECODE_NODES)
    assert r["prefill_tokens_per_s_per_node"] == pytest.approx(73.7e3)
    assert r["decode_tokens_per_s_per_node"] == pytest.approx(14.8e3)
    assert r["output_tokens_per_s_per_request"] == pytest.approx(21.0)
    assert r["kv_tokens_per_output_token"] == pytest.approx(4989)
    assert r["gangs_peak"] == 16 and r["gangs_avg"] == pytest.approx(12)  # the start sample had more gangs
    # at exactly 226.75 nodes: DeepSeek's $87,072 cost, $562,027 revenue (its token counts are rounded to 1B), 545%
    exact = _day()
    exact[1][1].update({k: v for k, v in _values(608e9, 342e9, 168e9, 0, 100.0, 126.75, DAY).items()
                        if k.startswith("rayinfer_rank_seconds")})
    r = compute(exact)
    assert r["gpu_hours"] == pytest.approx(226.75 * 8 * 24)
    assert r["cost_usd"] == pytest.approx(87_072)
    assert r["revenue_usd"] == pytest.approx(562_027, rel=2e-4)
    assert r["cost_profit_margin"] == pytest.approx(5.45, abs=0.01)
    text = table(r)
    # $562,100 from the rounded token counts is 545.55%, printed 546%; DeepSeek's unrounded $562,027 gives 545.47%
    assert "$87,072.00" in text and "$562,100.00" in text and "546%" in text and "342.00B cache hits" in text


def test_prices_and_nodes_are_options():
    r = compute(_day(), Prices(gpu_hour=3.0, cache_hit=0.0, cache_miss=1.0, output=1.0, gpus_per_node=4))
    assert r["revenue_usd"] == pytest.approx((266e9 + 168e9) / 1e6)
    assert r["cost_usd"] == pytest.approx(r["gpu_hours"] * 3.0)
    assert r["prefill_tokens_per_s_per_node"] == pytest.approx(73.7e3 / 2)  # half the GPUs per node
    with pytest.raises(ValueError, match="gpu_hour.*-1"):
        Prices(gpu_hour=-1)
    with pytest.raises(ValueError, match="gpus_per_node.*0"):
        Prices(gpus_per_node=0)


def test_since_takes_the_last_samples_and_counter_deltas():
    day = _day()
    mid = {k: v / 2 if "gangs{" not in k else v for k, v in day[1][1].items()}
    samples = [day[0], (1000.0 + DAY / 2, mid), day[1]]
    r = compute(samples, since_s=DAY / 2)
    assert r["window_s"] == DAY / 2 and r["output_tokens"] == pytest.approx(84e9)
    assert r["gpu_hours"] == pytest.approx(compute(samples)["gpu_hours"] / 2)
    s = series(samples)
    assert s["t"] == [0, DAY / 2, DAY] and s["output_tokens_per_s"] == pytest.approx([84e9 / (DAY / 2)] * 3)
    assert s["gangs"] == {"decode": [10, 8, 8], "prefill": [6, 4, 4]}
    with pytest.raises(ValueError, match="-5"):
        compute(samples, since_s=-5)
    with pytest.raises(ValueError, match="no metrics"):
        compute([])


def test_dumps_text_and_history():
    text = """# HELP rayinfer_server_start_time_seconds when
# TYPE rayinfer_server_start_time_seconds gauge
rayinfer_server_start_time_seconds{model="tiny"} 100.0
rayinfer_uptime_seconds{model="tiny"} 3600.0
rayinfer_prompt_tokens_total{model="tiny"} 50.0
rayinfer_prompt_tokens_created{model="tiny"} 1.7e9
rayinfer_generation_tokens_total{model="tiny"} 20.0
rayinfer_rank_seconds_total{model="tiny",role="mixed"} 7200.0
rayinfer_gangs{model="tiny",role="mixed"} 1.0
"""
    v = parse_prometheus(text)
    assert 'rayinfer_prompt_tokens_created{model="tiny"}' not in v and total(v, "rayinfer_prompt_tokens_total") == 50
    r = compute(load_dump(text), Prices(gpus_per_node=1))
    assert r["window_s"] == 3600 and r["input_tokens"] == 50 and r["gpu_hours"] == 2.0
    assert r["prefill_tokens_per_s_per_node"] == pytest.approx(50 / 7200) and r["gangs_peak"] == 1
    history = json.dumps({"samples": [{"t": t, "values": v} for t, v in _day()]})
    assert compute(load_dump(history)) == compute(_day())
    with pytest.raises(ValueError, match="rayinfer_server_start_time_seconds"):
        load_dump("some_other_metric 1\n")
