"""A batch job through the serving cluster: a JSONL file of prompts in, a JSONL file of results out.

Each input line is `{"id": ..., "prompt": "..."}` (sent to /v1/completions) or
`{"id": ..., "messages": [...]}` (sent to /v1/chat/completions); a line without an id gets its
line number. Any other field of a line is a request parameter for that line alone (`max_tokens`,
`temperature`, `stop`, `seed`, ...), over the command line's defaults; a `model` other than the
job's is refused before anything is sent, as a job talks to one model. Requests go out `--concurrency` at a time; each result is appended to `--output`
as soon as it arrives: `{"id", "text", "finish_reason", "usage"}`, or `{"id", "error"}` for a
request the server refused (a 4xx, or a 429/5xx that outlived its retries).

The job is resumable: ids already in the output file are skipped, so rerunning the same
command after a crash, Ctrl-C or a lost server finishes the rest, and nothing is sent twice.
`--retry-failed` drops the error records first so that those requests are tried again.
A server at its queue bound answers 429 with Retry-After; those requests wait at least that
long (more, with jitter and exponential growth, when refused again) and are resent.

    rayinfer serve &
    python examples/batch_job.py examples/prompts.jsonl --output results.jsonl --concurrency 8

Exit status: 0 when every request has a result, 1 when some were refused or the server is
unreachable.

For an input too big for one driver, Ray Data (`pip install "ray[data]"`, which brings pandas
and pyarrow, so rayinfer does not depend on it) shards the same work over the cluster:
`ray.data.read_json("prompts/*.jsonl").map_batches(Caller, batch_size=64, concurrency=8)
.write_json("results/")`, where `Caller` is a class that holds one `openai.AsyncOpenAI` client
and sends a batch's rows with the bounded concurrency and retry rules of `_send` below. Each
block then succeeds or fails as a whole; resuming means skipping the blocks already written.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass

try:
    import openai
except ImportError:  # a dev extra of rayinfer, not a dependency
    sys.exit("batch_job: this example needs the openai client: pip install openai")
from tqdm import tqdm

DEFAULT_URL = "http://127.0.0.1:8000/v1"
CONNECTION_RETRIES = 5  # ~8-12 s of backoff


def _reason(e: openai.APIStatusError) -> str:
    """The server's own message: `e.message` prefixes it with the client's "Error code: NNN - "."""
    return e.body.get("message", e.message) if isinstance(e.body, dict) else e.message


class JobError(Exception):
    """Something the user can fix (bad input, unreachable server): reported in one line, exit 1."""


@dataclass
class Stats:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    rate_limited: int = 0  # 429 answers received (each one retried)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


def read_requests(path: str) -> list[dict]:
    requests, seen = [], {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except OSError as e:
        raise JobError(f"cannot read {path}: {e.strerror}") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise JobError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict) or ("prompt" in obj) == ("messages" in obj):
            raise JobError(f'{path}:{n}: expected an object with either "prompt" or "messages"')
        rid = obj.get("id", n)
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise JobError(f"{path}:{n}: id {rid!r} must be a string or an integer")
        if rid in seen:  # resuming by id would be ambiguous
            raise JobError(f"{path}:{n}: id {rid!r} repeats the id of line {seen[rid]}")
        if obj.get("stream"):
            raise JobError(f"{path}:{n}: \"stream\" is not supported in a batch job (results are written whole)")
        seen[rid] = n
        requests.append(dict(obj, id=rid))
    return requests


def read_output(path: str, retry_failed: bool) -> set:
    """Ids that already have a result. A torn last line (the writer died mid-line) is cut off."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    complete = data[:data.rfind(b"\n") + 1]
    try:
        text = complete.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JobError(f"{path} is not UTF-8 text; is --output the right file?") from e
    records = []
    # split("\n"), not splitlines(): a result's text may hold U+2028 and friends, which JSON leaves unescaped.
    for n, line in enumerate(text.split("\n")[:-1], 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or "id" not in rec or not ("text" in rec or "error" in rec):
            raise JobError(f"{path}:{n} is not a batch_job result; is --output the right file?")
        records.append((line, rec["id"], "error" in rec))
    kept = [r for r in records if not (retry_failed and r[2])]
    if len(complete) < len(data) or len(kept) < len(records):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line, _, _ in kept)
        os.replace(tmp, path)  # atomic: a crash here leaves the old file or the new one, never half
    return {rid for _, rid, _ in kept}


def _not_deployed(e: openai.APIStatusError) -> bool:
    """A 404 without an OpenAI error body comes from Ray Serve's proxy, not from rayinfer: the
    application is not (or no longer, or not yet) deployed behind it."""
    return e.status_code == 404 and not isinstance(e.body, dict)


def _retry_delay(attempt: int, response=None) -> float:
    """Never earlier than the server's Retry-After; grows on repeated refusals; jittered so that
    the requests refused together do not all come back at the same instant."""
    floor = 0.0
    if response is not None:
        try:
            floor = float(response.headers.get("retry-after", 0))
        except ValueError:  # an HTTP date: rare enough to treat as "a little while"
            floor = 1.0
    return max(floor, min(30.0, 0.25 * 2 ** attempt)) * random.uniform(1.0, 1.5)


_NOT_PARAMS = ("id", "prompt", "messages", "model")


def _check_models(todo: list[dict], model: str) -> None:
    for req in todo:
        if req.get("model", model) != model:
            raise JobError(f"request {req['id']!r} asks for model {req['model']!r}, but this job runs {model!r}; "
                           f"split the input by model and pass --model")


async def _send(client: openai.AsyncOpenAI, req: dict, args, stats: Stats) -> dict:
    # The line's own parameters win; they travel as raw JSON so that the server validates every one.
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature,
              **{k: v for k, v in req.items() if k not in _NOT_PARAMS}}
    for attempt in range(args.max_retries + 1):
        retry = attempt < args.max_retries
        try:
            if "messages" in req:
                r = await client.chat.completions.create(model=args.model, messages=req["messages"], extra_body=params)
                text = r.choices[0].message.content
            else:
                r = await client.completions.create(model=args.model, prompt=req["prompt"], extra_body=params)
                text = r.choices[0].text
            return {"id": req["id"], "text": text, "finish_reason": r.choices[0].finish_reason,
                    "usage": r.usage.model_dump(exclude_none=True) if r.usage else None}
        except openai.RateLimitError as e:
            stats.rate_limited += 1
            error, delay = e, _retry_delay(attempt, e.response)
        except openai.InternalServerError as e:  # e.g. 503 when a rank failed: the gang restarts
            error, delay = e, _retry_delay(attempt)
        except (openai.APIStatusError, openai.APIConnectionError) as e:
            if isinstance(e, openai.APIStatusError) and not _not_deployed(e):
                # 400, 404 for a model, ...: the same request would be refused again
                return {"id": req["id"], "error": f"HTTP {e.status_code}: {_reason(e)}"}
            # A server that stays away for seconds is gone: stop, and finish on rerun, rather than
            # record every remaining request as failed.
            if attempt >= min(args.max_retries, CONNECTION_RETRIES):
                why = "the application is not deployed" if isinstance(e, openai.APIStatusError) else e.message
                raise JobError(f"lost the server at {args.base_url} ({why}); rerun the same command to resume") from e
            error, delay = e, _retry_delay(attempt)
        if retry:
            await asyncio.sleep(delay)
    return {"id": req["id"],
            "error": f"HTTP {error.status_code} after {args.max_retries} retries: {_reason(error)}"}


async def _run(args, todo: list[dict], stats: Stats) -> None:
    queue: asyncio.Queue = asyncio.Queue()
    for req in todo:
        queue.put_nowait(req)
    # Retries are ours (_send), so that 429s get more patience than the client's default two.
    async with openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0,
                                  timeout=args.timeout) as client:
        await _check_server(client, args)
        _check_models(todo, args.model)
        bar = tqdm(total=len(todo), unit="req", desc="batch", mininterval=0.5)
        with open(args.output, "a", encoding="utf-8") as out:
            async def worker() -> None:
                while not queue.empty():
                    rec = await _send(client, queue.get_nowait(), args, stats)
                    # One line per write, flushed: a crash loses at most the requests still in flight.
                    out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    out.flush()
                    if "error" in rec:
                        stats.failed += 1
                    else:
                        stats.done += 1
                        stats.prompt_tokens += (rec["usage"] or {}).get("prompt_tokens", 0)
                        stats.completion_tokens += (rec["usage"] or {}).get("completion_tokens", 0)
                    bar.set_postfix(failed=stats.failed, refused_429=stats.rate_limited, refresh=False)
                    bar.update(1)

            tasks = [asyncio.create_task(worker()) for _ in range(min(args.concurrency, len(todo)))]
            try:
                finished, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for t in finished:
                    t.result()  # the first worker's error, if any
            finally:
                for t in tasks:  # cancelling an in-flight call closes its connection: the server aborts it
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                bar.close()


async def _check_server(client: openai.AsyncOpenAI, args) -> None:
    try:
        models = [m.id for m in (await client.models.list()).data]
    except openai.APIConnectionError as e:
        raise JobError(f"cannot reach a rayinfer server at {args.base_url}; start one with `rayinfer serve` "
                       f"(or pass --base-url)") from e
    except openai.APIStatusError as e:
        if _not_deployed(e):
            raise JobError(f"{args.base_url} answers but serves no rayinfer application (still starting?)") from e
        raise JobError(f"{args.base_url}/models answered HTTP {e.status_code}: {_reason(e)}") from e
    if args.model is None:
        if not models:
            raise JobError(f"{args.base_url} serves no models")
        args.model = models[0]
    elif args.model not in models:  # else every request would be recorded as a 404
        raise JobError(f"model {args.model!r} is not served at {args.base_url} (it serves: {', '.join(models)})")


def main(argv: list[str] | None = None) -> Stats:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", help="JSONL file of prompts")
    ap.add_argument("--output", required=True, help="JSONL file of results (appended to; resumable)")
    ap.add_argument("--base-url", default=DEFAULT_URL, help=f"the server's /v1 URL [{DEFAULT_URL}]")
    ap.add_argument("--model", default=None, help="model id [the first one the server lists]")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per result, unless a line sets its own [64]")
    ap.add_argument("--temperature", type=float, default=0.0, help="unless a line sets its own [0]")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight at once [8]")
    ap.add_argument("--max-retries", type=int, default=10, help="retries of a refused (429/5xx) request [10]")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one response [600]")
    ap.add_argument("--retry-failed", action="store_true", help="resend requests recorded with an error")
    ap.add_argument("--api-key", default=os.environ.get("RAYINFER_API_KEY", "unused"),
                    help="a key the server accepts (`rayinfer serve --api-key`) [$RAYINFER_API_KEY]")
    args = ap.parse_args(argv)
    if args.concurrency < 1 or args.max_retries < 0:
        ap.error("--concurrency must be >= 1 and --max-retries >= 0")
    args.base_url = args.base_url.rstrip("/")

    stats, t0 = Stats(), time.perf_counter()
    try:
        requests = read_requests(args.input)
        have = read_output(args.output, args.retry_failed)
        todo = [r for r in requests if r["id"] not in have]
        stats.skipped = len(requests) - len(todo)
        if todo:
            asyncio.run(_run(args, todo, stats))
    except JobError as e:
        print(f"batch_job: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as e:
        print(f"batch_job: error: cannot write {args.output}: {e.strerror}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(f"\nbatch_job: interrupted after {stats.done + stats.failed} results; rerun the same command "
              f"to resume", file=sys.stderr)
        raise SystemExit(130) from None
    stats.seconds = time.perf_counter() - t0
    print(f"batch_job: done {stats.done}, skipped {stats.skipped}, failed {stats.failed}, "
          f"tokens {stats.prompt_tokens} in + {stats.completion_tokens} out, {stats.seconds:.1f} s, "
          f"{stats.completion_tokens / max(stats.seconds, 1e-9):.1f} out tokens/s "
          f"({stats.rate_limited} 429s retried) -> {args.output}")
    return stats


if __name__ == "__main__":
    sys.exit(1 if main().failed else 0)
