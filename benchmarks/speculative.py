"""MTP speculative decoding against plain decoding: acceptance per draft position and decode tokens/s for
k = 0..3 drafts at several batch sizes, in one run (the k = 0 row of each batch is the peer; the ratio is ours/its).

Workload (defaults): the `small` preset, prompts of 64 tokens, 32 output tokens each, greedy, ignore_eos, so every
configuration emits the same tokens in the same number of requests. Decode time is the whole generate's minus a
max_tokens=1 run of the same prompts (prefill and first token), by process CPU time (the shared machine's wall clock
measures its load); tokens/s counts emitted tokens after the first. A preset with random weights has a random MTP
head, which accepts almost nothing: there the rows measure what speculation costs, not what it gains (a trained
preset is what shows the gain).
Run: python benchmarks/speculative.py [--model small] [--batches 1,8,32] [--ks 0,1,2,3] [--dtypes float32]
"""
from __future__ import annotations

import argparse
import time


def timed(llm, prompts, params) -> float:
    t0 = time.process_time()
    llm.generate(prompts, params, use_tqdm=False)
    return time.process_time() - t0


def measure(model: str, dtype: str, k: int, batch: int, prompt_len: int, output_len: int, temperature: float):
    from rayinfer import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, num_speculative_tokens=k, max_num_seqs=max(batch, 1),
              max_num_batched_tokens=max(2048, batch * prompt_len))
    prompts = [[(7 * i + 3 * j) % 250 + 5 for j in range(prompt_len)] for i in range(batch)]
    params = [SamplingParams(max_tokens=output_len, temperature=temperature, seed=i, ignore_eos=True)
              for i in range(batch)]
    first = [SamplingParams(max_tokens=1, temperature=temperature, seed=i, ignore_eos=True) for i in range(batch)]
    llm.generate(prompts[:1], params[:1], use_tqdm=False)  # warm-up
    before = dict(llm.stats()[0])
    prefill = timed(llm, prompts, first)
    total = timed(llm, prompts, params)
    after = llm.stats()[0]
    drafted = [a - b for a, b in zip(after.get("spec_draft_tokens", []), before.get("spec_draft_tokens", []))]
    accepted = [a - b for a, b in zip(after.get("spec_accepted_tokens", []), before.get("spec_accepted_tokens", []))]
    steps = after["steps"] - before["steps"]
    return dict(tok_s=batch * (output_len - 1) / max(total - prefill, 1e-9), steps=steps,
                acceptance=[a / d if d else 0.0 for a, d in zip(accepted, drafted)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small", help="preset or checkpoint directory (it must ship the MTP layer)")
    ap.add_argument("--batches", default="1,8,32", help="sequences decoding together, comma-separated")
    ap.add_argument("--ks", default="0,1,2,3", help="numbers of drafts per step, comma-separated (0: plain)")
    ap.add_argument("--dtypes", default="float32", help="compute dtypes, comma-separated (float32, bfloat16)")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per sequence")
    ap.add_argument("--output-len", type=int, default=32, help="output tokens per sequence")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else seeded sampling")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: what contention skews least)")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    ks = [int(k) for k in a.ks.split(",")]
    print(f"model={a.model} prompt={a.prompt_len} output={a.output_len} temperature={a.temperature}")
    print(f"{'dtype':>9} {'batch':>5} {'k':>2} {'tok/s':>9} {'vs k=0':>7} {'steps':>6}  acceptance per draft position")
    for dtype in a.dtypes.split(","):
        for batch in (int(b) for b in a.batches.split(",")):
            base = None
            for k in ks:
                r = measure(a.model, dtype, k, batch, a.prompt_len, a.output_len, a.temperature)
                base = r["tok_s"] if k == 0 else base
                ratio = f"{r['tok_s'] / base:6.2f}x" if base else "      -"
                acc = " ".join(f"{x:.2f}" for x in r["acceptance"]) or "-"
                print(f"{dtype:>9} {batch:>5} {k:>2} {r['tok_s']:9.1f} {ratio:>7} {r['steps']:6d}  {acc}")


if __name__ == "__main__":
    main()
