"""The rank replica: one device's attention DP rank + expert shard, as a Ray Serve replica.

A thin shell over `rayinfer.engine`: the constructor finds its place in the gang (Serve's gang
context), forms the gang's process group, builds the rank's engine (its own scheduler and KV
cache, the experts in its slots) and starts the engine loop thread. Requests arrive as packed
`EngineRequest`s and leave as packed `Delta`s:
  - the ingress's path, any role that streams: `run` takes a request and holds it (its end or error comes back
    through it, and closing it aborts the request), while the deltas of all the requests one ingress replica
    runs here travel together, one message per step, on that replica's `channel` (async_engine.Outbox);
  - mixed ranks: `generate` streams a request to the end (the offline driver's path);
  - prefill ranks: `prefill` runs to the first token and returns it with a `KVHandoff` whose
    latents wait in this node's object store;
  - decode ranks: `accept_kv` fetches those latents (pollable transfer with a deadline; on any
    failure the request re-prefills), then `decode`, routed to the same rank, streams the rest.
    Two calls, because Ray keeps an object alive while any call that was passed its reference
    runs: passed to the stream, the latents would stay in the object store until the request
    ended; passed to `accept_kv`, they go as soon as this rank holds them (or gave up on them).
A rank whose collectives failed reports unhealthy, and Serve restarts the whole gang.
A rank Serve stops (a scale-down, a redeploy, shutdown) first drains: Serve stops routing to it and
waits for its own calls to end, then `__del__` keeps its engine stepping until its whole gang is idle
(a peer's requests still need this rank in every collective), up to `drain_timeout_s`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import aclosing

import ray
from ray import serve

from rayinfer.actors.cluster import bind_replica_grpc_to_loopback
from rayinfer.config import EngineConfig
from rayinfer.messages import Delta, EngineRequest, KVHandoff, fold_delta, pack, unpack

CHANNEL_IDLE_S = 2.0  # a channel with no request left here ends after this long (a stopping rank needs its calls over)
CHANNEL_MIN_REQUESTS = 4  # an ingress replica's requests here beyond this many take its channel


class RankReplica:
    def __init__(self, config: EngineConfig, role: str = "mixed", threads: int = 1, kv_timeout_s: float = 10.0,
                 drain_timeout_s: float = 5.0):
        bind_replica_grpc_to_loopback()
        import torch

        from rayinfer.engine.async_engine import AsyncEngine
        from rayinfer.engine.engine import Engine
        from rayinfer.engine.rank import build_rank_engine

        torch.set_num_threads(threads)
        ctx = serve.get_replica_context()
        gang = ctx.gang_context
        self.rank, self.world = (gang.rank, gang.world_size) if gang else (0, 1)
        self.gang_id = gang.gang_id if gang else ctx.replica_id.unique_id
        self.replica_id = ctx.replica_id.unique_id
        self.role, self.kv_timeout_s, self.drain_timeout_s = role, kv_timeout_s, drain_timeout_s
        t0 = self.t0 = time.time()  # when this rank began to hold its device: what GPU-hours count from
        if self.world > 1:
            from rayinfer.actors.rendezvous import form_group
            from rayinfer.engine.lockstep import Lockstep

            from rayinfer.engine.eplb_live import LiveRebalancer

            groups, store = form_group(self.gang_id, self.rank, self.world, config.parallel.collective_timeout_s,
                                       config.device)
            engine = build_rank_engine(config, self.rank, groups)
            self.lockstep = Lockstep(groups.control, store, self.world, self.rank)
            self.rebalancer = LiveRebalancer(engine, groups.control, self.rank, engine.runner.model.cfg.n_group,
                                             config.parallel.eplb_interval_s)
            self.lockstep.extras, self.lockstep.after_vote = self.rebalancer.vote_extras, self.rebalancer.after_vote
            self.loop = AsyncEngine(engine, gang=self.lockstep, on_step=self._publish)
        else:
            engine = Engine(config)
            self.lockstep = self.rebalancer = None
            self.loop = AsyncEngine(engine, on_step=self._publish)
        self.engine = engine
        self.transfers = {"done": 0, "failed": 0}
        self.arrived: dict[str, tuple] = {}  # request id -> (latents or None, rng state, when): accepted, not yet decoding
        self.handed_out: dict[str, float] = {}  # object id -> when: KV objects this rank put or received
        self.startup_s = time.time() - t0
        self._stats: dict = {}
        self.outboxes: dict = {}  # channel id (one per ingress replica) -> its Outbox
        self.calls_from: dict[str, int] = {}  # channel id -> `run` calls of that ingress replica here now
        self._publish()

    def _publish(self) -> None:
        """On the engine thread, after every step and command: snapshot what others read (routers, and `stats`,
        which the ingress polls for its metrics)."""
        self._stats = dict(self.engine.stats(), kv_transfers=dict(self.transfers), **self._eplb_stats())

    def _eplb_stats(self) -> dict:
        if self.rebalancer is None:
            return {}
        from rayinfer.engine.eplb_live import imbalance

        loads = self.lockstep.last_vote.loads
        return {"expert_recv_window": self.engine.runner.ctx.received_tokens, "gang_expert_loads": loads,
                "gang_expert_imbalance": imbalance(loads), "eplb_rebalances": len(self.rebalancer.history)}

    async def rebalance(self, timeout_s: float = 300.0) -> dict:
        """Asks the gang to re-place its experts from the measured load now; returns what was done."""
        if self.rebalancer is None:
            raise RuntimeError("a single-rank deployment has no expert placement to rebalance")
        attempts, done = self.rebalancer.attempts, len(self.rebalancer.history)
        self.rebalancer.requested = True
        self.lockstep.ring()
        deadline = time.monotonic() + timeout_s
        while self.rebalancer.attempts == attempts:
            if time.monotonic() > deadline or not self.loop.alive:
                raise RuntimeError(f"rebalance did not happen within {timeout_s}s (loop alive: {self.loop.alive})")
            await asyncio.sleep(0.02)
        where = {"gang_id": self.gang_id, "rank": self.rank, "role": self.role}
        if len(self.rebalancer.history) == done:
            return {"skipped": "no expert load measured yet", **where}
        return dict(self.rebalancer.history[-1].__dict__, **where)

    def set_fault(self, prompt_prefix: list[int] | None) -> None:
        """Test hook: this rank's sequences whose prompt starts with `prompt_prefix` fail in sampling, as a bad
        token id would make them (`ModelRunner.fault`); None clears it."""
        prefix = list(prompt_prefix or ())
        self.engine.runner.fault = (lambda seq: seq.token_ids[:len(prefix)] == prefix) if prefix else None

    def record_replica_metadata(self) -> dict:
        return {"gang_id": self.gang_id, "gang_rank": self.rank, "world_size": self.world, "role": self.role}

    def record_routing_stats(self) -> dict:
        return self._stats

    async def generate(self, request: bytes, cost=None):
        async with aclosing(self.loop.stream(unpack(request, EngineRequest))) as deltas:
            async for delta in deltas:  # closing it on cancellation aborts the request at once
                yield pack(delta)

    def _outbox(self, channel: str):
        from rayinfer.engine.async_engine import Outbox

        box = self.outboxes.get(channel)
        if box is None:
            box = self.outboxes[channel] = Outbox()
        return box

    async def run(self, request: bytes, channel: str = "", cost=None):
        """Takes a request of the ingress replica whose deltas travel on `channel` ("": none): once this rank
        holds more than `CHANNEL_MIN_REQUESTS` of that replica's, yields its replica id and puts the request's
        deltas on the channel, ending when the request does (raising its error, if it failed); below that
        (actors/channel.py says why), yields the packed deltas itself. A decode rank continues the request
        with the KV `accept_kv` took, or re-prefills. Closing it aborts the request."""
        self.calls_from[channel] = self.calls_from.get(channel, 0) + 1
        try:
            if not channel or self.calls_from[channel] <= CHANNEL_MIN_REQUESTS:
                async with aclosing(self.decode(request)) as deltas:
                    async for raw in deltas:
                        yield raw
            else:
                async with aclosing(self._run_on_channel(request, channel)) as head:
                    async for replica in head:
                        yield replica
        finally:
            self.calls_from[channel] -= 1
            if not self.calls_from[channel]:
                del self.calls_from[channel]

    def _take_arrived(self, req: EngineRequest):
        """The KV `accept_kv` took for `req` (None: it re-prefills), its sampling seed set on `req`."""
        kv, rng, _ = self.arrived.pop(req.request_id, (None, None, 0))
        req.rng_state = rng if rng is not None else req.rng_state
        return kv

    async def _run_on_channel(self, request: bytes, channel: str):
        req = unpack(request, EngineRequest)
        kv = self._take_arrived(req)
        box = self._outbox(channel)
        done = self.loop.submit(req, box, kv)
        del kv  # the engine holds it until the scheduler imports it
        try:
            yield self.replica_id
            await done
        finally:
            if not done.done():  # the caller left (or this rank is stopping): free the request's KV now
                self.loop.abort(req.request_id)
            box.forget(req.request_id)

    async def channel(self, channel: str, replica: str, cost=None):
        """One ingress replica's deltas from this rank, a packed list per step (or per wake-up, when it reads
        slower). Ends once no request of that replica has been here for `CHANNEL_IDLE_S`; the ingress opens
        it again when it sends another."""
        if replica != self.replica_id:  # the pinned replica was gone, and Serve routed the call elsewhere
            raise RuntimeError(f"channel for replica {replica} reached replica {self.replica_id}")
        box = self._outbox(channel)
        me = box.reader = object()  # a newer call for this channel (the ingress reopened it) supersedes this one
        idle_since = time.monotonic()
        while box.reader is me:
            deltas = await box.take(CHANNEL_IDLE_S / 4)
            if box.reader is not me:
                box.requeue(deltas)  # taken while being superseded: the newer call sends them
                return
            if deltas:
                yield pack(deltas)
                idle_since = time.monotonic()
            elif box.live:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= CHANNEL_IDLE_S:
                if box.empty and self.outboxes.get(channel) is box:
                    del self.outboxes[channel]  # nothing left for that replica here: its next request makes a new one
                return

    async def prefill(self, request: bytes, cost=None) -> tuple[bytes, KVHandoff | None]:
        """Runs the prompt, samples the first token; -> (its delta, the KV handoff if decoding continues)."""
        req = unpack(request, EngineRequest)
        merged = Delta(req.request_id, [], logprobs=[] if req.params.logprobs is not None else None)
        async for d in self.loop.stream(req):
            fold_delta(merged, d)
            merged.num_prompt_tokens = d.num_prompt_tokens
        handoff = None
        if merged.finish_reason == "handoff":
            latents, rng = self.engine.exports.pop(req.request_id)
            ref = ray.put(latents)  # alive exactly while the ingress or a decode rank holds the reference
            self.handed_out[ref.hex()] = time.time()
            handoff = KVHandoff([ref], latents.shape[1], time.time(), f"{self.gang_id}/{self.rank}", rng)
        return pack(merged), handoff

    async def accept_kv(self, request_id: str, num_prompt_tokens: int, handoff: KVHandoff, cost=None) -> str:
        """First half of a disaggregated decode: takes the request's KV out of the object store into this
        rank; -> this replica's id, which routes the second half (`decode`) here."""
        self._expire_arrived()
        self.arrived[request_id] = (await self._fetch(request_id, num_prompt_tokens, handoff), handoff.rng_state,
                                    time.monotonic())
        return self.replica_id

    async def _fetch(self, request_id: str, num_prompt_tokens: int, handoff: KVHandoff):
        """The handed-off latents, or None when they cannot be had (the request then re-prefills)."""
        from rayinfer.engine.kv_transfer import KVReceiver, TransferState

        caches = self.engine.runner.kv_caches
        shape = (len(caches), num_prompt_tokens, caches[0].shape[-1])
        self.handed_out[handoff.ref[0].hex()] = time.time()  # watched until this process lets go of it
        receiver = KVReceiver(request_id, handoff.ref[0].future(), shape, self.kv_timeout_s)
        handoff.ref.clear()  # the receiver's future is now the only reference this rank holds
        try:
            while receiver.poll() is TransferState.TRANSFERRING:
                await asyncio.sleep(0.002)
        finally:
            receiver.close()
        ok = receiver.transfer.state is TransferState.DONE
        self.transfers["done" if ok else "failed"] += 1
        return receiver.result

    def _expire_arrived(self) -> None:
        """Drops accepted KV whose decode call never came (the client left in between)."""
        now = time.monotonic()
        for rid, (_, _, at) in list(self.arrived.items()):
            if now - at > self.kv_timeout_s:
                del self.arrived[rid]

    async def decode(self, request: bytes, handoff: KVHandoff | None = None, cost=None):
        """Continues a request whose prefill ran elsewhere, with the KV `accept_kv` took (or `handoff`'s);
        re-prefills if there is none."""
        req = unpack(request, EngineRequest)
        if handoff is None:
            kv = self._take_arrived(req)
        else:
            self.arrived.pop(req.request_id, None)
            kv = await self._fetch(req.request_id, len(req.prompt_token_ids), handoff)
            req.rng_state = handoff.rng_state if handoff.rng_state is not None else req.rng_state
        async with aclosing(self.loop.stream(req, kv)) as deltas:
            del kv  # the engine holds it until the scheduler imports it
            async for delta in deltas:
                yield pack(delta)

    def stats(self) -> dict:
        ctx = self.engine.runner.ctx
        return dict(self._stats, rank=self.rank, gang_id=self.gang_id, pid=os.getpid(), role=self.role, started_at=self.t0,
                    replica_id=self.replica_id, actor_name=ray.get_runtime_context().get_actor_name(),
                    startup_s=self.startup_s, ep=ctx.stats() if ctx is not None else None,
                    engine_tid=self.loop.native_id, votes=self.lockstep.votes if self.lockstep else None,
                    kv_exports=len(self.engine.exports), kv_accepted_waiting=len(self.arrived),
                    kv_objects_alive=self._kv_objects_alive())

    def _collect_stale_handoffs(self) -> None:
        """A call cancelled at the wrong moment can leave a KV reference (its result, or its arguments) in a
        garbage cycle here (a task and its traceback); an idle process may not collect it for a long time."""
        now = time.time()
        if any(now - t > self.kv_timeout_s for t in self.handed_out.values()) and self._kv_objects_alive():
            import gc

            gc.collect()

    def _kv_objects_alive(self) -> int:
        """How many KV objects this rank put (or received) are still referenced (so still in the object store)
        by anyone (or by this rank): the owner's reference table lists each until every holder let go, a
        borrower's until it let go itself."""
        held = {k.decode() if isinstance(k, bytes) else str(k)
                for k in ray._private.worker.global_worker.core_worker.get_all_reference_counts()}
        for oid in [o for o in self.handed_out if o not in held]:
            del self.handed_out[oid]
        return len(self.handed_out)

    def check_health(self) -> None:
        self._expire_arrived()
        self._collect_stale_handoffs()
        if not self.loop.alive:
            raise RuntimeError(f"rank {self.rank} of gang {self.gang_id} is down: {self.loop.error!r}")

    def _gang_done(self) -> bool:
        """Whether the gang can stop: every rank is stopping (none can get new work) and, at the gang's
        last vote, none had requests left. A store that is gone means its host rank (0) already stopped."""
        if self.engine.has_unfinished():
            return False
        if self.lockstep is None:
            return True
        try:
            return self.lockstep.all_leaving() and not self.lockstep.last_vote.busy
        except Exception:  # noqa: BLE001 - rank 0's store went with it: the gang is over
            return True

    def drain(self) -> float:
        """Blocks until the gang can stop or the drain bound passed; -> seconds waited. Serve calls `__del__`
        only once no call of this rank's is left and routes it nothing new: peers' requests may remain, and
        each of their steps needs this rank's share of every collective."""
        t0 = time.monotonic()
        if self.lockstep is not None:
            try:
                self.lockstep.leave()
            except Exception:  # noqa: BLE001 - as in _gang_done
                pass
        while self.loop.alive and not self._gang_done() and time.monotonic() - t0 < self.drain_timeout_s:
            time.sleep(0.05)
        return time.monotonic() - t0

    def __del__(self):
        loop = getattr(self, "loop", None)
        if loop is not None:
            busy = self.engine.has_unfinished() or (self.lockstep is not None and self.lockstep.last_vote.busy)
            waited = self.drain()
            logging.getLogger("ray.serve").info(
                "rank %d of gang %s stopping: drained for %.1fs (gang busy when asked: %s, still busy: %s)",
                self.rank, self.gang_id, waited, busy, not self._gang_done())
            loop.shutdown()
            self.engine.close(timeout=5.0)  # a graceful stop keeps the disk-tier pages still queued
