"""`rayinfer run-batch -i IN -o OUT`: an OpenAI batch file through the processor, resumable.

Owns the job: read the input (rayinfer.data.batch_file), refuse it whole when a custom_id repeats (as
OpenAI does: output lines are keyed by it), skip what the output already holds, write envelope errors at
once, run the rest through `build_processor` (the body parsed and validated by the HTTP server's own code in
the worker) and append each result as its batch comes back. Nothing is kept in memory but the lines.
Crossing it: two paths and a `ProcessorConfig`; a `BatchStats` out.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from rayinfer.data.batch_file import Output, envelope, read_lines, result_line
from rayinfer.data.config import ProcessorConfig


@dataclass
class BatchStats:
    total: int = 0  # requests in the input
    skipped: int = 0  # already in the output from an earlier run
    done: int = 0  # results written by this run (successes and errors)
    errors: int = 0  # lines of this run with an error
    recomputed: int = 0  # requests run more than once because their gang failed under them
    completion_tokens: int = 0
    seconds: float = 0.0


def _postprocess(row: dict) -> dict:
    body = json.loads(row["response_body"]) if row["response_body"] else None
    return {"line": json.dumps(result_line(row["custom_id"], row["status_code"], body, row["error"]),
                               ensure_ascii=False),
            "attempts": row["attempts"], "completion_tokens": row["num_generated_tokens"] or 0}


def load_config(path: str | None, model: str | None) -> ProcessorConfig:
    """A YAML file of `ProcessorConfig` fields (model, ep_size, concurrency, batch_size, engine_kwargs,
    sampling_params, ...); `--model` overrides the file's."""
    from dataclasses import fields

    import yaml

    values = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        except OSError as e:
            raise ValueError(f"cannot read --config {path!r}: {e.strerror}") from None
        if not isinstance(values, dict):
            raise ValueError(f"--config {path!r} must be a mapping of processor options")
        known = {f.name for f in fields(ProcessorConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"--config {path!r}: unknown option(s) {', '.join(unknown)}; "
                             f"valid: {', '.join(sorted(known))}")
    if model:
        values["model"] = model
    return ProcessorConfig(**values)


def run_batch(input_uri: str, output_uri: str, config: ProcessorConfig, progress=None) -> BatchStats:
    """`progress(stats)` is called after each batch of results is on disk."""
    from rayinfer.data.processor import build_processor, require_ray_data

    ray_data = require_ray_data()
    start, stats = time.time(), BatchStats()
    lines = [(i + 1, t) for i, t in enumerate(read_lines(input_uri)) if t.strip()]
    stats.total = len(lines)
    requests, early, seen = [], [], {}
    for n, text in lines:
        req, err = envelope(n, text)
        cid = (req or err)["custom_id"]
        if cid is not None:
            if cid in seen:
                raise ValueError(f"custom_id {cid!r} appears on lines {seen[cid]} and {n} of {input_uri}: "
                                 "each request needs its own")
            seen[cid] = n
        (requests if req is not None else early).append(req or err)
    out = Output(output_uri)
    try:
        for err in early:
            if (err["custom_id"] or err["id"]) in out.done:
                stats.skipped += 1
            else:
                out.write(err)
                stats.done, stats.errors = stats.done + 1, stats.errors + 1
        todo = [r for r in requests if r["custom_id"] not in out.done]
        stats.skipped += len(requests) - len(todo)
        out.flush()
        if todo:
            processor = build_processor(config, postprocess=_postprocess)
            blocks = max(1, min(len(todo) // config.batch_size, 16 * config.concurrency))
            ds = processor(ray_data.from_items(todo, override_num_blocks=blocks))
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    for row in batch.to_pylist():
                        obj = json.loads(row["line"])
                        out.write(obj)
                        stats.done += 1
                        stats.errors += obj["error"] is not None
                        stats.recomputed += row["attempts"] > 1
                        stats.completion_tokens += row["completion_tokens"]
                    out.flush()  # a crash mid-batch leaves at most a torn last line, which the next run drops
                    if progress is not None:
                        progress(stats)
            finally:
                if config.ep_size > 1:
                    processor.cleanup()
    finally:
        out.close()
    stats.seconds = time.time() - start
    return stats
