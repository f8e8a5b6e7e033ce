"""A batch job with Ray Data: a JSONL file of prompts in, a JSONL file of results out, through rayinfer's processor.

Each input line is `{"id": ..., "prompt": "..."}` or `{"id": ..., "messages": [...]}`; each output line is
`{"id", "text", "finish_reason", "usage"}`. Every Ray Data worker owns one engine (`--ep-size 1`) or one
expert-parallel gang; rows stream through it with continuous batching, and Ray Data shows the progress.

    python examples/batch_job.py examples/prompts.jsonl --output results/ --max-tokens 32 [--ep-size 2 --gangs 2]

For OpenAI batch files (`custom_id` / `url` / `body` lines), resumable after a crash, use
`rayinfer run-batch -i batch.jsonl -o results.jsonl` instead.
"""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input", help="JSONL file (or directory / glob Ray Data reads) of prompts")
    ap.add_argument("--output", default=None, help="a directory to write the results to as JSONL [print them]")
    ap.add_argument("--model", default="tiny", help="preset name or checkpoint directory [tiny]")
    ap.add_argument("--ep-size", type=int, default=1, help="ranks per expert-parallel gang [1]")
    ap.add_argument("--gangs", type=int, default=1, help="gangs (Ray Data workers) [1]")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args(argv)

    import ray

    from rayinfer.actors.cluster import ensure_ray
    from rayinfer.data import ProcessorConfig, build_processor

    config = ProcessorConfig(model=args.model, ep_size=args.ep_size, concurrency=args.gangs, batch_size=16,
                             sampling_params=dict(max_tokens=args.max_tokens, temperature=args.temperature))
    # Row functions travel to the workers by value: keep them self-contained.
    processor = build_processor(
        config,
        preprocess=lambda row: {"id": row["id"], **({"messages": row["messages"]} if row.get("messages")
                                                    else {"prompt": row["prompt"]})},
        postprocess=lambda row: {"id": row["id"], "text": row["generated_text"], "finish_reason": row["finish_reason"],
                                 "usage": {"prompt_tokens": row["num_prompt_tokens"],
                                           "completion_tokens": row["num_generated_tokens"],
                                           "cached_tokens": row["num_cached_tokens"]}})
    ensure_ray()  # a local cluster on 127.0.0.1, or the one this process already joined
    ds = processor(ray.data.read_json(args.input))
    if args.output:
        ds = ds.materialize()
        ds.write_json(args.output)
    rows = ds.take_all()
    if not args.output:
        for r in rows:
            print(r)
    return rows


if __name__ == "__main__":
    main()
