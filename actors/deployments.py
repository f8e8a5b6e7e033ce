"""Ray Serve deployment options for rank gangs: gang scheduling, resources, routing, health, scaling.

One place decides how a gang of `ep_size` rank replicas is placed (together, as one placement
group; restarted together when a member dies), how much of a device each takes (a GPU each on
GPU nodes; a slice of the cores on a CPU machine), how requests reach them, and how many gangs
run: a fixed number, or between a role's min and max gangs with Serve's autoscaling (Serve 2.60
wraps the policy of a gang-scheduled deployment so it only asks for whole gangs, and stops whole
gangs on the way down). A gang being stopped drains (RankReplica.__del__): it gets no new request
and its ranks keep stepping together until the whole gang is idle, up to the drain bound.
"""
from __future__ import annotations

import os

from ray import serve
from ray.serve.config import GangRuntimeFailurePolicy, GangSchedulingConfig, RequestRouterConfig

from rayinfer.actors.rank import RankReplica
from rayinfer.actors.router import DecodeRouter, PrefillRouter, RankRouter
from rayinfer.config import AutoscalingConfig, EngineConfig, ServeConfig


# An idle rank should cost (almost) nothing. By default every replica flushes Serve's metrics
# cache each 100 ms and reports Ray task events each second; together that is most of an idle
# replica's CPU. Ranks run long-lived loops, so coarser reporting loses nothing useful.
QUIET_REPLICA_ENV = {"RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "5000", "RAY_task_events_report_interval_ms": "10000"}
DRAIN_S_FIXED = 5.0  # a fixed-size role's ranks only stop on shutdown or redeploy


def ingress_env(config: ServeConfig) -> dict:
    """The ingress's handles report the ranks' load to Serve's autoscaler (each 10 s by default): a few
    times per look-back window, so a role's scaling sees its load within the window it averages over."""
    windows = [config.role(r).autoscaling.look_back_s for r in config.roles if config.role(r).autoscaling]
    if not windows:
        return QUIET_REPLICA_ENV
    return dict(QUIET_REPLICA_ENV, RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S=str(min(10.0, min(windows) / 4)))


def rank_cpus(cpus_per_rank: float | None, gpu: bool) -> float:
    """A rank's CPU share: as configured, else a core per GPU rank and half a core per CPU rank."""
    return cpus_per_rank if cpus_per_rank is not None else (1.0 if gpu else 0.5)


SERVING_CORES = 2  # what the ingress and Serve's HTTP proxy keep busy under load (benchmarks/serve_path.py)


def rank_threads(cpus: float, ranks: int, gpu: bool) -> int:
    """A rank's torch intra-op threads: what its CPU share buys and, on CPU ranks, the cores the machine has
    beyond the serving path's, shared among all the app's ranks (a lone rank on a 16-core node: 14). On 2 cores
    there are none to spare: a second thread for a lone rank measured slower (1.5-1.6k tok/s against 1.3-2.7k,
    the rank's CPU per token 2.8x, its OpenMP workers spinning against the ingress and the proxy)."""
    share = max(1, int(cpus))
    return share if gpu else max(share, ((os.cpu_count() or 1) - SERVING_CORES) // max(1, ranks))


def rank_gang(config: EngineConfig, name: str, role: str = "mixed", num_gangs: int = 1,
              cpus_per_rank: float | None = None, router=RankRouter, stats_period_s: float = 2.0,
              kv_timeout_s: float = 10.0, autoscaling: AutoscalingConfig | None = None, threads: int | None = None):
    """A bound deployment of `num_gangs` gangs of `ep_size` rank replicas each, or of `autoscaling`'s
    min..max gangs starting from `num_gangs`; `threads`: each rank's torch threads (default: its CPU share)."""
    ep = config.parallel.ep_size
    gpu = config.device.startswith("cuda")
    cpus = rank_cpus(cpus_per_rank, gpu)
    actor = {"num_cpus": cpus, **({"num_gpus": 1} if gpu else {}), "runtime_env": {"env_vars": QUIET_REPLICA_ENV}}
    drain_s = autoscaling.drain_timeout_s if autoscaling else DRAIN_S_FIXED
    scale = dict(autoscaling_config=autoscaling.replicas(ep, num_gangs)) if autoscaling else dict(
        num_replicas=ep * num_gangs)
    options = dict(
        name=name, ray_actor_options=actor, **scale,
        max_ongoing_requests=4096,  # a rank batches many requests; its scheduler is the queue
        health_check_period_s=5.0, health_check_timeout_s=30.0,
        # Serve kills a stopping rank this long after asking it to stop, drained or not
        graceful_shutdown_timeout_s=drain_s, graceful_shutdown_wait_loop_s=0.5,
        request_router_config=RequestRouterConfig(request_router_class=router,
                                                  request_routing_stats_period_s=stats_period_s,
                                                  request_routing_stats_timeout_s=5.0),
        gang_scheduling_config=GangSchedulingConfig(
            gang_size=ep, runtime_failure_policy=GangRuntimeFailurePolicy.RESTART_GANG))
    threads = threads or max(1, int(cpus))
    return serve.deployment(RankReplica).options(**options).bind(config, role, threads, kv_timeout_s, drain_s)


def build_app(config: ServeConfig):
    """The whole serving application: the ingress bound to prefill + decode gangs, or to mixed gangs."""
    from rayinfer.actors.ingress import Ingress

    def gangs(role: str, router):
        r, engine = config.role(role), config.engine_config(role)
        gpu = engine.device.startswith("cuda")
        cpus = rank_cpus(config.cpus_per_rank, gpu)
        return rank_gang(engine, role, role=role, num_gangs=r.num_gangs,
                         cpus_per_rank=cpus, router=router, kv_timeout_s=config.kv_transfer_timeout_s,
                         autoscaling=r.autoscaling, threads=rank_threads(cpus, config.max_ranks, gpu))

    ingress = serve.deployment(Ingress).options(
        name="ingress", ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": ingress_env(config)}},
        max_ongoing_requests=max(1000, 2 * config.max_queue))
    if config.disaggregated:
        return ingress.bind(config, prefill=gangs("prefill", PrefillRouter), decode=gangs("decode", DecodeRouter))
    return ingress.bind(config, mixed=gangs("mixed", DecodeRouter))
