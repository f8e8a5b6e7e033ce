"""One device per rank, checked on a CPU: routing, load counting and step inputs stay on the rank's
device (`meta` standing in for CUDA under DeviceGuard), EPLB moves every slot tensor (FP8 scales
included), and a gang gets a device-backend data group plus a gloo control group."""
import socket

import pytest
import torch
import torch.multiprocessing as mp
from device_guard import DeviceGuard

from rayinfer.balance.placement import ExpertPlacement
from rayinfer.config import EngineConfig
from rayinfer.engine.ep import EPContext
from rayinfer.engine.eplb_live import move_experts, slot_tensors
from rayinfer.engine.model_runner import ModelRunner
from rayinfer.engine.sequence import Sequence
from rayinfer.kernels.dispatch import LocalDispatcher
from rayinfer.messages import SamplingParams
from rayinfer.model import load_model, resolve_model_path


def test_routing_and_load_counting_stay_on_the_device():
    placement = ExpertPlacement.initial([1, 2], num_logical=8, num_redundant=8, ep_size=1).to("meta")
    ctx = EPContext(0, placement, LocalDispatcher())
    x, topk, w = torch.empty(5, 16, device="meta"), torch.zeros(5, 2, dtype=torch.long, device="meta"), \
        torch.empty(5, 2, device="meta")
    with DeviceGuard() as guard:
        recv = ctx.dispatch_wait(ctx.dispatch_launch(2, x, topk, w))
        ctx.load.end_step()
    assert recv.slots.device.type == "meta" and ctx.load.sum.device.type == "meta"
    assert not guard.syncs()


def test_load_counts_only_this_ranks_slots():
    placement = ExpertPlacement.initial([1], num_logical=8, num_redundant=0, ep_size=2)  # rank 1: experts 4..7
    ctx = EPContext(1, placement, LocalDispatcher())
    slots = torch.tensor([[0, -1], [-1, 3], [3, 2], [-1, -1]])
    from rayinfer.kernels.dispatch import Received

    ctx.dispatcher.dispatch_wait = lambda handle: Received(torch.zeros(4, 2), slots, torch.ones(4, 2))
    ctx.dispatch_wait((1, None))
    ctx.load.end_step()
    assert ctx.load.sum[0].tolist() == [0, 0, 0, 0, 1, 0, 1, 2]


def test_step_inputs_are_built_on_the_runner_device():
    runner = ModelRunner(EngineConfig.from_options("tiny", kv_cache_tokens=256))
    runner.device = torch.device("meta")
    runner.kv_caches = [c.to("meta") for c in runner.kv_caches]
    seqs = [Sequence(str(i), list(range(5, 5 + n)), SamplingParams()) for i, n in enumerate((3, 70))]
    seqs[0].block_ids, seqs[1].block_ids = [0], [1, 2]
    with DeviceGuard():
        ids, batch = runner.prepare([(seqs[0], 0, 3), (seqs[1], 0, 70)])
    tensors = [ids, *[v for v in vars(batch).values() if isinstance(v, torch.Tensor)]]
    assert len(tensors) >= 4 and {t.device.type for t in tensors} == {"meta"}


def test_eplb_moves_fp8_scales_with_their_weights():
    layers = load_model("tiny").cfg.moe_layers
    old = ExpertPlacement.initial(layers, 16, 4, ep_size=4)  # rank 1 holds experts 5..9
    shard = load_model("tiny", local_experts=old.local_experts(1))
    for moe in shard.moe_layers:  # scales as the FP8 loader keeps them: one [S, blocks, blocks] tensor per weight
        ex = moe.experts
        ex.w13_scale = torch.tensor(ex.logical_ids, dtype=torch.float32).view(-1, 1, 1).expand(-1, 2, 3).clone()
        ex.w2_scale = ex.w13_scale[:, :1].clone() + 100
    assert set(slot_tensors(shard.moe_layers[0].experts)) == {"w13", "w2", "w13_scale", "w2_scale"}
    before = {e: shard.moe_layers[0].experts.w13[s].clone() for s, e in enumerate(shard.moe_layers[0].experts.logical_ids)}
    row = torch.arange(20) % 16
    row[5:10] = torch.tensor([9, 8, 7, 6, 5])  # rank 1: its own experts, reversed (no checkpoint read)
    new = ExpertPlacement.from_phy2log(layers, row.repeat(len(layers), 1), 16, 4)
    changed, local, ckpt = move_experts(shard, new, 1, resolve_model_path("tiny"))
    assert (changed, ckpt) == (4 * len(layers), 0)
    ex = shard.moe_layers[0].experts
    assert ex.logical_ids == [9, 8, 7, 6, 5]
    assert ex.w13_scale[:, 0, 0].tolist() == [9, 8, 7, 6, 5] and ex.w2_scale[:, 0, 0].tolist() == [109, 108, 107,
                                                                                                    106, 105]
    assert all(torch.equal(ex.w13[s], before[e]) for s, e in enumerate(ex.logical_ids))
    row[6], row[16] = 15, 8  # an expert from the checkpoint, whose reader gives no scales: a clear error, not unscaled weights
    with pytest.raises(ValueError, match="w13_scale"):
        move_experts(shard, ExpertPlacement.from_phy2log(layers, row.repeat(len(layers), 1), 16, 4), 1,
                     resolve_model_path("tiny"))


def _gang_rank(rank, port, out):
    from rayinfer.engine.rank import init_process_group
    from rayinfer.kernels.dispatch import AllToAllDispatcher
    import torch.distributed as dist

    groups = init_process_group(rank, 2, "127.0.0.1", port, 60.0)
    flags = torch.tensor([float(rank + 1)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=groups.control)
    d = AllToAllDispatcher(groups.data, rank, 2, slots_per_rank=2)
    g = torch.Generator().manual_seed(rank)
    x, slots = torch.randn(6, 4, generator=g), torch.randint(0, 4, (6, 2), generator=g)
    handle = d.dispatch_launch(x, slots, torch.ones(6, 2))
    recv = d.dispatch_wait(handle)
    # each receiving rank returns the token times its number of local choices: the sum is 2x
    y = d.combine_wait(d.combine_launch(recv.x * (recv.slots >= 0).sum(1, keepdim=True), handle))
    out[rank] = (dist.get_backend(groups.control), groups.control is not groups.data, float(flags),
                 torch.allclose(y, x * 2))
    dist.destroy_process_group()


def test_a_gang_has_a_data_group_and_a_gloo_control_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_gang_rank, args=(port, out), nprocs=2, start_method="spawn")
    assert dict(out) == {0: ("gloo", True, 2.0, True), 1: ("gloo", True, 2.0, True)}
