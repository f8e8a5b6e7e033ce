"""The offline driver's connection to a gang: `LLM(..., ep_size=N)` runs through this.

Starts (or joins) Ray, deploys one gang of rank replicas as a private Serve application, spreads
each `generate` call's requests over the data-parallel ranks (by a decode-balancing policy:
fewest prompt tokens assigned so far), and streams every request's deltas back concurrently on
a private event loop thread, so synchronous callers (scripts, notebooks) can use it as is.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import uuid

from rayinfer.actors.cluster import ensure_ray, ensure_serve
from rayinfer.actors.deployments import rank_gang
from rayinfer.actors.router import rank_hint
from rayinfer.config import EngineConfig
from rayinfer.messages import Delta, EngineRequest, RequestFailed, pack, unpack


class GangError(RuntimeError):
    """A rank of the gang failed while serving this call."""


class GangClient:
    def __init__(self, config: EngineConfig, app_name: str | None = None):
        import logging

        from ray import serve

        from rayinfer.engine.rank import initial_placement

        initial_placement(config)  # a topology that cannot work fails here, not in 26 replica retries
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # an offline script is not a server log
        self.config = config
        self.started_ray = ensure_ray(config.parallel.address)
        ensure_serve(http=False)
        self.app = app_name or f"rayinfer-offline-{uuid.uuid4().hex[:8]}"
        # Requests are placed by explicit rank here, so replica stats are only for `stats()`: poll rarely.
        self.handle = serve.run(rank_gang(config, "ranks", stats_period_s=10.0), name=self.app, route_prefix=None)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rayinfer-gang-client", daemon=True)
        self._thread.start()
        self._next = itertools.count()

    def run(self, requests: list[EngineRequest], on_delta, timeout_s: float | None = None, on_failed=None) -> None:
        """Streams every request on its assigned rank; `on_delta(delta)` is called on the caller's thread, and
        `on_failed(request_id, error)` for a request a rank failed alone (the others go on)."""
        import queue

        out: queue.SimpleQueue = queue.SimpleQueue()
        load = [0] * self.config.parallel.ep_size
        assignments = []
        for req in requests:  # fewest prompt tokens first: balances attention work over DP ranks
            rank = min(range(len(load)), key=lambda r: (load[r], r))
            load[rank] += len(req.prompt_token_ids)
            assignments.append((req, rank))
        fut = asyncio.run_coroutine_threadsafe(self._stream_all(assignments, out), self._loop)
        pending = len(requests)
        while pending:
            item = out.get(timeout=timeout_s)
            if isinstance(item, tuple):  # (request id, RequestFailed): that request alone
                on_failed(*item)
                pending -= 1
                continue
            if isinstance(item, BaseException):
                fut.cancel()
                raise GangError(f"the expert-parallel gang failed: {item}") from item
            on_delta(item)
            if item.finish_reason:
                pending -= 1
        fut.result()

    def stream_to(self, req: EngineRequest, rank: int, sink):
        """Streams one request on `rank` from any thread: each `Delta` (or the exception that ended the call)
        goes to `sink.put`; returns the call's concurrent future (cancel it to abort the request)."""
        return asyncio.run_coroutine_threadsafe(self._stream(req, rank, sink), self._loop)

    async def _stream_all(self, assignments, out) -> None:
        await asyncio.gather(*(self._stream(req, rank, out) for req, rank in assignments))

    async def _stream(self, req: EngineRequest, rank: int, out) -> None:
        h = self.handle.options(method_name="generate", stream=True, session_id=rank_hint(None, rank))
        try:
            async for raw in h.remote(pack(req)):
                out.put(unpack(raw, Delta))
        except RequestFailed as e:
            out.put((req.request_id, e))
        except Exception as e:  # noqa: BLE001 - any failure of a rank is reported to the caller
            out.put(e)

    def rebalance(self) -> dict:
        """Re-places the gang's experts from the load measured so far (EPLB), between two steps."""
        h = self.handle.options(method_name="rebalance", session_id=rank_hint(None, 0))
        return asyncio.run_coroutine_threadsafe(self._await(h.remote()), self._loop).result()

    @staticmethod
    async def _await(response):
        return await response

    def stats(self) -> list[dict]:
        return sorted(self.handle.broadcast("stats").results(timeout_s=60), key=lambda s: s["rank"])

    def shutdown(self) -> None:
        """Removes the gang; a Ray cluster this client started goes with it."""
        import ray
        from ray import serve

        try:
            serve.delete(self.app)
            if self.started_ray:
                serve.shutdown()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self.started_ray:
                ray.shutdown()
