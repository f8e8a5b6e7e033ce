"""One decode forward (single rank, paged cache) holds no host synchronisation, creates no host tensor, and runs
the same aten operations whatever the batch size or the number of experts: what a CUDA graph of it needs.

Observed on CPU with `device_guard.DeviceGuard`, which also sees what a dispatch mode alone cannot: the host's
reads of tensor values (`tolist()` reaches no aten op on a CPU tensor) and the inside of the opaque
`rayinfer::grouped_ffn` op. The CUDA formulation of the grouped expert FFN (`torch._grouped_mm`, which runs on CPU
too) must show nothing; the host-offsets formulation (CPU, and CUDA without bf16 on sm90) must show exactly its
one documented read of the slot offsets per MoE layer: the reason CUDA graphs refuse it.
"""
from __future__ import annotations

import collections

import pytest
import torch

import rayinfer.model.moe as moe_mod
from device_guard import DeviceGuard
from helpers import PagedCache
from rayinfer.config import ModelConfig
from rayinfer.engine.cuda_graphs import HOST_INPUT, HOST_SYNCING
from rayinfer.model import DeepseekV3
from rayinfer.model.presets import PRESETS, init_random_weights

aten = torch.ops.aten
SYNCING = HOST_SYNCING  # ops that make the host wait for the device (shared with the graph tape)
SORTED_FFN = moe_mod.sorted_ffn


class OpLog(DeviceGuard):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.bool_index = 0  # indexing by a boolean mask: a hidden nonzero

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket] += 1
        if func.overloadpacket in (aten.index, aten.index_put, aten.index_put_):
            idx = args[1] if len(args) > 1 else []
            self.bool_index += any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx or [])
        return super().__torch_dispatch__(func, types, args, kwargs)


def _model(experts: int) -> DeepseekV3:
    cfg = ModelConfig.from_dict(dict(PRESETS["tiny"], n_routed_experts=experts))
    model = DeepseekV3(cfg)
    init_random_weights(model, seed=0)
    return model.eval()


def _decode_ops(model: DeepseekV3, seqs: int, backend: str | None, monkeypatch) -> OpLog:
    """Prefills `seqs` prompts of different lengths, then logs the ops of one decode forward over all of them."""
    monkeypatch.setattr(moe_mod, "sorted_ffn", lambda *a, **k: SORTED_FFN(*a, **k, backend=backend))
    lens = [5 + 3 * i for i in range(seqs)]
    cache = PagedCache(model, [n + 2 for n in lens])
    g = torch.Generator().manual_seed(seqs)
    every = list(range(seqs))
    with torch.inference_mode():
        prompts = [torch.randint(5, 300, (n,), generator=g) for n in lens]
        model.hidden_states(torch.cat(prompts), cache.batch(every, [0] * seqs, lens))
        # A first decode step warms what is built once per model (the absorbed MLA weights), as a graph capture would.
        model.hidden_states(torch.randint(5, 300, (seqs,), generator=g), cache.batch(every, lens, [1] * seqs))
        ids = torch.randint(5, 300, (seqs,), generator=g)
        batch = cache.batch(every, [n + 1 for n in lens], [1] * seqs)  # built once per step, outside the forward
        log = OpLog()
        with log:
            hidden = model.hidden_states(ids, batch)
    assert hidden.shape == (seqs, model.cfg.hidden_size) and torch.isfinite(hidden).all()
    return log


def test_decode_forward_has_no_host_sync_and_fixed_launches(monkeypatch):
    model8, model16 = _model(8), _model(16)
    logs = {(e, b): _decode_ops(m, b, "grouped_mm", monkeypatch)
            for e, m in ((8, model8), (16, model16)) for b in (2, 8)}
    logs[(16, 16)] = _decode_ops(model16, 16, "grouped_mm", monkeypatch)
    for key, log in logs.items():
        syncing = log.syncs()
        host = {str(op): n for op, n in log.counts.items() if op in HOST_INPUT}
        assert not syncing and not log.bool_index, f"{key}: syncing ops {syncing}, boolean indexing {log.bool_index}"
        assert not host, f"{key}: host tensors made inside the forward {host}"
    base = logs[(16, 8)].counts
    for key, log in logs.items():
        diff = {str(op): (log.counts[op], base[op]) for op in set(log.counts) | set(base) if log.counts[op] != base[op]}
        assert not diff, f"(experts, sequences) {key} vs (16, 8): op counts differ {diff}"
    assert sum(base.values()) > 50 and base[aten.mm] + base[aten.bmm] + base[aten.addmm] > 0  # the log saw the work


def test_the_opaque_host_offsets_op_is_seen_through(monkeypatch):
    """The host formulation runs as one opaque op; inside it the slot offsets are read on the host, once per MoE
    layer. A log that cannot see into the op (or cannot see `tolist`) reports no sync here: the defect this pins."""
    model = _model(8)
    log = _decode_ops(model, 4, None, monkeypatch)
    layers = len(model.cfg.moe_layers)  # the main stack's (an MTP block is not in this forward)
    assert log.host.opened == {"rayinfer.grouped_ffn": layers}
    assert log.host.reads["tolist"] == layers and "Tensor.tolist" in log.syncs()
