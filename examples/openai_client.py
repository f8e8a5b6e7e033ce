"""Talking to `rayinfer serve` with the official `openai` client.

Shows the three things a client of the endpoint needs: listing the served models, a streaming
chat completion printed token by token as it arrives, and the usage block, including the
prefix-cache figures: OpenAI's `prompt_tokens_details.cached_tokens` and DeepSeek's
`prompt_cache_hit_tokens` / `prompt_cache_miss_tokens` (not fields of the `openai` client's
types, so they are read from the parsed object's `model_extra`).

Run a server, then this script:

    rayinfer serve                                  # tiny preset at http://127.0.0.1:8000/v1
    python examples/openai_client.py --prompt "Tell me about experts" --max-tokens 32

Run it twice with the same long prompt to see the second request served from the prefix cache.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

try:
    import openai
except ImportError:  # a dev extra of rayinfer, not a dependency
    sys.exit("openai_client: this example needs the openai client: pip install openai")

DEFAULT_URL = "http://127.0.0.1:8000/v1"


def _reason(e: openai.APIStatusError) -> str:
    """The server's own message: `e.message` prefixes it with the client's "Error code: NNN - "."""
    return e.body.get("message", e.message) if isinstance(e.body, dict) else e.message


def _fail(message: str) -> NoReturn:
    print(f"openai_client: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def _models(client: openai.OpenAI, base_url: str) -> list[str]:
    try:
        # No retries here: an absent server should be reported at once, not after backoff.
        return [m.id for m in client.with_options(max_retries=0).models.list().data]
    except openai.APIConnectionError:
        _fail(f"cannot reach a rayinfer server at {base_url}; start one with `rayinfer serve` "
              f"(or pass --base-url)")
    except openai.APIStatusError as e:
        if e.status_code == 404 and not isinstance(e.body, dict):  # Ray Serve's proxy, with no app behind it
            _fail(f"{base_url} answers but serves no rayinfer application (still starting?)")
        _fail(f"{base_url}/models answered HTTP {e.status_code}: {_reason(e)}")


def _print_usage(usage) -> None:
    details = usage.prompt_tokens_details
    cached = details.cached_tokens if details is not None else None
    extra = usage.model_extra or {}
    print(f"usage: prompt {usage.prompt_tokens} tokens (cached {cached}; DeepSeek cache hit "
          f"{extra.get('prompt_cache_hit_tokens')}, miss {extra.get('prompt_cache_miss_tokens')}), "
          f"completion {usage.completion_tokens}, total {usage.total_tokens}")


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default=DEFAULT_URL, help=f"the server's /v1 URL [{DEFAULT_URL}]")
    ap.add_argument("--model", default=None, help="model id [the first one the server lists]")
    ap.add_argument("--prompt", default="Explain mixture-of-experts models in one sentence.")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    # A server started with --api-key / --api-key-file checks the key; an open one ignores it, and the
    # placeholder keeps a real OPENAI_API_KEY from being sent to it.
    ap.add_argument("--api-key", default=os.environ.get("RAYINFER_API_KEY", "unused").split(",")[0],
                    help="a key the server was started with [$RAYINFER_API_KEY's first, else a placeholder]")
    args = ap.parse_args(argv)
    base_url = args.base_url.rstrip("/")

    client = openai.OpenAI(base_url=base_url, api_key=args.api_key, timeout=120)
    models = _models(client, base_url)
    print(f"models: {', '.join(models) or '(none)'}")
    if not models and args.model is None:
        _fail(f"{base_url} serves no models")
    model = args.model or models[0]

    print(f"\n[{model}] {args.prompt}\n")
    text, usage = "", None
    try:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": args.prompt}], max_tokens=args.max_tokens,
            temperature=args.temperature, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            # With include_usage the last chunk carries the usage and no choices.
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                piece = choice.delta.content or ""
                text += piece
                print(piece, end="", flush=True)
    except openai.APIConnectionError:
        _fail(f"lost the connection to {base_url} mid-request; is `rayinfer serve` still running?")
    except openai.APIStatusError as e:
        _fail(f"the server refused the request (HTTP {e.status_code}): {_reason(e)}")
    except openai.APIError as e:  # an error the server reported inside the stream
        _fail(f"the request failed mid-stream: {e.message}")
    print("\n")
    if usage is not None:
        _print_usage(usage)
    return text


if __name__ == "__main__":
    main()
