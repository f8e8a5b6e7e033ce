"""The simulator (rayinfer/sim): it drives the real scheduler, is deterministic for a seed, and a 1-rank run of a
fixed workload takes exactly the hand-computed step times."""
import json

import pytest

from rayinfer.cli import main
from rayinfer.config import ServeConfig
from rayinfer.engine import scheduler as scheduler_mod
from rayinfer.sim import calibration, hardware
from rayinfer.sim.hardware import Hardware
from rayinfer.sim.run import SimOptions, load_model, simulate
from rayinfer.sim.workload import Request, Synthetic, load_spec, load_trace

# Compute-bound by construction (bandwidths ~infinite, no per-call cost), so a step is flops / RATE + OVERHEAD.
RATE, OVERHEAD = 1e9, 1e-3
FLAT = Hardware("flat", hbm_bytes_s=1e30, fp8_flops=0.0, bf16_flops=RATE, memory_bytes=0.0, nvlink_bytes_s=1e30,
                rdma_bytes_s=1e30, gpus_per_node=1, gpu_hour_usd=1.0, step_overhead_s=OVERHEAD, weight_bytes=4,
                act_bytes=4)


def mixed(**role) -> ServeConfig:
    return ServeConfig.from_dict({"disaggregated": False, "mixed": {"ep_size": 1, **role}}, model="tiny")


def trace(tmp_path, rows) -> list[Request]:
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_trace(str(p))


def test_one_rank_matches_hand_computed_step_times(tmp_path):
    # tiny: hidden 64, 3 layers (1 dense), 4 heads, q_lora 48, kv_lora 32, rope 16, nope 16, v 16, MLP 128,
    # 16 experts of 32 (top-4) + 1 shared, vocab 320.
    attn_proj = 2 * (64 * 48 + 48 * 4 * 32 + 64 * 48 + 32 * 4 * 32 + 4 * 16 * 64)  # per token per layer
    dense = 2 * 3 * 64 * 128
    moe = 2 * 3 * 64 * 32 * (1 + 4) + 2 * 16 * 64  # shared + 4 routed experts + gate
    head = 2 * 64 * 320
    per_token = 3 * attn_proj + dense + 2 * moe
    pair_prefill, key_decode = 2 * 4 * (32 + 16), 2 * 4 * (48 + 32)  # core MLA flops per (query, key)
    step1 = 64 * per_token + 3 * pair_prefill * 64 * 65 / 2 + head  # the 64-token prompt, one sample
    step2 = per_token + 3 * key_decode * 65 + head  # decode at position 64: reads 65 keys
    step3 = per_token + 3 * key_decode * 66 + head
    expected = sum(f / RATE + OVERHEAD for f in (step1, step2, step3))
    reqs = trace(tmp_path, [{"arrival": 0.0, "prompt_tokens": 64, "output_tokens": 3}])
    res = simulate(mixed(), load_model("tiny"), FLAT, reqs, SimOptions(hours=0.01))
    assert res["sim"]["last_finish_s"] == pytest.approx(expected, rel=1e-9)
    assert res["report"]["output_tokens"] == 3 and res["report"]["input_tokens"] == 64
    assert res["roles"]["mixed"]["ttft_s"]["p50"] == pytest.approx(step1 / RATE + OVERHEAD, rel=1e-9)


# Batching pays when a step's fixed cost dominates: what admission decides shows in the makespan.
STEPPY = Hardware(**{**FLAT.__dict__, "step_overhead_s": 0.05})


def _rows(n=12):
    return [{"arrival": 0.01 * i, "prompt_tokens": 200 + 10 * i, "output_tokens": 20} for i in range(n)]


def test_the_real_scheduler_decides(tmp_path, monkeypatch):
    reqs = trace(tmp_path, _rows())
    base = simulate(mixed(max_num_seqs=16), load_model("tiny"), STEPPY, reqs, SimOptions(hours=0.01))
    real = scheduler_mod.Scheduler._allocate

    def at_most_two(self, seq, budget, out):  # an admission rule the scheduler does not have: 2 running at most
        return 0 if len(self.running) >= 2 else real(self, seq, budget, out)

    monkeypatch.setattr(scheduler_mod.Scheduler, "_allocate", at_most_two)
    capped = simulate(mixed(max_num_seqs=16), load_model("tiny"), STEPPY, reqs, SimOptions(hours=0.01))
    assert capped["sim"]["last_finish_s"] > 1.5 * base["sim"]["last_finish_s"]
    assert capped["roles"]["mixed"]["ttft_s"]["p90"] > base["roles"]["mixed"]["ttft_s"]["p90"]
    assert capped["report"]["output_tokens"] == base["report"]["output_tokens"] == 12 * 20


def test_a_config_limit_changes_the_simulation(tmp_path):
    reqs = trace(tmp_path, _rows())
    wide = simulate(mixed(max_num_seqs=16), load_model("tiny"), STEPPY, reqs, SimOptions(hours=0.01))
    narrow = simulate(mixed(max_num_seqs=1), load_model("tiny"), STEPPY, reqs, SimOptions(hours=0.01))
    assert narrow["sim"]["last_finish_s"] > 2 * wide["sim"]["last_finish_s"]


def _disagg(**extra):
    return ServeConfig.from_dict({
        "disaggregated": True, "disk_cache_dir": "simulated",
        "prefill": {"ep_size": 4, "num_gangs": 1, "max_num_batched_tokens": 2048},
        "decode": {"ep_size": 4, "num_gangs": 1}, **extra}, model="tiny")


WL = Synthetic(rate=20, input_mean=300, output_mean=30, prefix_ratio=0.8, prefix_fraction=0.6, num_prefixes=5, seed=3)


# H800 with 20 ms per step: a tiny model's steps would otherwise be ~1 ms, and tests would simulate 10^4 of them.
SLOW_H800 = Hardware(**{**hardware.PROFILES["h800"].__dict__, "step_overhead_s": 0.02})


def _strip(res):
    return json.dumps({k: v for k, v in res.items() if k != "sim"}, sort_keys=True, default=str)


def test_deterministic_for_a_seed():
    hw = SLOW_H800
    a = simulate(_disagg(), load_model("tiny"), hw, WL, SimOptions(hours=0.003, seed=1))
    b = simulate(_disagg(), load_model("tiny"), hw, WL, SimOptions(hours=0.003, seed=1))
    c = simulate(_disagg(), load_model("tiny"), hw, Synthetic(**{**WL.__dict__, "seed": 4}),
                 SimOptions(hours=0.003, seed=1))
    assert _strip(a) == _strip(b)
    assert _strip(a) != _strip(c)
    assert a["report"]["requests"] > 60 and a["report"]["output_tokens"] > 0


def test_disk_tier_hits_follow_prefix_sharing():
    hw = SLOW_H800
    shared = simulate(_disagg(), load_model("tiny"), hw, WL, SimOptions(hours=0.003))
    none = simulate(_disagg(), load_model("tiny"), hw, Synthetic(**{**WL.__dict__, "prefix_ratio": 0.0}),
                    SimOptions(hours=0.003))
    assert 0.2 < shared["report"]["cache_hit_rate"] <= 0.8 * 0.6 + 0.05
    assert none["report"]["cache_hit_rate"] == 0.0


def test_sampled_role_scales_counters_to_the_cluster():
    """A role too large to simulate whole stands for all its ranks: 64 ranks sampled as 4 see the same per-node
    load as 16 ranks simulated whole at a quarter of the traffic."""
    hw = SLOW_H800
    wl = Synthetic(rate=40, input_mean=300, output_mean=30, seed=5)
    big = ServeConfig.from_dict({"disaggregated": True, "prefill": {"ep_size": 8, "num_gangs": 8},
                                 "decode": {"ep_size": 8, "num_gangs": 8}}, model="tiny")
    small = ServeConfig.from_dict({"disaggregated": True, "prefill": {"ep_size": 8, "num_gangs": 2},
                                   "decode": {"ep_size": 8, "num_gangs": 2}}, model="tiny")
    rs = simulate(big, load_model("tiny"), hw, wl, SimOptions(hours=0.006, sample_ranks=4, max_exact_ranks=16))
    rw = simulate(small, load_model("tiny"), hw, Synthetic(**{**wl.__dict__, "rate": 10}),
                  SimOptions(hours=0.006, max_exact_ranks=16))
    assert rs["roles"]["prefill"]["simulated_ranks"] == 4 and rw["roles"]["prefill"]["simulated_ranks"] == 16
    assert rs["report"]["requests"] == pytest.approx(4 * rw["report"]["requests"], rel=0.25)
    assert rs["report"]["prefill_tokens_per_s_per_node"] == pytest.approx(
        rw["report"]["prefill_tokens_per_s_per_node"], rel=0.25)


def test_gemm_efficiencies_are_the_fit_to_deepgemm():
    ec, em, rms = calibration.fit_gemm()
    assert (hardware.PROFILES["h800"].gemm_compute_eff, hardware.PROFILES["h800"].gemm_mem_eff) == (ec, em)
    assert rms < 0.25


def test_workload_specs(tmp_path):
    assert load_spec("rate=2.5,input_mean=100").rate == 2.5
    with pytest.raises(ValueError, match="unknown workload key"):
        load_spec("rats=2")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"arrival": 0, "prompt_tokens": 0, "output_tokens": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_trace(str(bad))
    s = Synthetic(rate=10, day_night=0.5, peak_hour=12)
    assert s.rate_at(12 * 3600) == pytest.approx(15) and s.rate_at(0) == pytest.approx(5)


def test_cli_simulate(tmp_path, capsys):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("model: tiny\ndisaggregated: false\nmixed: {ep_size: 1}\n")
    assert main(["simulate", "--config", str(cfg), "--hardware", "h100", "--workload", "rate=5,input_mean=100,"
                 "output_mean=10", "--hours", "0.003", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["report"]["output_tokens"] > 0 and out["sim"]["hardware"] == "h100"
    assert main(["simulate", "--config", str(cfg), "--hardware", "tpu9", "--workload", "rate=5"]) == 2
    assert "tpu9" in capsys.readouterr().err
