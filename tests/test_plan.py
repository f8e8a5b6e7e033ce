"""`rayinfer plan`: DeepSeek-V3's per-rank figures from config.json alone, through the loader's own meta build."""
import json
import os

import pytest
import torch

from rayinfer.cli import main
from rayinfer.config import ServeConfig
from rayinfer.model import load_model
from rayinfer.model.build import weight_bytes
from rayinfer.model.loader import rank_model
from rayinfer.plan import plan

V3 = os.path.join(os.path.dirname(__file__), "fixtures", "deepseek_v3")
EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "serve_config.yaml")


def test_v3_example_topology_figures(capsys):
    assert main(["plan", "--config", EXAMPLE, "--model", V3, "--json", "--gpu-memory", "80GiB"]) == 0
    rows = {r["role"]: r for r in json.loads(capsys.readouterr().out)}
    pre, dec = rows["prefill"], rows["decode"]
    assert (pre["ranks"], pre["expert_slots_per_rank"], dec["ranks"], dec["expert_slots_per_rank"]) == (16, 18, 32, 9)
    # FP8 weights, bf16 embeddings/head/router, no MTP: DeepSeek's published per-GPU figures
    assert abs(pre["weight_bytes_per_rank"] / 65.0e9 - 1) <= 0.03, pre["weight_bytes_per_rank"]
    assert abs(dec["weight_bytes_per_rank"] / 42.1e9 - 1) <= 0.03, dec["weight_bytes_per_rank"]
    # 8 GiB of 61 x 576 bf16 latents per token, in whole 64-token pages (the engine rounds the last one up)
    per_token = 61 * 576 * 2
    assert pre["kv_tokens_per_rank"] == -(-(8 * 2**30 // per_token) // 64) * 64 == dec["kv_tokens_per_rank"]
    assert pre["kv_bytes_per_rank"] == pre["kv_tokens_per_rank"] * per_token
    assert pre["fits"] is True and dec["fits"] is True
    assert pre["total_bytes"] == pre["weight_bytes_per_rank"] + pre["kv_bytes_per_rank"] + pre["activation_bytes"]


def test_v3_on_cpu_counts_dequantised_weights_and_small_gpu_does_not_fit(capsys):
    serve = ServeConfig.from_file(EXAMPLE, model=V3, device="cpu")
    pre = plan(serve, gpu_memory=80 * 2**30)[0]
    assert pre.weight_bytes_per_rank > 1.9 * 65.0e9 and pre.fits is False  # bf16 everywhere: ~2x
    assert main(["plan", "--config", EXAMPLE, "--model", V3, "--gpu-memory", "40GiB"]) == 0
    table = capsys.readouterr().out
    assert "prefill" in table and "NO" in table and "65.1 GB" in table
    assert main(["plan", "--model", V3, "--gpu-memory", "lots"]) == 2
    assert "'lots'" in capsys.readouterr().err


def test_plan_bytes_equal_what_the_loader_materialises():
    """The planner and the loader share one build: a loaded rank holds exactly the planned bytes."""
    subset = {layer: [0, 1, 0] for layer in range(8)}
    for dtype in (torch.float32, torch.bfloat16):
        planned = rank_model(load_model("tiny").checkpoint_path, dtype, "cpu", subset)
        loaded = load_model("tiny", dtype=dtype, local_experts=subset)
        assert {p.device.type for p in planned.parameters()} == {"meta"}
        # the preset stores its router in fp32, which the loader keeps (as transformers does)
        router_extra = sum(m.gate.weight.numel() * (4 - dtype.itemsize) for m in loaded.moe_layers)
        assert weight_bytes(loaded) == weight_bytes(planned) + router_extra


@pytest.mark.parametrize("ep,redundant", [(3, 0)])
def test_uneven_slots_name_the_values(ep, redundant):
    serve = ServeConfig.from_dict({"prefill": {"ep_size": ep, "num_redundant_experts": redundant}}, model=V3)
    with pytest.raises(ValueError, match=f"ep_size={ep}"):
        plan(serve)


def test_a_drafting_role_plans_the_mtp_module_and_its_cache():
    roles = {"prefill": {"ep_size": 1}, "decode": {"ep_size": 1}}
    plain = {r.role: r for r in plan(ServeConfig.from_dict(roles, model=V3))}
    roles["decode"]["num_speculative_tokens"] = 2
    spec = {r.role: r for r in plan(ServeConfig.from_dict(roles, model=V3))}
    assert spec["prefill"] == plain["prefill"]  # a prefill rank never drafts
    d, p = spec["decode"], plain["decode"]
    assert d.weight_bytes_per_rank > p.weight_bytes_per_rank  # layer 61: a full MoE block and its norms/projection
    per_layer = 576 * 4  # a token's fp32 latent in one layer
    assert (d.kv_bytes_per_rank / d.kv_tokens_per_rank, p.kv_bytes_per_rank / p.kv_tokens_per_rank) == \
        (62 * per_layer, 61 * per_layer)
