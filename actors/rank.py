"""The rank replica: one device's attention DP rank + expert shard, as a Ray Serve replica.

A thin shell over `rayinfer.engine`: the constructor finds its place in the gang (Serve's gang
context), forms the gang's process group, builds the rank's engine (its own scheduler and KV
cache, the experts in its slots) and starts the engine loop thread. Requests arrive as packed
`EngineRequest`s and leave as a stream of packed `Delta`s. A rank whose collectives failed
reports unhealthy, and Serve restarts the whole gang (RESTART_GANG).
"""
from __future__ import annotations

import os
import time

from ray import serve

from rayinfer.actors.cluster import bind_replica_grpc_to_loopback
from rayinfer.config import EngineConfig
from rayinfer.messages import EngineRequest, pack, unpack


class RankReplica:
    def __init__(self, config: EngineConfig, role: str = "mixed", threads: int = 1):
        bind_replica_grpc_to_loopback()
        import torch

        from rayinfer.engine.async_engine import AsyncEngine
        from rayinfer.engine.engine import Engine
        from rayinfer.engine.rank import build_rank_engine

        torch.set_num_threads(threads)
        gang = serve.get_replica_context().gang_context
        self.rank, self.world = (gang.rank, gang.world_size) if gang else (0, 1)
        self.gang_id = gang.gang_id if gang else serve.get_replica_context().replica_id.unique_id
        self.role = role
        t0 = time.time()
        if self.world > 1:
            from rayinfer.actors.rendezvous import form_group

            from rayinfer.engine.lockstep import Lockstep

            group, store = form_group(self.gang_id, self.rank, self.world, config.parallel.collective_timeout_s,
                                      config.device)
            engine = build_rank_engine(config, self.rank, group)
            self.loop = AsyncEngine(engine, gang=Lockstep(group, store, self.world, self.rank), on_step=self._publish)
        else:
            engine = Engine(config)
            self.loop = AsyncEngine(engine, on_step=self._publish)
        self.engine = engine
        self.startup_s = time.time() - t0
        self._stats = {}
        self._publish()

    def _publish(self) -> None:
        s = self.engine.stats()
        s["num_requests"] = s["num_running"] + s["num_waiting"]
        self._stats = s

    def record_replica_metadata(self) -> dict:
        return {"gang_id": self.gang_id, "gang_rank": self.rank, "world_size": self.world, "role": self.role}

    def record_routing_stats(self) -> dict:
        return self._stats

    async def generate(self, request: bytes):
        async for delta in self.loop.stream(unpack(request, EngineRequest)):
            yield pack(delta)

    def stats(self) -> dict:
        ctx = self.engine.runner.ctx
        import ray

        return dict(self.engine.stats(), rank=self.rank, gang_id=self.gang_id, pid=os.getpid(), role=self.role,
                    actor_name=ray.get_runtime_context().get_actor_name(),
                    startup_s=self.startup_s, ep=ctx.stats() if ctx is not None else None)

    def check_health(self) -> None:
        if not self.loop.alive:
            raise RuntimeError(f"rank {self.rank} of gang {self.gang_id} is down: {self.loop.error!r}")

    def __del__(self):
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.shutdown()
