"""Building one rank of an expert-parallel gang: process group, expert shard, engine.

Plain Python + torch.distributed, no Ray: the rank actor (actors/rank.py) is a thin shell over
`build_rank_engine`, and tests run gangs as plain processes too. A rank loads the non-expert
weights and only the experts in its slots, and gets an `EPContext` wired to an all-to-all
dispatcher over its gang's process group.

A gang has two groups: `data`, on the device's backend (NCCL on GPUs, gloo on CPU), carries
tensors that live on the device (MoE dispatch/combine); `control`, always gloo, carries small
host-side decisions (lockstep votes, microbatch counts, EPLB statistics and placements), so
they never cost a device sync or a host-to-device copy. The code is the same on CPU and GPU.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from rayinfer.balance.placement import ExpertPlacement
from rayinfer.config import EngineConfig, ModelConfig
from rayinfer.engine.engine import Engine
from rayinfer.engine.ep import EPContext
from rayinfer.engine.model_runner import ModelRunner
from rayinfer.kernels.dispatch import make_dispatcher
from rayinfer.model import load_model, resolve_model_path


_listeners: list[socket.socket] = []  # a master store's listening socket must outlive it


def tcp_store(addr: str, port: int, world: int, is_master: bool, timeout_s: float):
    """A TCPStore whose master listens on `addr` only (left alone, it listens on every interface).
    Returns (store, port): port 0 on the master picks a free one."""
    timeout = timedelta(seconds=timeout_s)
    if not is_master:
        return dist.TCPStore(addr, port, world, is_master=False, timeout=timeout), port
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, port))
    sock.listen(256)
    _listeners.append(sock)
    port = sock.getsockname()[1]
    return dist.TCPStore(addr, port, world, is_master=True, timeout=timeout, wait_for_workers=False,
                         master_listen_fd=sock.fileno()), port


def init_process_group(rank: int, world: int, addr: str, port: int, timeout_s: float, device: str = "cpu"):
    """Joins a process group by TCP address (tests and plain multi-process runs)."""
    if addr in ("127.0.0.1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store, _ = tcp_store(addr, port, world, rank == 0, timeout_s)
    return join_process_group(store, rank, world, timeout_s, device)


@dataclass(frozen=True)
class GangGroups:
    data: object  # device backend: tensors on the rank's device
    control: object  # gloo: host tensors


def join_process_group(store, rank: int, world: int, timeout_s: float, device: str = "cpu") -> GangGroups:
    """Both groups of the gang; every collective on them times out after `timeout_s`."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout)  # collective: every rank, same order
    dist.barrier(group=control)
    return GangGroups(dist.group.WORLD, control)


def moe_layers_with_mtp(cfg: ModelConfig) -> list[int]:
    n = cfg.num_hidden_layers
    return cfg.moe_layers + ([n + k for k in range(cfg.num_nextn_predict_layers)] if cfg.n_routed_experts else [])


def initial_placement(config: EngineConfig) -> ExpertPlacement:
    cfg = ModelConfig.from_file(resolve_model_path(config.model))
    return ExpertPlacement.initial(moe_layers_with_mtp(cfg), cfg.n_routed_experts,
                                   config.parallel.num_redundant_experts, config.parallel.ep_size)


def build_rank_engine(config: EngineConfig, rank: int, groups: GangGroups) -> Engine:
    placement = initial_placement(config)
    dtype = getattr(torch, config.dtype)
    model = load_model(config.model, dtype, config.device, local_experts=placement.local_experts(rank))
    dispatcher = make_dispatcher(groups.data, rank, placement.ep_size, placement.slots_per_rank,
                                 model.cfg.hidden_size, config.device, config.scheduler.max_num_batched_tokens,
                                 config.scheduler.max_num_seqs if config.scheduler.mode == "decode" else 0,
                                 model.cfg.num_experts_per_tok)
    ctx = EPContext(rank, placement.to(config.device), dispatcher, overlap=config.parallel.enable_overlap,
                    decode_split=config.scheduler.mode == "decode", control=groups.control,
                    overlap_min_tokens=config.parallel.overlap_min_tokens,
                    window_steps=config.parallel.eplb_window_steps)
    return Engine(config, ModelRunner(config, model, ctx))
