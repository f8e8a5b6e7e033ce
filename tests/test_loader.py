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
    model = load_model("tiny")
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
