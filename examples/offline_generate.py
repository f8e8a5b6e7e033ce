"""Offline generation with `rayinfer.LLM`: no server, the engine runs under this script.

Prints each prompt with its completion, finish reason, time to first token and latency, then
the batch's output tokens/s. With `--ep-size 1` the engine runs in this process; with
`--ep-size N` the same call runs on an N-rank expert-parallel gang on a local Ray cluster
(requests spread over its data-parallel ranks), which is shut down at the end.

    python examples/offline_generate.py                                  # built-in prompts, tiny preset
    python examples/offline_generate.py "Hello" "Once upon a time" --max-tokens 32
    python examples/offline_generate.py --ep-size 2 --temperature 0.8
"""
from __future__ import annotations

import argparse
import sys
import time

DEFAULT_PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "Mixture-of-experts models route each token to",
    "def fibonacci(n):",
]


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prompts", nargs="*", help="prompts to complete [a few built-in ones]")
    ap.add_argument("--model", default="tiny", help="preset name (tiny, small) or checkpoint directory [tiny]")
    ap.add_argument("--ep-size", type=int, default=1, help="ranks of the expert-parallel gang [1: in-process]")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args(argv)
    prompts = args.prompts or DEFAULT_PROMPTS

    from rayinfer import LLM, SamplingParams

    owns_ray = False
    if args.ep_size > 1:
        import ray

        owns_ray = not ray.is_initialized()  # else the caller's cluster, which must outlive this call
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
        llm = LLM(args.model, ep_size=args.ep_size)
    except ValueError as e:  # a bad model name or option: the message names it
        print(f"offline_generate: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
    finally:
        llm.shutdown()
        if owns_ray:  # LLM.shutdown releases the gang, not the cluster it started for it
            import ray

            ray.shutdown()

    for out in outputs:
        print(f"{out.prompt!r} -> {out.text!r}")
        print(f"    finish {out.finish_reason}, {len(out.token_ids)} tokens, TTFT {out.time_to_first_token:.3f} s, "
              f"latency {out.latency:.3f} s")
    tokens = sum(len(o.token_ids) for o in outputs)
    print(f"{len(outputs)} prompts, {tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tokens/s "
          f"({args.model}, ep_size {args.ep_size})")
    return outputs


if __name__ == "__main__":
    main()
