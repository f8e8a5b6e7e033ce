"""Built-in model presets, materialised on first use as real Hugging Face checkpoint directories.

`tiny` (tests: loads in well under a second), `small` (benchmarks: ~115M parameters) and `v3mla`
(benchmarks against vLLM on DeepSeek-V3's own MLA widths, kv_lora 512 + rope 64, q/k/v heads
128 + 64 / 128; ~163M parameters) are DeepSeek-V3-architecture configs with seeded random weights,
a byte-level tokenizer built with `tokenizers`, and a tokenizer_config.json carrying a DeepSeek-style
chat template. They go through the same loader as any downloaded checkpoint. The directory lives under
$RAYINFER_CACHE_DIR (default ~/.cache/rayinfer) and is written atomically, so concurrent ranks
materialising the same preset never see a half-written one.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file

from rayinfer.config import ModelConfig
from rayinfer.tokenizer import DEEPSEEK_CHAT_TEMPLATE

REVISION = "r2"  # bump when preset weights or files change, so stale caches are not reused
BOS, EOS, PAD, USER, ASSISTANT = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>",
                                  "<｜User｜>", "<｜Assistant｜>")
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT]  # ids 0..4; byte b is id len(SPECIAL_TOKENS) + b

_COMMON = dict(n_shared_experts=1, routed_scaling_factor=2.5, topk_method="noaux_tc", scoring_func="sigmoid",
               norm_topk_prob=True, num_nextn_predict_layers=1, hidden_act="silu", rms_norm_eps=1e-6,
               rope_interleave=True, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
PRESETS: dict[str, dict] = {
    "tiny": dict(_COMMON, vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=3, num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=16,
                 qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                 topk_group=2, first_k_dense_replace=1, max_position_embeddings=4096,
                 rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                      original_max_position_embeddings=1024, beta_fast=32, beta_slow=1,
                                      mscale=1.0, mscale_all_dim=1.0)),
    "small": dict(_COMMON, vocab_size=1024, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
                  num_hidden_layers=8, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128, qk_rope_head_dim=32,
                  qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=32, num_experts_per_tok=4, n_group=4,
                  topk_group=2, first_k_dense_replace=1, max_position_embeddings=8192,
                  rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                       original_max_position_embeddings=2048, beta_fast=32, beta_slow=1,
                                       mscale=1.0, mscale_all_dim=1.0)),
}
# `small`'s vocabulary, experts, routing groups and rope, with V3's attention widths and a wider residual.
PRESETS["v3mla"] = dict(PRESETS["small"], hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                        q_lora_rank=384, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)
# dtype on disk, number of shards
_STORAGE = {"tiny": (torch.float32, 1), "small": (torch.bfloat16, 2), "v3mla": (torch.bfloat16, 2)}

CHAT_TEMPLATE = DEEPSEEK_CHAT_TEMPLATE


def cache_root() -> str:
    return os.environ.get("RAYINFER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rayinfer")


def resolve_model_path(model: str) -> str:
    """A preset name or a checkpoint directory -> the checkpoint directory."""
    if model in PRESETS:
        return materialize(model)
    if os.path.isdir(model):
        return model
    raise ValueError(f"model {model!r} is neither a built-in preset ({', '.join(PRESETS)}) "
                     f"nor a checkpoint directory")


def materialize(name: str) -> str:
    final = os.path.join(cache_root(), "presets", f"{name}-{REVISION}")
    if os.path.exists(os.path.join(final, "config.json")):
        return final
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=os.path.dirname(final))
    try:
        write_preset(name, tmp)
        os.chmod(tmp, 0o755)
        os.rename(tmp, final)
    except OSError:
        if not os.path.exists(os.path.join(final, "config.json")):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_preset(name: str, path: str, seed: int = 0) -> None:
    from rayinfer.model.deepseek_v3 import DeepseekV3
    from rayinfer.model.loader import to_hf_state_dict

    raw = PRESETS[name]
    cfg = ModelConfig.from_dict(raw)
    model = DeepseekV3(cfg)
    init_random_weights(model, seed)
    dtype, shards = _STORAGE[name]
    save_checkpoint({k: v.to(dtype) for k, v in to_hf_state_dict(model).items()}, raw, path, shards)
    write_tokenizer(path, max_len=cfg.max_position_embeddings)


def init_random_weights(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights that keep activations O(1) through the layers and give peaked logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("e_score_correction_bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif name.endswith("gate.weight"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:  # projections, expert stacks: fan-in scaled
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            if name.endswith("lm_head.weight") or name.endswith("shared_head.head.weight"):
                # Favour printable ASCII so random outputs read as (gibberish) text, not broken UTF-8.
                first = len(SPECIAL_TOKENS)
                p[first + 32:first + 127] *= 3


def save_checkpoint(tensors: dict[str, torch.Tensor], config: dict, path: str, shards: int = 1) -> None:
    """Writes config.json and safetensors (sharded with an index when shards > 1)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(config, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3"), f, indent=2)
    names = sorted(tensors)
    if shards == 1:
        save_file({k: tensors[k] for k in names}, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i * per:(i + 1) * per]
        save_file({k: tensors[k] for k in part}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _byte_chars() -> list[str]:
    """The printable stand-in character for each byte value, as byte-level BPE tokenizers use."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tokenizer(path: str, max_len: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: len(SPECIAL_TOKENS) + b for b, c in enumerate(_byte_chars())})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, 0)])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
                   "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "model_max_length": max_len,
                   "chat_template": CHAT_TEMPLATE}, f, indent=2, ensure_ascii=False)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 1}, f)
