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
    needed = int(config.max_ranks * cpus + 2) + 1  # ranks (autoscaled roles at their max) + ingress + Serve's actors
    started = ensure_ray(address, num_cpus=None if address else max(os.cpu_count() or 1, needed))
    ensure_serve(config.host, config.port)
    try:
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    except RuntimeError as e:  # Ray's message names the deployments only; the cause is in their status
        details = _deployment_errors()
        stop(started)
        raise RuntimeError(f"the {APP_NAME!r} application failed to start:\n{details}" if details else str(e)) from e
    except KeyboardInterrupt:  # Ctrl-C while deploying: take down what was started, as after start
        stop(started)
        raise
    return f"http://{config.host}:{config.port}", started


def _deployment_errors() -> str:
    """What each failed deployment's replicas reported (their import or constructor error)."""
    from ray import serve

    try:
        app = serve.status().applications[APP_NAME]
    except Exception:  # noqa: BLE001 - a controller that cannot say leaves Ray's own message
        return ""
    lines = [f"  deployment {name!r} ({d.status}): {d.message.strip()}" for name, d in app.deployments.items()
             if d.message and str(d.status).upper().rsplit(".", 1)[-1] != "HEALTHY"]
    return "\n".join(lines) or (app.message or "").strip()


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


def _check_reachable(address: str | None, timeout_s: float) -> None:
    """Refuses, within `timeout_s`, a cluster that is not there (Ray itself retries for minutes)."""
    import ray

    if address is None or ray.is_initialized():
        return
    if address == "auto":
        from ray._private import services

        found = sorted(services.find_gcs_addresses())
        if not found:
            raise ConnectionError("no running Ray cluster found on this machine (is `rayinfer serve` running? "
                                  "otherwise pass --address HOST:PORT)")
        if len(found) > 1:
            raise ConnectionError(f"several Ray clusters run on this machine ({', '.join(found)}): "
                                  "pick one with --address HOST:PORT")
        address = found[0]
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise ConnectionError(f"cannot reach the Ray cluster at {address!r} within {timeout_s:g}s: {e}") from None


def rebalance(address: str | None = "auto", timeout_s: float = 300.0,
              connect_timeout_s: float = 20.0) -> dict[str, list[dict]]:
    """Asks every expert-parallel gang of the running application to re-place its experts now.

    -> {deployment: one record per gang (what rank 0 reports: imbalance before, slots changed...)}.
    Every rank of a gang gets the call (the gang acts once, between two steps, when any asks)."""
    from ray import serve

    _check_reachable(address, connect_timeout_s)
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
    import ipaddress
    import sys

    t0 = time.time()
    try:
        loopback = config.host == "localhost" or ipaddress.ip_address(config.host).is_loopback
    except ValueError:  # a host name: it may face the network
        loopback = False
    if not config.api_keys and not loopback:
        print(f"rayinfer: warning: listening on {config.host} without an API key: anyone who reaches port "
              f"{config.port} can use this server (set --api-key or RAYINFER_API_KEY)", file=sys.stderr, flush=True)
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
