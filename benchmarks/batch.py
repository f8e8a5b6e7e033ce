"""Batch throughput through Ray Data (rayinfer.data) vs the offline `LLM` on the same gang configuration,
and 2 gangs vs 1, in one run.

Workload (defaults): the `small` preset, 1,000 prompts of 64 random token ids, 16 output tokens each, greedy,
ignore_eos, EP gangs of 2 ranks. The offline `LLM(ep_size=2)` generates them all in one call (after a warm-up
call); the processor runs them as a Dataset with one gang, then with two (`concurrency=2`). Throughput is output
tokens per second of engine time: for `LLM` the timed call; for the processor, from the first row an engine
started to the last it finished (the rows' `started_at` / `finished_at`), so neither counts start-up, which is
printed apart (the processor's end-to-end wall time includes its gangs' start). Goals: processor >= 0.9x the
offline LLM; 2 gangs >= 1.6x one on a machine with cores for 4 ranks (on 2 shared cores the machine is the limit).
Run: python benchmarks/batch.py [--prompts 1000] [--model small] [--ep-size 2] [--output-len 16] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import random
import time


def _processor_run(ray_data, prompts, args, gangs: int) -> tuple[float, float, int]:
    from rayinfer.data import ProcessorConfig, build_processor

    cfg = ProcessorConfig(model=args.model, ep_size=args.ep_size, concurrency=gangs, batch_size=args.batch_size,
                          max_concurrent_batches=args.concurrent_batches,
                          sampling_params=dict(max_tokens=args.output_len, temperature=0, ignore_eos=True))
    processor = build_processor(cfg)
    t0 = time.time()
    try:
        rows = processor(ray_data.from_items([{"prompt_token_ids": p} for p in prompts],
                                             override_num_blocks=max(1, len(prompts) // args.batch_size))).take_all()
    finally:
        processor.cleanup()
    wall = time.time() - t0
    assert len(rows) == len(prompts) and not any(r["error"] for r in rows), [r["error"] for r in rows if r["error"]][:3]
    tokens = sum(r["num_generated_tokens"] for r in rows)
    span = max(r["finished_at"] for r in rows) - min(r["started_at"] for r in rows)
    return tokens / span, wall, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--ep-size", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--concurrent-batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in this process (the offline LLM's "
                                                               "ep_size=1 engine); ranks use one each")
    args = ap.parse_args()
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    from rayinfer import LLM, SamplingParams
    from rayinfer.actors.cluster import ensure_ray
    from rayinfer.data.processor import require_ray_data

    ray_data = require_ray_data()
    ensure_ray(num_cpus=max(16, os.cpu_count() or 1))  # logical CPUs: ranks take fractions of the real cores
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 261) for _ in range(args.prompt_len)] for _ in range(args.prompts)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)

    t0 = time.time()
    llm = LLM(args.model, ep_size=args.ep_size)
    try:
        llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up
        start_llm = time.time() - t0
        t0 = time.time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        llm_s = time.time() - t0
    finally:
        llm.shutdown()
    llm_tps = sum(len(o.token_ids) for o in outs) / llm_s
    one, wall1, _ = _processor_run(ray_data, prompts, args, 1)
    two, wall2, _ = _processor_run(ray_data, prompts, args, 2)

    cores = os.cpu_count()
    print(f"\nbatch: {args.prompts} prompts x {args.prompt_len} tokens -> {args.output_len} tokens, {args.model}, "
          f"EP gangs of {args.ep_size}; {cores} cores (shared machine: compare the ratios)")
    print(f"  offline LLM(ep_size={args.ep_size}):  {llm_tps:8.1f} output tok/s  (start-up {start_llm:.1f}s)")
    print(f"  processor, 1 gang:        {one:8.1f} output tok/s  (end-to-end {wall1:.1f}s incl. gang start)   "
          f"ratio vs LLM {one / llm_tps:.2f}x (goal >= 0.9x)")
    print(f"  processor, 2 gangs:       {two:8.1f} output tok/s  (end-to-end {wall2:.1f}s)   "
          f"ratio vs 1 gang {two / one:.2f}x (goal >= 1.6x with >= {4 * args.ep_size} cores"
          f"{'; this machine has ' + str(cores) + ': it is the limit' if cores < 4 * args.ep_size else ''})")


if __name__ == "__main__":
    main()
