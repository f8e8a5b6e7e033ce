"""Command line: `rayinfer serve` (the OpenAI endpoint), `rayinfer generate` (one offline completion)
and `rayinfer rebalance` (re-place a running server's experts now).

Owns argument parsing and what is printed to the user; all work is delegated to the library.
"""
from __future__ import annotations

import argparse
import sys


def _generate(args) -> int:
    from rayinfer import LLM, SamplingParams

    llm = LLM(args.model, ep_size=args.ep_size)
    try:
        out = llm.generate([args.prompt], SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature),
                           use_tqdm=False)[0]
    finally:
        llm.shutdown()
    print(args.prompt + out.text)
    return 0


def _serve(args) -> int:
    from rayinfer.actors.server import serve_forever
    from rayinfer.config import ServeConfig

    overrides = dict(model=args.model, host=args.host, port=args.port, dtype=args.dtype, device=args.device,
                     served_model_name=args.served_model_name, disk_cache_dir=args.disk_cache_dir,
                     disk_cache_bytes=args.disk_cache_bytes)
    if args.colocated:
        overrides["disaggregated"] = False
    cfg = ServeConfig.from_file(args.config, **overrides) if args.config else ServeConfig.from_dict({}, **overrides)
    serve_forever(cfg.with_ep(args.prefill_ep, args.decode_ep), args.address, ready=lambda m: print(m, flush=True))
    return 0


def _rebalance(args) -> int:
    from rayinfer.actors.server import rebalance

    for name, gangs in rebalance(args.address).items():
        for g in gangs:
            if "skipped" in g:
                print(f"{name} gang {g['gang_id']}: skipped ({g['skipped']})")
            else:
                print(f"{name} gang {g['gang_id']}: receive-load imbalance before {g['imbalance_before']:.3f}, "
                      f"{g['slots_changed']} expert slots moved in {g['seconds']:.2f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rayinfer", description="Serve DeepSeek-V3-architecture MoE models on Ray.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve the OpenAI-compatible API (default: tiny preset, 127.0.0.1:8000)")
    s.add_argument("--model", default=None, help="preset name (tiny, small) or checkpoint directory [tiny]")
    s.add_argument("--host", default=None, help="address to listen on [127.0.0.1]")
    s.add_argument("--port", type=int, default=None, help="port [8000]")
    s.add_argument("--config", default=None, help="YAML file with the topology and limits (see examples/)")
    s.add_argument("--address", default=None, help="join a running Ray cluster (e.g. 'auto') instead of starting one")
    s.add_argument("--colocated", action="store_true", help="mixed ranks, no prefill/decode disaggregation")
    s.add_argument("--prefill-ep", type=int, default=None, help="ranks per prefill gang [2]")
    s.add_argument("--decode-ep", type=int, default=None, help="ranks per decode (or mixed) gang [2]")
    s.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 [float32]")
    s.add_argument("--device", default=None, help="cpu | cuda [cpu]")
    s.add_argument("--served-model-name", default=None, help="model id clients send [the model's name]")
    s.add_argument("--disk-cache-dir", default=None,
                   help="keep prompt KV pages in this directory (shared by all ranks; survives restarts)")
    s.add_argument("--disk-cache-bytes", default=None, help="the disk cache's budget, e.g. 200GiB [64GiB]")
    g = sub.add_parser("generate", help="generate a completion for one prompt, offline")
    g.add_argument("--model", default="tiny", help="preset name (tiny, small) or checkpoint directory")
    g.add_argument("--prompt", default="Hello, rayinfer!")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--ep-size", type=int, default=1, help="run as an expert-parallel gang of this many ranks")
    r = sub.add_parser("rebalance", help="re-place the experts of every gang of a running server from measured load")
    r.add_argument("--address", default="auto", help="the Ray cluster the server runs on [auto]")
    args = ap.parse_args(argv)
    try:
        return {"generate": _generate, "serve": _serve, "rebalance": _rebalance}[args.cmd](args)
    except ValueError as e:  # user errors: bad model name, bad config
        print(f"rayinfer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
