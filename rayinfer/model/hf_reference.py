"""Random DeepseekV3ForCausalLM checkpoints written by transformers: the reference that the parity tests and
`benchmarks/gpu_check.py` compare the model against. transformers (a dev dependency) is imported when called."""
from __future__ import annotations

import torch

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, n_group=2,
            topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=512,
            routed_scaling_factor=2.5, bos_token_id=0, eos_token_id=1)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}


def hf_checkpoint(path: str, seed: int = 0, **overrides):
    """Builds a random DeepseekV3ForCausalLM with transformers, saves it with save_pretrained; returns the model."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    kw = dict(BASE, **overrides)
    kw.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0})
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**kw)).eval()
    with torch.no_grad():
        # O(1) activations everywhere, so every component (and any bug in it) shows in the logits.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            elif name.endswith("gate.weight"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape) * 0.1)
    model.save_pretrained(path)
    return model


# Checkpoint shapes the parity checks cover: YaRN and plain RoPE, 1-4 expert groups, 1-2 shared experts,
# 0-2 dense layers, with and without the q LoRA, interleaved and half rope layouts.
PARITY_CONFIGS = {
    "yarn-groups-1dense": dict(rope_parameters=YARN, n_group=2, topk_group=1, first_k_dense_replace=1),
    "plain-4groups-2shared": dict(n_group=4, topk_group=2, n_routed_experts=16, num_experts_per_tok=3,
                                  n_shared_experts=2, first_k_dense_replace=0),
    "yarn-noqlora-halfrope-2dense": dict(rope_parameters=dict(YARN, factor=8.0), q_lora_rank=None, n_group=1,
                                         topk_group=1, first_k_dense_replace=2, num_hidden_layers=4,
                                         rope_interleave=False),
}
