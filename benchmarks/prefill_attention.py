"""Prefill attention paths on mixed-length prompts: per-shape groups vs one padded SDPA call per layer.

On CPU the engine runs prefill attention either grouped by equal (query, context) lengths (one SDPA
call per group: per sequence when lengths differ) or as one SDPA call per layer over all prefill
sequences padded to the longest (`kernels.prefill`'s "torch" backend). This times
`LLM(model).generate` on prompts of mixed lengths, both paths in the same run, alternating, and
prints the ratio; the CPU default is whichever this shows faster. (On CUDA the Triton varlen kernel
is the default: `benchmarks/gpu_check.py` times it.)
On a shared machine use --threads 1: with more threads than idle cores, each SDPA call's OpenMP
barrier waits on descheduled threads and the count of calls, not the work, decides the timings.
Run: python benchmarks/prefill_attention.py [--model small] [--prompts 16] [--min-len 50] [--max-len 400]
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--min-len", type=int, default=50)
    ap.add_argument("--max-len", type=int, default=400)
    ap.add_argument("--max-tokens", type=int, default=1, help="1: the run is all prefill")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from rayinfer import LLM, SamplingParams
    from rayinfer.kernels import prefill

    g = torch.Generator().manual_seed(0)
    lens = torch.randint(args.min_len, args.max_len + 1, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(5, 250, (n,), generator=g).tolist() for n in lens]
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm = LLM(args.model, dtype=args.dtype, enable_prefix_caching=False)
    default = prefill.default_backend
    best = {"grouped": float("inf"), "torch": float("inf")}
    outs = {}
    try:
        for _ in range(args.repeats + 1):  # the first round warms both up
            for path in best:
                prefill.default_backend = lambda dev, path=path: path
                t0 = time.perf_counter()
                outs[path] = [o.token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
                best[path] = min(best[path], time.perf_counter() - t0)
    finally:
        prefill.default_backend = default
    tokens = sum(lens)
    print(f"{args.prompts} prompts of {min(lens)}..{max(lens)} tokens ({tokens} in all), {args.model}, {args.dtype}, "
          f"{torch.get_num_threads()} threads; best of {args.repeats}")
    for path, secs in best.items():
        print(f"  {path:8s} {secs * 1e3:8.1f} ms  {tokens / secs:10,.0f} prompt tok/s")
    print(f"  one padded call / grouped: {best['grouped'] / best['torch']:.2f}x speed; "
          f"same tokens: {outs['grouped'] == outs['torch']}")


if __name__ == "__main__":
    main()
