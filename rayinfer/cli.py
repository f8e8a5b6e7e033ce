"""Command line: `rayinfer generate` (and, as they land, `serve` and `bench`).

Owns argument parsing and what is printed to the user; all work is delegated to the library.
"""
from __future__ import annotations

import argparse
import sys


def _generate(args) -> int:
    import torch

    from rayinfer.model import load_model
    from rayinfer.tokenizer import load_tokenizer

    model = load_model(args.model)
    tok = load_tokenizer(model.checkpoint_path)
    ids = tok.encode(args.prompt)
    with torch.inference_mode():
        for _ in range(args.max_tokens):  # greedy, full forward per token: until the engine lands
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(nxt)
            if nxt in model.cfg.eos_token_id:
                break
    print(tok.decode(ids, skip_special_tokens=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rayinfer", description="Serve DeepSeek-V3-architecture MoE models on Ray.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate a completion for one prompt")
    g.add_argument("--model", default="tiny", help="preset name (tiny, small) or checkpoint directory")
    g.add_argument("--prompt", default="Hello, rayinfer!")
    g.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    try:
        return {"generate": _generate}[args.cmd](args)
    except ValueError as e:  # user errors: bad model name, bad config
        print(f"rayinfer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
