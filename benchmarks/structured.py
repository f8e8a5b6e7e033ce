"""The step-time cost of structured output: the same batch of decoding sequences with and without a grammar each.

Workload (defaults): the `small` preset, 32 sequences of 64-token prompts, 48 output tokens each, sampled
(temperature 1, a seed each), min_tokens = max_tokens so neither run stops early and both run the same steps;
the constrained run gives every sequence a JSON-schema grammar (xgrammar). Timed after a warm-up that compiles the
grammar, by process CPU time (the shared machine's wall clock measures its load); prints the mean step time of each
and the ratio. The grammar work is host-side: per constrained row, the matcher's catch-up and one bitmask fill.
Run: python benchmarks/structured.py [--model small] [--seqs 32] [--output-len 48]
"""
from __future__ import annotations

import argparse
import json
import time

# minItems: the grammar cannot be complete before max_tokens, so both runs take the same steps
SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}, "minItems": 64}},
          "required": ["items"]}


def run(llm, prompts, params) -> float:
    steps0 = llm.engine.counters["steps"]
    t0 = time.process_time()
    llm.generate(prompts, params, use_tqdm=False)
    return (time.process_time() - t0) / max(1, llm.engine.counters["steps"] - steps0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small", help="preset or checkpoint directory")
    ap.add_argument("--seqs", type=int, default=32, help="sequences decoding together")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per sequence")
    ap.add_argument("--output-len", type=int, default=48, help="output tokens per sequence (all of them generated)")
    a = ap.parse_args()
    import torch

    from rayinfer import LLM, SamplingParams
    torch.set_num_threads(1)
    llm = LLM(a.model)
    prompts = [[(7 * i + j) % 200 + 5 for j in range(a.prompt_len)] for i in range(a.seqs)]

    def params(structured):
        return [SamplingParams(max_tokens=a.output_len, min_tokens=a.output_len, temperature=1.0, seed=i,
                               ignore_eos=True, structured=structured) for i in range(a.seqs)]

    grammar = ("json", json.dumps(SCHEMA))
    run(llm, prompts[:2], params(grammar)[:2])  # warm-up: compile and first steps
    grammars = llm.engine.runner.sampler.grammar
    inner, spent = grammars.mask, [0.0]

    def timed_mask(logits, seqs):  # the grammar's own share of the step, which the noise of the totals hides
        t0 = time.process_time()
        out = inner(logits, seqs)
        spent[0] += time.process_time() - t0
        return out

    grammars.mask = timed_mask
    plain = run(llm, prompts, params(None))
    steps0 = llm.engine.counters["steps"]
    constrained = run(llm, prompts, params(grammar))
    mask_ms = spent[0] / max(1, llm.engine.counters["steps"] - steps0) * 1e3
    print(f"{a.seqs} sequences, {a.model}: step {plain * 1e3:.2f} ms plain, {constrained * 1e3:.2f} ms with a JSON "
          f"grammar each (x{constrained / plain:.3f}); the grammar's mask itself {mask_ms:.2f} ms per step = "
          f"{mask_ms / (constrained * 1e3) * 100:.1f}% of the constrained step")


if __name__ == "__main__":
    main()
