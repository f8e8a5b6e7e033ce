"""`build_processor(config, preprocess, postprocess)`: a Ray Data pipeline stage over rayinfer engines.

Mirrors `ray.data.llm.build_processor` (a config, optional row functions, a `Processor` applied to a
`Dataset` that returns a `Dataset`), but is not registered with it: Ray's builder dispatches on config types
registered through `ray.llm._internal...ProcessorBuilder.register` and chains stages that subclass its
internal `StatefulStage` / `StatefulStageUDF`, neither of which is public API, so plugging in would tie
rayinfer to Ray's private internals of one release.

Owns the Ray Data wiring: preprocess (`ds.map`, then nested values encoded, rayinfer.data.rows), the engine
stage (`map_batches` of rayinfer.actors.data_worker.EngineStage on an actor pool of `concurrency` workers, each
owning one engine or gang, async with `max_concurrent_batches` batches in flight), postprocess (`ds.map`).
Progress shows in Ray Data's own progress bars, one per stage. Crossing it: Datasets in and out.
"""
from __future__ import annotations

import uuid
from typing import Callable

from rayinfer.data.config import ProcessorConfig
from rayinfer.data.rows import decode_row, encode_row


def require_ray_data():
    try:
        import pandas  # noqa: F401 - Ray Data needs it (and pyarrow) but does not depend on them
        import pyarrow  # noqa: F401
        import ray.data
    except ImportError as e:
        raise ImportError(f"rayinfer's batch processing needs Ray Data ({e.name} is missing): "
                          "pip install 'rayinfer[data]'  (or: pip install 'ray[data]')") from None
    return ray.data


def default_postprocess(row: dict) -> dict:
    """What a row comes out as when no postprocess is given: the input columns plus the results."""
    return row


class Processor:
    def __init__(self, config: ProcessorConfig, preprocess: Callable | None = None,
                 postprocess: Callable | None = None):
        self.config = config
        self.preprocess, self.postprocess = preprocess, postprocess or default_postprocess
        self.tag = uuid.uuid4().hex[:8]  # names this processor's gangs, for `cleanup`

    def __call__(self, ds):
        ray_data = require_ray_data()
        from rayinfer.actors.data_worker import EngineStage

        cfg, pre, post = self.config, self.preprocess, self.postprocess
        ds = ds.map(lambda row: encode_row(pre(row) if pre is not None else row))
        per_worker = {"num_cpus": 1} if cfg.ep_size == 1 else {"num_cpus": 0}  # a gang's ranks hold their own CPUs
        ds = ds.map_batches(
            EngineStage, fn_constructor_kwargs=dict(config=cfg.to_dict(), tag=self.tag),
            batch_size=cfg.batch_size, batch_format="pyarrow", zero_copy_batch=True,
            compute=ray_data.ActorPoolStrategy(size=cfg.concurrency,
                                               max_tasks_in_flight_per_actor=2 * cfg.max_concurrent_batches),
            max_concurrency=cfg.max_concurrent_batches,
            # A worker that dies (not a rank: those are retried in the worker) is restarted and its batch rerun
            max_restarts=-1, max_task_retries=-1, **per_worker)
        return ds.map(lambda row: post(decode_row(row)))

    def cleanup(self) -> int:
        """Deletes gangs this processor's workers left behind (a worker that was killed, not shut down)."""
        from rayinfer.actors.data_worker import delete_gangs

        return delete_gangs(self.tag)


def build_processor(config: ProcessorConfig, preprocess: Callable | None = None,
                    postprocess: Callable | None = None) -> Processor:
    """`preprocess(row) -> {"prompt" | "prompt_token_ids" | "messages": ..., "sampling_params": {...}, ...}`;
    `postprocess(row) -> row`, where `row` has what preprocess returned plus `generated_text`,
    `generated_token_ids`, `finish_reason`, `num_prompt_tokens`, `num_generated_tokens`, `num_cached_tokens`,
    `attempts` (runs of the row; > 1 after a rank failure), `error` (None, or why the row failed alone), and
    `started_at` / `finished_at` (wall-clock seconds the engine had the row)."""
    require_ray_data()
    return Processor(config, preprocess, postprocess)
