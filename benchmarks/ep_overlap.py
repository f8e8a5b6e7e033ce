"""Expert-parallel gang on a local Ray cluster: where a step's time goes, overlap on vs off.

For a prefill-heavy and a decode-heavy workload on the `small` preset this runs (1) the
single-process engine and (2) a 4-rank gang (ranks as CPU actors, all-to-all over gloo) with
dual-microbatch overlap off and on. From the ranks' own counters it reports, per rank-step:
wall time, time blocked on communication (dispatch/combine waits: the exposed part), and the
rest (compute); the fraction of communication hidden by overlap (1 - exposed_on / exposed_off);
and throughput of the gang vs the single process. On a 2-core machine four ranks share the
cores, so absolute times say little; the breakdown is what this measures.
Run: python benchmarks/ep_overlap.py [--model small] [--ep 4]
"""
from __future__ import annotations

import argparse
import time

import torch


def workloads(vocab_hi: int = 261):
    g = torch.Generator().manual_seed(0)
    from rayinfer import SamplingParams

    prefill = ([torch.randint(5, vocab_hi, (256,), generator=g).tolist() for _ in range(16)],
               SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    decode = ([torch.randint(5, vocab_hi, (16,), generator=g).tolist() for _ in range(32)],
              SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))
    return {"prefill": prefill, "decode": decode}


def tokens_of(kind: str, prompts, params) -> int:
    return sum(len(p) for p in prompts) if kind == "prefill" else len(prompts) * params.max_tokens


def run_gang(model: str, ep: int, overlap: bool, loads) -> dict:
    from rayinfer import LLM

    llm = LLM(model, ep_size=ep, enable_overlap=overlap, max_num_batched_tokens=4096)
    results = {}
    try:
        llm.generate(loads["decode"][0][:2], loads["decode"][1], use_tqdm=False)  # warm-up
        for kind, (prompts, params) in loads.items():
            before = {s["rank"]: s["ep"] for s in llm.gang.stats()}
            t0 = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - t0
            after = {s["rank"]: s["ep"] for s in llm.gang.stats()}
            steps = sum(after[r]["steps"] - before[r]["steps"] for r in after)
            step_s = sum(after[r]["step_s"] - before[r]["step_s"] for r in after)
            blocked = sum(after[r]["blocked_s"] - before[r]["blocked_s"] for r in after)
            results[kind] = dict(wall=wall, tps=tokens_of(kind, prompts, params) / wall, steps=steps / ep,
                                 step_ms=1e3 * step_s / steps, comm_ms=1e3 * blocked / steps,
                                 compute_ms=1e3 * (step_s - blocked) / steps)
    finally:
        llm.shutdown()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--ep", type=int, default=4)
    args = ap.parse_args()

    from rayinfer import LLM

    loads = workloads()
    single = LLM(args.model, max_num_batched_tokens=4096)
    single.generate(loads["decode"][0][:2], loads["decode"][1], use_tqdm=False)
    base = {}
    for kind, (prompts, params) in loads.items():
        t0 = time.perf_counter()
        single.generate(prompts, params, use_tqdm=False)
        base[kind] = tokens_of(kind, prompts, params) / (time.perf_counter() - t0)
    del single
    off = run_gang(args.model, args.ep, False, loads)
    on = run_gang(args.model, args.ep, True, loads)
    print(f"model={args.model} ep={args.ep} (ranks: 1 thread each on a {torch.get_num_threads()}-thread host)")
    print(f"{'workload':<9}{'overlap':<9}{'steps':>6}{'step ms':>9}{'compute':>9}{'comm':>8}"
          f"{'tok/s':>9}{'vs 1-proc':>10}")
    for kind in loads:
        for name, r in (("off", off[kind]), ("on", on[kind])):
            print(f"{kind:<9}{name:<9}{r['steps']:>6.0f}{r['step_ms']:>9.1f}{r['compute_ms']:>9.1f}{r['comm_ms']:>8.1f}"
                  f"{r['tps']:>9.1f}{r['tps'] / base[kind]:>9.2f}x")
        hidden = 1 - on[kind]["comm_ms"] * on[kind]["steps"] / max(off[kind]["comm_ms"] * off[kind]["steps"], 1e-9)
        print(f"{kind:<9}single process: {base[kind]:.1f} tok/s; communication hidden by overlap: {100 * hidden:.0f}%")


if __name__ == "__main__":
    main()
