"""The Ray Data worker of a batch job (`rayinfer.data`): one engine per worker, rows streamed through it.

Owns a worker's engine and how a batch's rows reach it. With `ep_size == 1` the engine runs in the worker
process (an `AsyncEngine`); with `ep_size > 1` the worker owns one expert-parallel gang, deployed and
placed together exactly as the offline `LLM`'s (a `GangClient`), each row's choices sent to the data-parallel
rank with the fewest prompt tokens outstanding.

Continuous batching, not batch-by-batch lockstep: the worker is an async actor that Ray Data gives up to
`max_concurrent_batches` batches at once, and every row of each batch is submitted as soon as the batch
arrives; the engine's scheduler admits rows from all of them as slots free, so a batch's slow last row
never leaves the engine idle while the next batch waits. Rows of one batch sharing a system prompt hit the
engine's prefix cache like any other requests.

A gang failing under a row (a rank died: the call errors or ends without a finish reason) is retried here
from the row's prompt, on the gang Serve restarts (`RESTART_GANG`), up to `max_attempts`; the row is output
once, when it finished, with `attempts` saying how often it ran. A row the engine refuses (too long for
its cache) fails alone, as a 400. Crossing it: Arrow batches in and out; `EngineRequest`s to the engine
and `Delta`s back.
"""
from __future__ import annotations

import asyncio
import os
import time
import uuid

import pyarrow as pa

from rayinfer.actors.choice import fold, own_seed
from rayinfer.data.config import ProcessorConfig
from rayinfer.data.rows import Plan, plan_row, result_columns, result_types
from rayinfer.openai.http_input import one_line
from rayinfer.messages import EngineRequest, SamplingParams
from rayinfer.openai.protocol import APIError, ChoiceResult, ModelInfo

IDLE_TIMEOUT_S = 300.0  # no delta for this long on a live call: its rank is taken as lost
GANG_APP_PREFIX = "rayinfer-batch-"


class RankLost(Exception):
    """The call's rank (or gang) went away before the request finished."""


def _warm_up_request(i: int) -> EngineRequest:
    """A first step on every rank before the job's rows come: one-time costs (allocation, kernel choice) are
    the worker's start-up, not its first batch's."""
    return EngineRequest(f"warm-up-{i}", [5] * 8, SamplingParams(max_tokens=2, temperature=0))


class _LocalEngine:
    def __init__(self, cfg: ProcessorConfig):
        from rayinfer.engine.async_engine import AsyncEngine
        from rayinfer.engine.engine import Engine

        engine = Engine(cfg.engine_config())
        self.tokenizer, self.kv_capacity = engine.tokenizer, engine.stats()["kv_capacity_tokens"]
        engine.add_request(_warm_up_request(0))
        while engine.has_unfinished():
            engine.step()
        self.engine = AsyncEngine(engine)

    async def stream(self, req: EngineRequest):
        async for d in self.engine.stream(req):
            yield d

    def shutdown(self) -> None:
        self.engine.shutdown()
        self.engine.engine.close()


class _Sink:
    """What `GangClient.stream_to` puts into, delivered onto this worker's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class _Gang:
    def __init__(self, cfg: ProcessorConfig, app_name: str):
        from rayinfer.actors.offline import GangClient
        from rayinfer.model.presets import resolve_model_path
        from rayinfer.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(resolve_model_path(cfg.model))
        self.client = GangClient(cfg.engine_config(), app_name=app_name)
        self.client.run([_warm_up_request(r) for r in range(cfg.ep_size)], lambda d: None, timeout_s=IDLE_TIMEOUT_S)
        self.load = [0] * cfg.ep_size  # prompt tokens outstanding per data-parallel rank
        caps = [s.get("kv_capacity_tokens") or 0 for s in self.client.stats()]
        self.kv_capacity = min(caps) if caps and all(caps) else 0

    async def stream(self, req: EngineRequest):
        rank = min(range(len(self.load)), key=lambda r: (self.load[r], r))
        cost = len(req.prompt_token_ids) + req.params.max_tokens
        self.load[rank] += cost
        sink, done = _Sink(asyncio.get_running_loop()), object()
        call = self.client.stream_to(req, rank, sink)
        call.add_done_callback(lambda _: sink.put(done))
        finished = False
        try:
            while not finished:
                try:
                    item = await asyncio.wait_for(sink.queue.get(), IDLE_TIMEOUT_S)
                except asyncio.TimeoutError:
                    raise RankLost(f"no output from rank {rank} for {IDLE_TIMEOUT_S:.0f}s") from None
                if item is done:
                    raise RankLost(f"rank {rank}'s stream ended before the request finished")
                if isinstance(item, BaseException):
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            self.load[rank] -= cost
            if not finished:
                call.cancel()  # aborts the request on its rank

    def shutdown(self) -> None:
        self.client.shutdown()


class EngineStage:
    """The `map_batches` callable: Arrow batch in, the same rows with the result columns added out."""

    def __init__(self, config: dict, tag: str):
        self.cfg = ProcessorConfig(**config)
        self.engine = _LocalEngine(self.cfg) if self.cfg.ep_size == 1 else \
            _Gang(self.cfg, f"{GANG_APP_PREFIX}{tag}-{uuid.uuid4().hex[:8]}")
        from rayinfer.config import ModelConfig
        from rayinfer.model.presets import resolve_model_path

        model, tok = ModelConfig.from_file(resolve_model_path(self.cfg.model)), self.engine.tokenizer
        longest = max((len(tok.token_bytes(i)) for i in range(tok.vocab_size)), default=0) if tok else 0
        # The HTTP server's validation: the same context, cache and text-length limits, the same model id
        self.info = ModelInfo(os.path.basename(os.path.normpath(self.cfg.model)), model.max_position_embeddings,
                              model.vocab_size, tok, int(time.time()), kv_capacity_tokens=self.engine.kv_capacity,
                              max_token_chars=longest)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        results = await asyncio.gather(*(self._row(r) for r in rows))
        for name, typ in result_types().items():
            column = pa.array([r[name] for r in results], typ)
            if name in batch.column_names:  # a re-run over an earlier output: this run's result wins
                batch = batch.set_column(batch.column_names.index(name), name, column)
            else:
                batch = batch.append_column(name, column)
        return batch

    async def _row(self, row: dict) -> dict:
        plan: Plan = await asyncio.to_thread(plan_row, row, self.info, self.cfg.sampling_params)  # tokenizing
        if plan.error is not None:
            return result_columns(row, plan, [], 0, self.info)
        rid, started = uuid.uuid4().hex, time.time()
        try:
            done = await asyncio.gather(*(self._choice(plan, i, f"{rid}-{i}") for i in range(len(plan.prompts) * plan.n)))
        except APIError as e:
            return result_columns(row, plan, [], 0, self.info, error=e, started_at=started)
        return result_columns(row, plan, [c for c, _ in done], max(a for _, a in done), self.info, started_at=started)

    async def _choice(self, plan: Plan, index: int, rid: str) -> tuple[ChoiceResult, int]:
        params = own_seed(plan.params, index % plan.n)  # an unseeded sampled choice gets one: its retry is exact
        ids = plan.prompts[index // plan.n]
        last = None
        for attempt in range(1, self.cfg.max_attempts + 1):
            out = plan.spec.choice(index) if plan.spec is not None else \
                ChoiceResult(index, [], "", logprobs=[] if params.logprobs is not None else None)
            try:
                async for d in self.engine.stream(EngineRequest(f"{rid}#{attempt}", ids, params, time.time())):
                    fold(out, d)
                if out.finish_reason in ("abort", "migrate"):  # the rank gave it back (drain, shutdown)
                    raise RankLost(f"the rank gave the request back ({out.finish_reason})")
                return out, attempt
            except ValueError as e:  # the engine refused the request itself: retrying cannot help
                raise APIError(400, f"the serving rank refused this request: {one_line(e)}") from e
            except Exception as e:  # noqa: BLE001 - anything else is the gang's failure: run the row again
                last = e
                await asyncio.sleep(min(2.0 ** attempt, 15.0))  # Serve is restarting the gang meanwhile
        raise APIError(503, f"the row failed {self.cfg.max_attempts} times; last: {one_line(last)}")

    def __del__(self):  # Ray Data deletes the UDF when it shuts a worker down gracefully
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.shutdown()


def delete_gangs(tag: str) -> int:
    """Removes the gangs of job `tag` that outlived their workers (a worker killed rather than shut down)."""
    from ray import serve

    names = [n for n in serve.status().applications if n.startswith(f"{GANG_APP_PREFIX}{tag}-")]
    for n in names:
        serve.delete(n)
    return len(names)
