"""Running the serving application: `rayinfer serve` starts (or joins) Ray, deploys, waits, tears down.

On one machine Ray is started with every listener on 127.0.0.1 and enough logical CPUs for the
topology (ranks take fractions of the real cores). With `address`, the running cluster is joined
and only the application is added to it and removed from it.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time

from rayinfer.actors.cluster import ensure_ray, ensure_serve
from rayinfer.config import ConfigError, ServeConfig
from rayinfer.config.serve import ROLES

APP_NAME = "rayinfer"


def check_port_free(host: str, port: int) -> None:
    """Serve's proxy shares a busy port (SO_REUSEPORT) instead of failing: a second server on the
    same port would silently split traffic with the first, so refuse to start instead."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror} (is another server running?)") from e


def start(config: ServeConfig, address: str | None = None) -> tuple[str, bool]:
    """Deploys the application; returns (base URL, whether a local Ray cluster was started here)."""
    from ray import serve

    if address is None:
        check_port_free(config.host, config.port)
    if config.disk_cache_dir is not None:  # fail here, not in every rank's constructor
        from rayinfer.engine.disk_cache import check_writable

        check_writable(config.disk_cache_dir)
    from rayinfer.actors.deployments import build_app

    cpus = config.cpus_per_rank or 0.5
    needed = int(config.num_ranks * cpus + 2) + 1  # ranks + ingress + Serve's own actors
    started = ensure_ray(address, num_cpus=None if address else max(os.cpu_count() or 1, needed))
    ensure_serve(config.host, config.port)
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    return f"http://{config.host}:{config.port}", started


def stop(started_ray: bool) -> None:
    import ray
    from ray import serve

    try:
        serve.delete(APP_NAME)
        if started_ray:
            serve.shutdown()
    finally:
        if started_ray:
            ray.shutdown()


def rebalance(address: str | None = "auto", timeout_s: float = 300.0) -> dict[str, list[dict]]:
    """Asks every expert-parallel gang of the running application to re-place its experts now.

    -> {deployment: one record per gang (what rank 0 reports: imbalance before, slots changed...)}.
    Every rank of a gang gets the call (the gang acts once, between two steps, when any asks)."""
    from ray import serve

    ensure_ray(address)
    try:
        app = serve.status().applications[APP_NAME]
    except KeyError:
        raise ConfigError(f"no {APP_NAME!r} application is running on this Ray cluster") from None
    out = {}
    for name in sorted(app.deployments):
        if name not in ROLES:
            continue
        results = serve.get_deployment_handle(name, app_name=APP_NAME).broadcast(
            "rebalance", timeout_s=timeout_s).results(timeout_s=timeout_s + 30)
        out[name] = sorted((r for r in results if r["rank"] == 0), key=lambda r: r["gang_id"])
    if not out:
        raise ConfigError("the running application has no expert-parallel rank deployments")
    return out


def serve_forever(config: ServeConfig, address: str | None = None, ready=print) -> None:
    t0 = time.time()
    url, started = start(config, address)
    topology = (f"prefill {config.prefill.num_gangs}x{config.prefill.ep_size} ranks, "
                f"decode {config.decode.num_gangs}x{config.decode.ep_size} ranks" if config.disaggregated
                else f"colocated {config.mixed.num_gangs}x{config.mixed.ep_size} ranks")
    ready(f"rayinfer: serving {config.model_name!r} ({topology}) at {url}/v1 "
          f"(ready in {time.time() - t0:.0f}s; Ctrl-C to stop)")
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    ready("rayinfer: shutting down")
    stop(started)
