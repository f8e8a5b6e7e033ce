"""Checkpoint loading: layouts, FP8, expert subsets that never read other experts, MTP, clear errors."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import hf_checkpoint
from rayinfer.model import CheckpointError, DeepseekV3, ForwardBatch, load_model, load_weights, resolve_model_path
from rayinfer.model.presets import PRESETS


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt"))
    hf_checkpoint(path, n_routed_experts=8, n_group=2, topk_group=1)
    return path


def _reshard(src, dst, indexed: bool):
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({k: tensors[k] for k in part}, os.path.join(dst, file))
    if indexed:
        with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": {k: f for f, part in halves.items() for k in part}}, f)


@pytest.mark.parametrize("indexed", [True, False])
def test_sharded_layouts_load_identically(ckpt, tmp_path, indexed):
    _reshard(ckpt, str(tmp_path / "s"), indexed)
    ids = torch.randint(2, 200, (2, 9))
    with torch.no_grad():
        assert torch.equal(load_model(ckpt)(ids), load_model(str(tmp_path / "s"))(ids))


def test_expert_subset_reads_only_its_experts(ckpt):
    from rayinfer.config import ModelConfig

    cfg = ModelConfig.from_file(ckpt)
    cfg = type(cfg)(**{**cfg.__dict__, "num_nextn_predict_layers": 0})
    subset = {layer: [6, 1, 6] for layer in cfg.moe_layers}  # a redundant replica of expert 6 too
    model = DeepseekV3(cfg, subset)
    report = load_weights(model, ckpt)
    experts_read = {k.split(".experts.")[1].split(".")[0] for k in report.read_keys if ".experts." in k}
    assert experts_read == {"1", "6"}
    full = load_model(ckpt)
    for layer in cfg.moe_layers:
        got, want = model.layers[layer].mlp.experts, full.layers[layer].mlp.experts
        assert torch.equal(got.w13[0], want.w13[6]) and torch.equal(got.w13[2], want.w13[6])
        assert torch.equal(got.w2[1], want.w2[1])


def test_missing_and_unexpected_tensors_are_listed(ckpt, tmp_path):
    tensors = load_file(os.path.join(ckpt, "model.safetensors"))
    dropped = "model.layers.1.mlp.experts.3.up_proj.weight"
    del tensors[dropped], tensors["model.norm.weight"]
    tensors["model.layers.1.mlp.mystery.weight"] = torch.zeros(2)
    os.makedirs(tmp_path / "bad")
    shutil.copy(os.path.join(ckpt, "config.json"), tmp_path / "bad")
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_model(str(tmp_path / "bad"))
    msg = str(e.value)
    assert "model.norm.weight" in msg and "layer 1 expert 3 up_proj" in msg and "model.layers.1.mlp.mystery.weight" in msg


def test_shape_mismatch_names_tensor(ckpt, tmp_path):
    os.makedirs(tmp_path / "c")
    shutil.copy(os.path.join(ckpt, "model.safetensors"), tmp_path / "c")
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = json.load(f)
    with open(tmp_path / "c" / "config.json", "w") as f:
        json.dump(dict(cfg, vocab_size=cfg["vocab_size"] + 64), f)
    with pytest.raises(CheckpointError, match=r"has shape \(256, 64\), the config implies \(320, 64\)"):
        load_model(str(tmp_path / "c"))


def test_no_weights_and_unknown_model_errors(tmp_path):
    with pytest.raises(ValueError, match="no-such-model"):
        load_model("no-such-model")
    shutil.copy(os.path.join(resolve_model_path("tiny"), "config.json"), tmp_path)
    with pytest.raises(CheckpointError, match="no .safetensors"):
        load_model(str(tmp_path))


def test_preset_has_mtp_and_tokenizer_and_loads_without_tokenizer(tmp_path):
    path = resolve_model_path("tiny")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(path))
    assert len(load_model("tiny").mtp) == 0  # not loaded unless asked: nothing runs it yet
    model = load_model("tiny", mtp=True)
    assert len(model.mtp) == PRESETS["tiny"]["num_nextn_predict_layers"] == 1
    n = model.cfg.num_hidden_layers
    raw = load_file(os.path.join(path, "model.safetensors"))
    assert torch.equal(model.mtp[0].eh_proj.weight, raw[f"model.layers.{n}.eh_proj.weight"])
    assert torch.equal(model.mtp[0].shared_head.head.weight, raw[f"model.layers.{n}.shared_head.head.weight"])
    ids = torch.tensor([5, 6, 7, 8])
    batch = ForwardBatch.dense(1, 4)
    with torch.no_grad():
        hidden = model.hidden_states(ids, batch)
        logits, h2 = model.mtp[0].predict(hidden, model.embed_tokens(torch.tensor([6, 7, 8, 9])), batch)
    assert logits.shape == (4, model.cfg.vocab_size) and torch.isfinite(logits).all()
    # a checkpoint directory with weights and config only (no tokenizer files) still loads
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(path, f), tmp_path)
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path))(ids[None]), model(ids[None]))


def test_fp8_kept_for_every_linear_and_expert_and_redundant_slots_read_once(tmp_path):
    """keep_fp8: attention, dense/shared MLPs and routed experts stay e4m3 + scale; one read serves every replica."""
    from helpers import quantize_checkpoint_fp8
    from rayinfer.config import ModelConfig

    src, dst, deq = str(tmp_path / "o"), str(tmp_path / "f"), str(tmp_path / "d")
    hf_checkpoint(src, hidden_size=128, moe_intermediate_size=128, intermediate_size=256, q_lora_rank=128,
                  kv_lora_rank=128, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8, n_group=2, topk_group=1)
    quantize_checkpoint_fp8(src, dst, deq)
    cfg = ModelConfig.from_file(dst)
    subset = {layer: [3, 5, 3] for layer in cfg.moe_layers}
    model = load_model(dst, keep_fp8=True, local_experts=subset)
    moe = model.layers[cfg.moe_layers[0]].mlp
    kept = {n for n, p in model.named_parameters() if p.dtype == torch.float8_e4m3fn}
    pre = f"layers.{cfg.moe_layers[0]}.mlp."
    assert {pre + "experts.w13", pre + "experts.w2", pre + "shared_experts.down_proj.weight",
            "layers.0.self_attn.kv_a_proj_with_mqa.weight", "layers.0.self_attn.q_a_proj.weight"} <= kept
    assert model.embed_tokens.weight.dtype == model.lm_head.weight.dtype == torch.float32 and moe.gate.weight.dtype == torch.float32
    assert moe.shared_experts.down_proj.weight_scale_inv.shape == (1, 1)
    raw = load_file(os.path.join(dst, "model.safetensors"))
    key = f"model.layers.{cfg.moe_layers[0]}.mlp.experts.3.up_proj.weight"
    assert torch.equal(moe.experts.w13[2, 128:].view(torch.uint8), raw[key].view(torch.uint8))
    assert torch.equal(moe.experts.w13_scale[0, 1], raw[key + "_scale_inv"][0])
    # replicas of expert 3 cost no extra read: bytes read equal the keys read, each counted once
    report = load_weights(model, dst)
    sizes = {k: raw[k].numel() * raw[k].element_size() for k in raw}
    assert report.bytes_read == sum(sizes[k] for k in report.read_keys)
    # what live EPLB reads for a slot it did not hold: FP8 bytes with their scales, in the slots' layout
    from rayinfer.model.loader import read_experts
    w13, w2, s13, s2 = read_experts(dst, [(cfg.moe_layers[0], 3)], torch.float8_e4m3fn)[(cfg.moe_layers[0], 3)]
    assert torch.equal(w13.view(torch.uint8), moe.experts.w13[0].view(torch.uint8))
    assert torch.equal(s13, moe.experts.w13_scale[0]) and torch.equal(s2, moe.experts.w2_scale[0])
    # on CPU by default the same checkpoint is dequantised, and both give the same logits
    plain, fp8_all = load_model(dst), load_model(dst, keep_fp8=True)
    assert not any(p.dtype == torch.float8_e4m3fn for p in plain.parameters())
    ids = torch.randint(2, 200, (2, 9))
    with torch.no_grad():
        assert (plain(ids) - fp8_all(ids)).abs().max() <= 1e-4


def test_bf16_load_builds_on_meta_in_final_dtype_and_keeps_rope_fp32(monkeypatch):
    """No fp32 model is ever allocated for a bf16 load, and the rope tables stay fp32 (YaRN needs them)."""
    import rayinfer.model.loader as loader

    seen = []
    real = loader.meta_model

    def spy(*a, **k):
        m = real(*a, **k)
        seen.append({p.device.type for p in m.parameters()})
        return m

    monkeypatch.setattr(loader, "meta_model", spy)
    model = load_model("tiny", dtype=torch.bfloat16)
    assert seen and all(s == {"meta"} for s in seen)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    routing = ("e_score_correction_bias", "gate.weight")  # fp32 as stored, as transformers keeps them
    assert {d for n, d in dtypes.items() if not n.endswith(routing)} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if n.endswith(routing)} == {torch.float32}
    assert model.rotary.inv_freq.dtype == torch.float32
