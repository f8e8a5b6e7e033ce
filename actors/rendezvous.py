"""Forming a gang's process group from inside its replicas' constructors.

Rank 0 opens a TCPStore on a socket it bound itself (TCPStore would otherwise listen on every
interface) and publishes "host:port" in Ray's internal KV under the gang id; the other ranks
poll for it. All joins carry an explicit timeout, so a gang whose member never arrives fails
its constructor instead of hanging. On one machine the store binds 127.0.0.1; across nodes it
binds the rank-0 node's Ray address.
"""
from __future__ import annotations

import os
import time

import ray
from ray.experimental import internal_kv

_NS = "rayinfer"


def node_address() -> str:
    return ray.util.get_node_ip_address()


def form_group(gang_id: str, rank: int, world: int, timeout_s: float, device: str = "cpu"):
    """-> (GangGroups: data and control groups, (store host, store port)); the store also serves the
    gang's doorbell."""
    from rayinfer.engine.rank import join_process_group, tcp_store

    key = f"pg/{gang_id}"
    addr = node_address()
    if addr in ("127.0.0.1", "localhost"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    if rank == 0:
        store, port = tcp_store(addr, 0, world, True, timeout_s)
        internal_kv._internal_kv_put(key, f"{addr}:{port}", overwrite=True, namespace=_NS)
    else:
        deadline = time.time() + timeout_s
        while not (value := internal_kv._internal_kv_get(key, namespace=_NS)):
            if time.time() > deadline:
                raise TimeoutError(f"gang {gang_id}: rank 0 did not publish its rendezvous within {timeout_s}s")
            time.sleep(0.05)
        host, port = value.decode().rsplit(":", 1)
        addr, port = host, int(port)
        store, _ = tcp_store(addr, port, world, False, timeout_s)
    groups = join_process_group(store, rank, world, timeout_s, device)
    if rank == 0:
        internal_kv._internal_kv_del(key, namespace=_NS)
    return groups, (addr, port)
