"""Command line: `rayinfer serve` (the OpenAI endpoint), `rayinfer generate` (one offline completion),
`rayinfer run-batch` (an OpenAI batch file through Ray Data),
`rayinfer rebalance` (re-place a running server's experts now), `rayinfer plan` (what each rank holds),
`rayinfer report` (DeepSeek's daily report of a running server or a metrics dump) and `rayinfer simulate`
(a deployment in simulated time).

Owns argument parsing and what is printed to the user; all work is delegated to the library.
"""
from __future__ import annotations

import argparse
import os
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

    keys = args.api_key or [k for k in os.environ.get("RAYINFER_API_KEY", "").split(",") if k.strip()]
    if args.api_key_file:
        keys = [*keys, *_read_keys(args.api_key_file)]
    overrides = dict(model=args.model, host=args.host, port=args.port, dtype=args.dtype, device=args.device,
                     served_model_name=args.served_model_name, api_keys=tuple(k.strip() for k in keys) or None,
                     metrics_need_key=args.metrics_need_key or None, disk_cache_dir=args.disk_cache_dir,
                     disk_cache_bytes=args.disk_cache_bytes, enforce_eager=args.enforce_eager or None,
                     reasoning_parser=args.reasoning_parser)
    if args.colocated:
        overrides["disaggregated"] = False
    cfg = ServeConfig.from_file(args.config, **overrides) if args.config else ServeConfig.from_dict({}, **overrides)
    cfg = cfg.with_ep(args.prefill_ep, args.decode_ep).with_speculation(args.num_speculative_tokens)
    serve_forever(cfg, args.address, ready=lambda m: print(m, flush=True))
    return 0


def _read_keys(path: str) -> list[str]:
    """API keys from a file, one a line (blank lines and # comments skipped): keys that `ps` does not show."""
    from rayinfer.config import ConfigError

    try:
        with open(path, encoding="utf-8") as f:
            keys = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--api-key-file {path!r}: cannot read it ({e})") from None
    if not keys:
        raise ConfigError(f"--api-key-file {path!r} holds no key (one a line)")
    return keys


def _run_batch(args) -> int:
    from rayinfer.actors.cluster import ensure_ray
    from rayinfer.data.run_batch import load_config, run_batch

    cfg = load_config(args.config, args.model)
    started = ensure_ray(args.address)
    try:
        s = run_batch(args.input, args.output, cfg)
    except ImportError as e:  # no Ray Data: the message says what to install
        raise RuntimeError(str(e)) from None
    finally:
        if started:
            import ray

            ray.shutdown()
    print(f"{s.done} results written to {args.output} ({s.errors} errors), {s.skipped} already there; "
          f"{s.recomputed} recomputed after a rank failure; {s.completion_tokens} tokens in {s.seconds:.1f}s")
    return 0


def _rebalance(args) -> int:
    from rayinfer.actors.server import rebalance

    for name, gangs in rebalance(args.address, connect_timeout_s=args.connect_timeout).items():
        for g in gangs:
            if "skipped" in g:
                print(f"{name} gang {g['gang_id']}: skipped ({g['skipped']})")
            else:
                print(f"{name} gang {g['gang_id']}: receive-load imbalance before {g['imbalance_before']:.3f}, "
                      f"{g['slots_changed']} expert slots moved in {g['seconds']:.2f}s")
    return 0


def _report(args) -> int:
    import json
    import urllib.error
    import urllib.request

    from rayinfer import report

    since = report.parse_duration(args.since) if args.since else None
    prices = report.Prices(args.gpu_hour_cost, args.price_cache_hit, args.price_cache_miss, args.price_output,
                           args.gpus_per_node)
    if args.url:
        url = args.url.rstrip("/") + "/metrics/history" + (f"?since={since}" if since else "")
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                text = r.read().decode()
        except (urllib.error.URLError, OSError) as e:
            raise ValueError(f"cannot read {url}: {e}") from None
    else:
        try:
            with open(args.metrics) as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"cannot read --metrics {args.metrics!r}: {e.strerror}") from None
    samples = report.load_dump(text)
    result = report.compute(samples, prices, since)
    if args.plot:
        report.plot(report.series(samples, since), args.plot, title=f"rayinfer: {args.url or args.metrics}")
    print(json.dumps(result, indent=2) if args.json else report.table(result))
    return 0


def _plan(args) -> int:
    import json

    from rayinfer.config import ServeConfig
    from rayinfer.config.engine import parse_bytes
    from rayinfer.plan import as_json, format_table, plan

    overrides = dict(model=args.model)
    cfg = ServeConfig.from_file(args.config, **overrides) if args.config else ServeConfig.from_dict({}, **overrides)
    mem = parse_bytes(args.gpu_memory, "--gpu-memory") if args.gpu_memory is not None else None
    rows = plan(cfg, mem)
    print(json.dumps(as_json(rows), indent=2) if args.json else format_table(rows))
    return 0


def _simulate(args) -> int:
    import json

    from rayinfer import report
    from rayinfer.config import ServeConfig
    from rayinfer.sim import hardware
    from rayinfer.sim.run import SimOptions, load_model, simulate, table
    from rayinfer.sim.workload import load_spec

    overrides = dict(model=args.model)
    cfg = ServeConfig.from_file(args.config, **overrides) if args.config else ServeConfig.from_dict({}, **overrides)
    hw = hardware.with_price(hardware.load(args.hardware), args.gpu_hour_cost)
    opts = SimOptions(hours=args.hours, window_s=args.window or 3600.0, warmup_s=args.warmup,
                      sample_ranks=args.sample_ranks, seed=args.seed)
    result = simulate(cfg, load_model(cfg.model), hw, load_spec(args.workload), opts)
    if args.plot:
        report.plot(result["series"], args.plot, title=f"rayinfer simulate: {args.workload} on {hw.name}")
    print(json.dumps({k: v for k, v in result.items() if k != "series"}, indent=2) if args.json else table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rayinfer", description="Serve DeepSeek-V3-architecture MoE models on Ray.")
    sub = ap.add_subparsers(dest="cmd")
    s = sub.add_parser("serve", help="serve the OpenAI-compatible API (default: tiny preset, 127.0.0.1:8000)")
    s.add_argument("--model", default=None, help="preset name (tiny, small, v3mla) or checkpoint directory [tiny]")
    s.add_argument("--host", default=None, help="address to listen on [127.0.0.1]")
    s.add_argument("--port", type=int, default=None, help="port [8000]")
    s.add_argument("--config", default=None, help="YAML file with the topology and limits (see examples/)")
    s.add_argument("--address", default=None, help="join a running Ray cluster (e.g. 'auto') instead of starting one")
    s.add_argument("--colocated", action="store_true", help="mixed ranks, no prefill/decode disaggregation")
    s.add_argument("--prefill-ep", type=int, default=None, help="ranks per prefill gang [2]")
    s.add_argument("--decode-ep", type=int, default=None, help="ranks per decode (or mixed) gang [2]")
    s.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="MTP drafts per decode step on decode/mixed ranks (needs their ep_size 1) [0: off]")
    s.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 [float32]")
    s.add_argument("--device", default=None, help="cpu | cuda [cpu]")
    s.add_argument("--enforce-eager", action="store_true",
                   help="run every decode step eagerly, never replayed from CUDA graphs")
    s.add_argument("--reasoning-parser", default=None, choices=("deepseek_r1", "none"),
                   help="split <think> output into reasoning_content [from the checkpoint's chat template]")
    s.add_argument("--served-model-name", default=None, help="model id clients send [the model's name]")
    s.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* and /tokenize (repeat for several keys) "
                        "[$RAYINFER_API_KEY, comma-separated; none: open]")
    s.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="read API keys from PATH, one a line (unlike --api-key, not visible in `ps`)")
    s.add_argument("--metrics-need-key", action="store_true", help="/metrics requires an API key too")
    s.add_argument("--disk-cache-dir", default=None,
                   help="keep prompt KV pages in this directory (shared by all ranks; survives restarts)")
    s.add_argument("--disk-cache-bytes", default=None, help="the disk cache's budget, e.g. 200GiB [64GiB]")
    g = sub.add_parser("generate", help="generate a completion for one prompt, offline")
    g.add_argument("--model", default="tiny", help="preset name (tiny, small, v3mla) or checkpoint directory")
    g.add_argument("--prompt", default="Hello, rayinfer!", help="the text to continue [Hello, rayinfer!]")
    g.add_argument("--max-tokens", type=int, default=32, help="tokens to generate at most [32]")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy [0]")
    g.add_argument("--ep-size", type=int, default=1, help="run as an expert-parallel gang of this many ranks")
    b = sub.add_parser("run-batch", help="run an OpenAI batch file (JSONL) offline through Ray Data; resumable")
    b.add_argument("-i", "--input", required=True, help="the batch file: a local path or any pyarrow.fs URI")
    b.add_argument("-o", "--output", required=True, help="results (JSONL); rerunning with it finishes what is missing")
    b.add_argument("--model", default=None, help="preset name or checkpoint directory [the config's, else tiny]")
    b.add_argument("--config", default=None, help="YAML of processor options (ep_size, concurrency, batch_size, "
                                                  "engine_kwargs, sampling_params)")
    b.add_argument("--address", default=None, help="join a running Ray cluster instead of starting one")
    r = sub.add_parser("rebalance", help="re-place the experts of every gang of a running server from measured load")
    r.add_argument("--address", default="auto", help="the Ray cluster the server runs on [auto]")
    r.add_argument("--connect-timeout", type=float, default=20.0,
                   help="seconds to wait for that cluster before giving up [20]")
    pl = sub.add_parser("plan", help="what each rank of a serve config holds and whether it fits (config.json only)")
    pl.add_argument("--config", default=None, help="YAML file with the topology and limits (see examples/)")
    pl.add_argument("--model", default=None, help="checkpoint directory (config.json suffices) or preset [the config's]")
    pl.add_argument("--gpu-memory", default=None, help="memory per GPU, e.g. 80GiB or bytes [the local GPU's, if any]")
    pl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = sub.add_parser("report", help="DeepSeek's daily report (tokens, throughput, cost, revenue) of a running "
                                      "server or a saved metrics dump")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000 (reads its /metrics/history)")
    src.add_argument("--metrics", help="a saved /metrics scrape (text) or /metrics/history (JSON)")
    p.add_argument("--since", default=None, help="window: the last N seconds (or 30m, 6h, 1d) [server lifetime]")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--gpu-hour-cost", type=float, default=2.0, help="USD per GPU-hour (a CPU rank counts as a GPU) [2]")
    p.add_argument("--price-cache-hit", type=float, default=0.14, help="USD per M input tokens from cache [0.14]")
    p.add_argument("--price-cache-miss", type=float, default=0.55, help="USD per M input tokens computed [0.55]")
    p.add_argument("--price-output", type=float, default=2.19, help="USD per M output tokens [2.19]")
    p.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node for the per-node figures [8]")
    p.add_argument("--plot", default=None, help="also draw requests, tokens/s and gangs per role into this PNG")
    sm = sub.add_parser("simulate", help="the whole deployment in simulated time (real scheduler and balancers, "
                                         "kernel cost model): tokens/s per node, TTFT/TPOT, cost and margin")
    sm.add_argument("--config", default=None, help="YAML serve config: roles, gangs, limits, autoscaling")
    sm.add_argument("--model", default=None, help="checkpoint or config directory (config.json suffices), or preset")
    sm.add_argument("--hardware", default="h800", help="h800 | h100 | h200 | b200, or a JSON profile [h800]")
    sm.add_argument("--workload", required=True,
                    help="synthetic spec (YAML file or inline key=value,...) or a JSONL trace")
    sm.add_argument("--hours", type=float, default=1.0, help="simulated hours [1]")
    sm.add_argument("--window", type=float, default=None,
                    help="simulate only this many seconds of each hour and scale (synthetic workloads) [whole hours]")
    sm.add_argument("--warmup", type=float, default=0.0, help="uncounted seconds before the first hour [0]")
    sm.add_argument("--sample-ranks", type=int, default=8, help="ranks simulated per gang of a sampled role [8]")
    sm.add_argument("--seed", type=int, default=0, help="seed of the simulated arrivals [0]")
    sm.add_argument("--gpu-hour-cost", type=float, default=None, help="USD per GPU-hour [the profile's]")
    sm.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    sm.add_argument("--plot", default=None, help="also draw requests, tokens/s and gangs per role into this PNG")
    args = ap.parse_args(argv)
    if args.cmd is None:
        ap.print_help()
        return 2
    try:
        return {"generate": _generate, "serve": _serve, "run-batch": _run_batch, "rebalance": _rebalance,
                "plan": _plan, "report": _report, "simulate": _simulate}[args.cmd](args)
    except ValueError as e:  # user errors: bad model name, bad config
        print(f"rayinfer: error: {e}", file=sys.stderr)
        return 2
    except (ConnectionError, RuntimeError) as e:  # no cluster to reach; a deployment that failed to start
        print(f"rayinfer: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rayinfer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
