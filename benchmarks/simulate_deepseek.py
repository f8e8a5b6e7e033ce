"""DeepSeek's published V3/R1 service, simulated: EP32 prefill units, EP144 decode units, H800, a day of traffic.

Prints the simulated figures beside DeepSeek's (DESIGN §1) and the ratio of each, with the checks of issue 23:
per-node throughput within 15% (prefill: input tokens incl. cache hits; decode: output tokens), the day's cost
within 10%, and the host time of the simulated day.

What is derived from the published figures (not fitted): the traffic (608B input / 168B output tokens a day
-> 1,661 requests/s of 4,237 input and 1,171 output tokens on average, the lengths solved from the input/output
ratio and the average KV length 4,989 per output token with lognormal outputs, sigma 0.5), the day/night
amplitude (peak / average nodes 278 / 226.75 - 1), the prefix sharing that gives a 56.3% cache-hit rate, the
decode operating point (the per-user speed floor, 20 tokens/s: each decode rank holds the most requests the
cost model steps at that speed, `rayinfer.sim.sizing`). What was calibrated on the service figures, once:
`layer_overhead_s` (H800 profile, non-GEMM kernels per layer and microbatch) on the decode figure, and the
prefill autoscaling target `PREFILL_TARGET` (ongoing requests per prefill rank: DeepSeek's prefill headroom,
which nothing published gives) on the prefill figure. Not touched: datasheet figures, the GEMM / attention
efficiencies (fitted to DeepGEMM's and FlashMLA's tables in calibration.py), DeepEP's bandwidths, the
scheduler, balancers, EPLB and disk tier (the project's own code), prices.

Run: python benchmarks/simulate_deepseek.py [--hours 24] [--window 60] [--sample-ranks 4] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

from rayinfer.config import ModelConfig, ServeConfig
from rayinfer.sim.roles import expert_imbalance
from rayinfer.sim.cost import CostModel
from rayinfer.sim.hardware import PROFILES
from rayinfer.sim.run import SimOptions, simulate, table, with_target
from rayinfer.sim.sizing import decode_concurrency
from rayinfer.sim.workload import Synthetic

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "..", "tests", "fixtures", "deepseek_v3")  # DeepSeek-V3's config.json
PUBLISHED = dict(prefill_per_node=73.7e3, decode_per_node=14.8e3, cost=87072.0, margin=5.45, nodes_avg=226.75,
                 nodes_peak=278, hit_rate=0.563, kv_len=4989, speed=(20, 22))
PREFILL_TARGET = 1.5  # calibrated: ongoing requests per prefill rank the autoscaler keeps
MIN_SPEED = 20.0      # tokens/s per user: the low end of DeepSeek's published 20-22

SERVE = {
    "disaggregated": True, "disk_cache_dir": "simulated", "disk_cache_bytes": 2 * 10**15,
    "prefill": {"ep_size": 32, "num_gangs": 24, "num_redundant_experts": 32, "max_num_seqs": 64,
                "max_num_batched_tokens": 16384,
                "autoscaling": {"min_gangs": 1, "max_gangs": 64, "target_ongoing_requests": PREFILL_TARGET}},
    "decode": {"ep_size": 144, "num_gangs": 7, "num_redundant_experts": 32, "max_num_seqs": 256,
               "max_num_batched_tokens": 256,
               "autoscaling": {"min_gangs": 1, "max_gangs": 16, "target_ongoing_requests": 64}},
}
WORKLOAD = Synthetic(rate=608e9 / 86400 / 4237, day_night=278 / 226.75 - 1, peak_hour=14, input_mean=4237,
                     input_sigma=0.8, input_max=65536, output_mean=1171, output_sigma=0.5, output_max=8192,
                     max_tokens=8192, prefix_ratio=0.9, prefix_fraction=0.635, num_prefixes=200, zipf=1.0, seed=0)


def decode_target(serve: ServeConfig, cfg: ModelConfig, hw) -> int:
    rc = serve.decode
    slots = cfg.n_routed_experts + rc.num_redundant_experts
    imb = expert_imbalance(cfg, slots, rc.ep_size, hw.gpus_per_node, SimOptions().expert_sigma, 0)
    cost = CostModel(cfg, hw, rc.ep_size, slots / rc.ep_size, imb, low_latency=True)
    return decode_concurrency(cost, PUBLISHED["kv_len"], MIN_SPEED, cost.kv_capacity_tokens())


def nodes_peak(res: dict, serve: ServeConfig, hw) -> float:
    gangs = res["series"]["gangs"]
    return max(sum(gangs[r][i] * serve.role(r).ep_size for r in gangs) / hw.gpus_per_node
               for i in range(len(res["series"]["t"])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--window", type=float, default=45.0, help="simulated seconds per hour [45]")
    ap.add_argument("--warmup", type=float, default=300.0, help="uncounted seconds before the first hour [300]")
    ap.add_argument("--sample-ranks", type=int, default=4, help="ranks simulated per role [4]")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cfg = ModelConfig.from_file(os.path.join(MODEL, "config.json"))
    hw = PROFILES["h800"]
    serve = ServeConfig.from_dict(SERVE, model=MODEL)
    target = decode_target(serve, cfg, hw)
    serve = with_target(serve, "decode", float(target))
    # A decode rank runs at most 1.25x its target: past that its KV cache overflows and preemption storms set in.
    serve = replace(serve, decode=replace(serve.decode, max_num_seqs=int(target * 1.25)))
    opts = SimOptions(hours=args.hours, window_s=args.window, warmup_s=args.warmup, sample_ranks=args.sample_ranks)
    res = simulate(serve, cfg, hw, WORKLOAD, opts)
    rep = res["report"]
    day = 24 / args.hours  # a shorter run's cost is scaled to a day (its hours are the first of the day)
    rows = [("prefill input tok/s per node", rep["prefill_tokens_per_s_per_node"], PUBLISHED["prefill_per_node"], .15),
            ("decode output tok/s per node", rep["decode_tokens_per_s_per_node"], PUBLISHED["decode_per_node"], .15),
            ("cost per day (USD)", rep["cost_usd"] * day, PUBLISHED["cost"], .10),
            ("cost-profit margin", rep["cost_profit_margin"], PUBLISHED["margin"], None),
            ("nodes, average", rep["nodes_avg"], PUBLISHED["nodes_avg"], None),
            ("nodes, peak (hourly samples)", nodes_peak(res, serve, hw), PUBLISHED["nodes_peak"], None),
            ("cache-hit rate", rep["cache_hit_rate"], PUBLISHED["hit_rate"], None),
            ("KV length per output token", rep["kv_tokens_per_output_token"], PUBLISHED["kv_len"], None),
            ("output tok/s per user", rep["output_tokens_per_s_per_request"], sum(PUBLISHED["speed"]) / 2, None)]
    if args.json:
        print(json.dumps({"result": {k: v for k, v in res.items() if k != "series"}, "decode_target": target,
                          "rows": [(n, s, p) for n, s, p, _ in rows]}, indent=2, default=str))
        return
    print(table(res))
    print(f"\ndecode target (cost model, >= {MIN_SPEED:g} tok/s per user): {target} requests per rank; "
          f"prefill target (calibrated): {PREFILL_TARGET:g}")
    print(f"\n{'figure':32s} {'simulated':>12s} {'DeepSeek':>12s} {'ratio':>7s}  check")
    ok = True
    for name, sim, pub, tol in rows:
        ratio = sim / pub if pub else float("nan")
        verdict = "" if tol is None else ("PASS" if abs(ratio - 1) <= tol else "FAIL") + f" (within {tol:.0%})"
        ok &= tol is None or abs(ratio - 1) <= tol
        print(f"{name:32s} {sim:12,.2f} {pub:12,.2f} {ratio:7.3f}  {verdict}")
    host, cpu = res["sim"]["host_seconds"], res["sim"]["host_cpu_seconds"]
    print(f"{'host time (s), limit 600 for 24 h':32s} {host:12,.1f}  {'PASS' if host <= 600 or args.hours < 24 else 'FAIL'}"
          f" (CPU {cpu:,.1f} s, one core; the machine is shared)")
    print("all checks passed" if ok else "some checks FAILED")


if __name__ == "__main__":
    main()
