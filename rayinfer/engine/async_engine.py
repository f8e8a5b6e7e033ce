"""Drives an `Engine` from a background thread so asyncio code can stream a request's deltas.

`async for delta in engine.stream(request)` submits the request and yields its deltas as steps
produce them; leaving the loop early (a client went away) aborts the request. The step thread
sleeps while there is no work, so an idle engine costs no CPU. All engine calls happen on that
thread; other threads only enqueue commands.

In an expert-parallel gang every rank steps together (see lockstep.py): each loop turn the
ranks vote on whether any of them has work, and all step if one does; an idle gang sleeps on
its doorbell until a rank that receives work rings it. A failed collective (a peer died, a timeout) is fatal for this
rank's process group: every open stream gets the error and the loop stops, so the health check
can have the gang restarted. A request the engine failed alone (`Engine.take_failures`) gets its
`RequestFailed`; the loop goes on.

Deltas leave the loop thread through sinks: a stream's own queue (`stream`, one thread hop per delta), or an
`Outbox` that many requests share (`submit`): the deltas a step makes for all of them are taken as one batch
by one coroutine, so a rank replica sends an ingress one message per step, not one per token per request.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import replace
from typing import AsyncIterator

from rayinfer.engine.engine import Engine
from rayinfer.messages import Delta, EngineRequest, fold_delta


class AsyncEngine:
    def __init__(self, engine: Engine, gang=None, on_step=None):
        """`gang`: a `Lockstep` for ranks of an expert-parallel gang.
        `on_step`: called on the loop thread after every step (stats publication)."""
        self.engine = engine
        self.gang = gang
        self.on_step = on_step
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, object] = {}  # request id -> its sink (`_QueueSink` or `Outbox`)
        self._touched: set = set()  # sinks given deltas since they were last flushed
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="rayinfer-engine", daemon=True)
        self._thread.start()

    async def stream(self, request: EngineRequest, kv=None) -> AsyncIterator[Delta]:
        """Deltas of `request` as steps produce them; `kv`: latents handed off by a prefill rank."""
        q: asyncio.Queue = asyncio.Queue()
        self._submit(("add", request, _QueueSink(asyncio.get_running_loop(), q), kv))
        del kv  # the engine keeps it until the request is admitted; this frame lives as long as the stream
        finished, pending = False, None
        try:
            while True:
                item, pending = (pending if pending is not None else await q.get()), None
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                item, pending = coalesce(item, q)
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._submit(("abort", request.request_id))

    def submit(self, request: EngineRequest, outbox: "Outbox", kv=None) -> asyncio.Future:
        """Adds `request`, its deltas going to `outbox`; -> a future of this loop that is done when the request
        ends (its error, if it failed). Whoever gives up on it first must `abort` it."""
        done = outbox.expect(request.request_id)
        self._submit(("add", request, outbox, kv))
        return done

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _submit(self, cmd) -> None:
        if self._stopped and cmd[0] == "add":  # a dead loop would never answer
            cmd[2].put(cmd[1].request_id, RuntimeError(f"engine is down: {self.error!r}"))
            cmd[2].flush()
            return
        self._commands.put(cmd)
        self._wake.set()
        if self.gang is not None:
            self.gang.ring()

    def _deliver(self, rid: str, item) -> None:
        sink = self._streams.get(rid)
        if sink is not None:
            sink.put(rid, item)
            self._touched.add(sink)
            if isinstance(item, BaseException) or item.finish_reason is not None:
                del self._streams[rid]

    def _flush(self) -> None:
        for sink in self._touched:
            sink.flush()
        self._touched.clear()

    def _drain(self) -> None:
        handled = False
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                self._flush()
                if handled and self.on_step is not None:
                    self.on_step()  # aborts and admissions change what the published stats say
                return
            handled = True
            if cmd[0] == "add":
                _, req, sink, kv = cmd
                self._streams[req.request_id] = sink
                try:
                    self.engine.add_request(req, kv)
                except Exception as e:  # a bad request fails alone; the loop goes on
                    self.engine.abort(req.request_id)
                    self._deliver(req.request_id, e)
            else:
                self.engine.abort(cmd[1])
                self._streams.pop(cmd[1], None)

    def _loop(self) -> None:
        while not self._stopped:
            self._wake.clear()
            self._drain()
            try:
                if self.gang is None:
                    if not self.engine.has_unfinished():
                        self._wake.wait()
                        continue
                elif not self._gang_turn():
                    continue
                deltas = self.engine.step()
            except Exception as e:  # fail every waiting stream rather than hang it
                self._fail(e)
                if self.gang is not None:
                    return  # the process group is unusable; the health check reports it
                continue
            for d in deltas:
                self._deliver(d.request_id, d)
            for rid, err in self.engine.take_failures().items():  # failed alone: the others step on
                self._deliver(rid, err)
            self._flush()
            if self.on_step is not None:
                self.on_step()

    def _gang_turn(self) -> bool:
        """Whether the gang steps now: wake it if this rank has work, else sleep until someone does."""
        if self.engine.has_unfinished():
            self.gang.ring_from_loop()
        else:
            self.gang.sleep()
            self._drain()
        return self.gang.vote(self.engine.has_unfinished())

    def _fail(self, e: Exception) -> None:
        self.error = e
        for rid in list(self._streams):
            self.engine.abort(rid)
            self._deliver(rid, RuntimeError(f"engine step failed: {e!r}"))
        self._flush()
        # Requests submitted after the failure must not wait for a loop that is gone.
        if self.gang is not None:
            self._stopped = True
            while True:
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                if cmd[0] == "add":
                    cmd[2].put(cmd[1].request_id, RuntimeError(f"rank is down: {e!r}"))
                    cmd[2].flush()

    @property
    def native_id(self) -> int | None:
        """The loop thread's OS thread id (its CPU time is in /proc/<pid>/task/<id>/stat)."""
        return self._thread.native_id

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None


class _QueueSink:
    """One stream's sink: each delta crosses to the stream's event loop as it comes."""
    __slots__ = ("loop", "q")

    def __init__(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue):
        self.loop, self.q = loop, q

    def put(self, rid: str, item) -> None:
        self.loop.call_soon_threadsafe(self.q.put_nowait, item)

    def flush(self) -> None:
        pass


class Outbox:
    """The deltas of many requests (one subscriber's), gathered on the loop thread and taken as one batch.

    `put` and `flush` run on the engine's thread; `take` and everything else on the event loop that made it. A
    request's end (its last delta, or its error) also completes the future `expect` gave for it; errors go
    only there, deltas (the last one included) only into the batches."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop or asyncio.get_running_loop()
        self._items: list[Delta] = []
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._woken = False
        self.live: dict[str, asyncio.Future] = {}  # request id -> done when it ends

    def expect(self, request_id: str) -> asyncio.Future:
        done = self.live[request_id] = self.loop.create_future()
        return done

    def forget(self, request_id: str) -> None:
        self.live.pop(request_id, None)

    def put(self, rid: str, item) -> None:
        if isinstance(item, BaseException):
            self.loop.call_soon_threadsafe(self._end, rid, item)
            return
        with self._lock:
            self._items.append(item)
        if item.finish_reason is not None:
            self.loop.call_soon_threadsafe(self._end, rid, None)

    def flush(self) -> None:
        with self._lock:
            if not self._items or self._woken:
                return
            self._woken = True
        self.loop.call_soon_threadsafe(self._ready.set)

    def _end(self, rid: str, error: BaseException | None) -> None:
        done = self.live.get(rid)
        if done is not None and not done.done():
            done.set_result(None) if error is None else done.set_exception(error)

    async def take(self, timeout_s: float) -> list[Delta]:
        """The deltas put since the last take (waiting up to `timeout_s` for some; [] if none came)."""
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), timeout_s)
            except asyncio.TimeoutError:
                return []
        self._ready.clear()
        with self._lock:
            items, self._items, self._woken = self._items, [], False
        return items


def coalesce(delta: Delta, q: asyncio.Queue) -> tuple[Delta, object]:
    """`delta` with the deltas already queued behind it folded in, so a consumer slower than the engine gets
    one message per wake-up instead of one per step (several tokens per message; text, logprobs, finish kept).
    -> (the merged delta, an error that was queued behind it, to be raised next, or None)."""
    if delta.finish_reason is not None or q.empty():
        return delta, None
    merged = replace(delta, token_ids=list(delta.token_ids),
                     logprobs=None if delta.logprobs is None else list(delta.logprobs))
    while merged.finish_reason is None and not q.empty():
        nxt = q.get_nowait()
        if isinstance(nxt, BaseException):
            return merged, nxt
        fold_delta(merged, nxt)
    return merged, None
