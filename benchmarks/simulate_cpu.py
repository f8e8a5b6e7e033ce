"""Does the simulator predict rayinfer's own CPU runs? Measures this machine's CPU profile, runs
`benchmarks/throughput.py`'s rayinfer run on `small` (its workload and options, in this process), simulates the same workload with the profile, and prints
measured vs predicted output tokens/s and the ratio (issue 23: within 25%). Everything in one run, one thread.

The profile (what `rayinfer simulate --hardware PROFILE.json` takes): the fp32 GEMM rate (a [2048, 512] x
[512, 1536] matmul), the memory bandwidth (a 256 MiB copy), the per-call overhead (a [1, 8] x [8, 8] matmul),
and three numbers fitted (least squares) to the real engine's steps on this machine: the model's GEMMs'
efficiency against that rate, a per-step and a per-row overhead, from 1 to 32 requests decoding and one
1024-token prompt. The prediction is for throughput.py's mix: 16 prompts per prefill step, 64 rows decoding.

Run: python benchmarks/simulate_cpu.py [--threads 1] [--requests 64] [--prompt-len 256] [--output-len 128]
     [--profile-out cpu_profile.json]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace

import torch

from rayinfer.config import ServeConfig
from rayinfer.sim.cost import CostModel, RankBatch
from rayinfer.sim.hardware import Hardware, save
from rayinfer.sim.run import SimOptions, load_model, simulate

# CPU time of this process, not wall time: with one thread it is what the run takes on an idle core, while
# the wall clock of a machine shared by six engineers (load average ~10 on 2 cores) measures their load.
clock = time.process_time


def _best(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return best


def measure_profile(model: str, dtype: str) -> Hardware:
    dt = getattr(torch, dtype)
    a, b = torch.randn(2048, 512, dtype=dt), torch.randn(512, 1536, dtype=dt)
    gemm = 2 * 2048 * 512 * 1536 / _best(lambda: a @ b, 5)
    y = torch.randn(64 * 2**20, dtype=torch.float32)  # 256 MiB: far past the caches
    x = torch.empty_like(y)
    bw = 2 * y.numel() * 4 / _best(lambda: x.copy_(y), 5)
    s, w = torch.randn(1, 8, dtype=dt), torch.randn(8, 8, dtype=dt)
    call = _best(lambda: [s @ w for _ in range(1000)], 3) / 1000
    nbytes = torch.tensor([], dtype=dt).element_size()
    raw = Hardware(f"cpu-{dtype}", hbm_bytes_s=bw, fp8_flops=0.0, bf16_flops=gemm, memory_bytes=0.0,
                   nvlink_bytes_s=1e9, rdma_bytes_s=1e9, gpus_per_node=1, gpu_hour_usd=0.05, kernel_overhead_s=call,
                   weight_bytes=nbytes, act_bytes=nbytes)
    eff, step, row = fit_engine(model, dtype, raw)
    return replace(raw, gemm_compute_eff=eff, attn_compute_eff=eff, step_overhead_s=step, row_overhead_s=row)


def engine_steps(llm, batches: list[tuple[int, int, int]]) -> list[tuple[RankBatch, float]]:
    """Runs (requests, prompt tokens, output tokens) batches on the real engine, one after another:
    -> every step's batch (as the simulator summarises it) and its CPU seconds."""
    from rayinfer.messages import EngineRequest, SamplingParams

    eng, seen = llm.engine, []
    real = eng.runner.execute
    eng.runner.execute = lambda sched: (seen.append(RankBatch.from_scheduled(sched.scheduled)), real(sched))[1]
    out = []
    for n, (reqs, plen, olen) in enumerate(batches):
        for i in range(reqs):
            ids = [5 + (7 * i + j + n) % 250 for j in range(plen)]
            eng.add_request(EngineRequest(f"fit{n}-{i}", ids, SamplingParams(max_tokens=olen, ignore_eos=True,
                                                                             temperature=0.0)))
        while eng.has_unfinished():
            t = clock()
            eng.step()
            out.append((seen[-1], clock() - t))
    eng.runner.execute = real
    return out


def fit_engine(model: str, dtype: str, raw: Hardware) -> tuple[float, float, float]:
    """(GEMM efficiency, per-step and per-row overhead) fitted by least squares to the real engine's steps on
    this machine: 1, 4, 16 and 32 requests decoding, one 1024-token prompt. Not the benchmark's mix
    (64 rows decoding, 16 prompts per prefill step): that is what is then predicted."""
    from rayinfer import LLM

    llm = LLM(model, max_num_seqs=32, max_num_batched_tokens=4096, dtype=dtype)
    engine_steps(llm, [(1, 64, 4), (2, 512, 2)])  # warm-up: first-use allocations and kernel choices
    steps = [s for s in engine_steps(llm, [(1, 64, 16), (1, 1024, 1), (4, 64, 16), (16, 64, 16), (32, 64, 16)]) if s[0].rows == 1 or
             s[0].tokens == s[0].rows]  # single-prompt prefills and decode steps
    llm.shutdown()
    cfg = load_model(model)
    flat = CostModel(cfg, replace(raw, step_overhead_s=0.0, row_overhead_s=0.0), 1, cfg.n_routed_experts)
    xs = torch.tensor([[flat.step([b])["seconds"], 1.0, b.rows] for b, _ in steps],
                      dtype=torch.float64)
    ys = torch.tensor([t for _, t in steps], dtype=torch.float64)
    inv_eff, step, row = torch.linalg.lstsq(xs, ys.unsqueeze(1)).solution.flatten().tolist()
    return min(1.0, 1 / inv_eff) if inv_eff > 0 else 1.0, max(0.0, step), max(0.0, row)


def measured_throughput(args) -> tuple[float, float]:
    """throughput.py's rayinfer run (same prompts, LLM options, warm-up and timed call), in this process so that
    its CPU time can be read: -> (output tok/s by CPU time, by wall time)."""
    from rayinfer import LLM, SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, 261, (args.requests, args.prompt_len), generator=g)
    llm = LLM(args.model, max_num_seqs=args.requests, max_num_batched_tokens=4096, dtype=args.dtype)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    llm.generate([prompts[0, :16].tolist()], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    t, w = clock(), time.perf_counter()
    outs = llm.generate(prompts.tolist(), params, use_tqdm=False)
    cpu, wall = clock() - t, time.perf_counter() - w
    llm.shutdown()
    n = sum(len(o.token_ids) for o in outs)
    assert n == args.requests * args.output_len
    return n / cpu, n / wall


def predicted_throughput(args, hw: Hardware) -> float:
    # throughput.py: LLM(model, max_num_seqs=requests, max_num_batched_tokens=4096), defaults otherwise.
    serve = ServeConfig.from_dict({"disaggregated": False, "mixed": {
        "ep_size": 1, "max_num_seqs": args.requests, "max_num_batched_tokens": 4096}}, model=args.model)
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for i in range(args.requests):  # random prompts: nothing shared
            f.write(json.dumps({"arrival": 0.0, "prompt_tokens": args.prompt_len, "output_tokens": args.output_len}) + "\n")
    from rayinfer.sim.workload import load_trace

    res = simulate(serve, load_model(args.model), hw, load_trace(f.name), SimOptions(hours=1))
    os.unlink(f.name)
    return args.requests * args.output_len / res["sim"]["last_finish_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--profile-out", default=None, help="also write the measured profile here (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hw = measure_profile(args.model, args.dtype)
    print(f"CPU profile ({args.threads} thread): GEMM {hw.bf16_flops / 1e9:.1f} GFLOP/s, memory "
          f"{hw.hbm_bytes_s / 1e9:.1f} GB/s, {hw.kernel_overhead_s * 1e6:.1f} us per call, "
          f"{hw.step_overhead_s * 1e3:.2f} ms per step, "
          f"{hw.row_overhead_s * 1e3:.2f} ms per row, GEMM efficiency {hw.gemm_compute_eff:.2f} (fitted on the engine)")
    if args.profile_out:
        save(hw, args.profile_out)
    measured, wall = measured_throughput(args)
    predicted = predicted_throughput(args, hw)
    ratio = predicted / measured
    print(f"throughput.py's run       {measured:9.1f} output tok/s by CPU time ({wall:.1f} by wall time, "
          f"{measured / wall:.1f}x slower: the machine's other load)")
    print(f"simulate (predicted)      {predicted:9.1f} output tok/s")
    print(f"ratio predicted/measured = {ratio:.2f}  {'PASS' if abs(ratio - 1) <= 0.25 else 'FAIL'} (within 25%; "
          f"shared machine: profile and run measured in this one run)")


if __name__ == "__main__":
    main()
