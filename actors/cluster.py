"""Starting or joining Ray and Serve the way rayinfer needs them.

On one machine (no address given) Ray is started with every listener on 127.0.0.1: the node
address, the Serve HTTP proxy, the gloo sockets, and the replicas' inter-deployment gRPC server
(which Ray Serve would otherwise bind on all interfaces). With an address, the running cluster
is joined as it is.
"""
from __future__ import annotations

import os

import ray

LOOPBACK = "127.0.0.1"
# What rank processes of a single-machine cluster need: gloo on loopback, replica gRPC kept there.
LOOPBACK_ENV = {"GLOO_SOCKET_IFNAME": "lo", "RAYINFER_LOCAL_CLUSTER": "1"}


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on right now at `host`."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _local_loopback_cluster(address: str) -> str | None:
    """The GCS address when `address` ('auto' or host:port) names a cluster on this machine's loopback."""
    from ray._private import services

    if address == "auto":
        found = services.find_gcs_addresses()
        if len(found) != 1:
            return None
        address = next(iter(found))
    host = address.rsplit(":", 1)[0]
    return address if host in (LOOPBACK, "localhost") else None


def _as_loopback_node() -> None:
    """This process and the ones Ray starts from it keep 127.0.0.1 as their node address.

    Ray reads the flag once, at import: set it for the processes Ray starts and for this one, or
    Ray turns 127.0.0.1 back into the machine's external address."""
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    for name, value in LOOPBACK_ENV.items():
        os.environ.setdefault(name, value)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Initialises Ray unless it already is; returns True when this call started a local cluster.

    A cluster joined on this machine's loopback (one `rayinfer serve` started) is joined as a
    loopback node too, so nothing is looked for on the external address."""
    if ray.is_initialized():
        return False
    if address is None:
        _as_loopback_node()
        # Metrics reach the agent every second instead of every ten, so /metrics is close to live.
        ray.init(_node_ip_address=LOOPBACK, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": dict(LOOPBACK_ENV)}, _system_config={"metrics_report_interval_ms": 1000})
        return True
    local = _local_loopback_cluster(address)
    if local is not None:
        _as_loopback_node()
        # Ray picks up a local cluster's auth token (which it enables by default) only for "auto".
        ray.init(address="auto" if address == "auto" else local, _node_ip_address=LOOPBACK, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    return False


def ensure_serve(host: str = LOOPBACK, port: int = 8000, http: bool = True) -> None:
    import time

    import ray
    from ray import serve

    for attempt in range(3):
        try:
            if http:
                serve.start(http_options={"host": host, "port": port})
            else:
                serve.start(proxy_location="Disabled")
            return
        except ray.exceptions.ActorDiedError:  # a controller `serve.shutdown()` just stopped is still going away
            if attempt == 2:
                raise
            time.sleep(2.0)


def bind_replica_grpc_to_loopback() -> None:
    """Serve replicas open an inter-deployment gRPC server on [::]; on a local cluster keep it on 127.0.0.1.

    Must run in a replica's constructor (before Serve starts that server)."""
    if os.environ.get("RAYINFER_LOCAL_CLUSTER") != "1":
        return
    import ray.serve._private.replica as replica_mod
    from ray._common.tls_utils import add_port_to_grpc_server

    replica_mod.add_port_to_grpc_server = lambda server, addr: add_port_to_grpc_server(
        server, addr.replace("[::]", LOOPBACK))
