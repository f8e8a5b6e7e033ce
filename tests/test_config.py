"""ModelConfig: reading real config.json shapes (legacy and new rope forms) and naming bad fields."""
import json

import pytest

from rayinfer.config import ConfigError, ModelConfig
from rayinfer.model.presets import PRESETS

V3 = {  # DeepSeek-V3's published config.json, as shipped (legacy rope_scaling form)
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-06, "rope_theta": 10000, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def test_deepseek_v3_config():
    cfg = ModelConfig.from_dict(V3)
    assert cfg.kv_cache_dim == 576 and cfg.qk_head_dim == 192
    assert cfg.moe_layers == list(range(3, 61))
    assert cfg.rope.kind == "yarn" and cfg.rope.factor == 40 and cfg.rope.theta == 10000
    assert cfg.quant.block_size == (128, 128)
    # softmax scale = 192^-0.5 * (0.1 * ln 40 + 1)^2
    assert abs(cfg.softmax_scale - 192 ** -0.5 * (0.1 * 3.6888794541 + 1) ** 2) < 1e-9


def test_new_rope_parameters_form_equals_legacy():
    new = {k: v for k, v in V3.items() if k not in ("rope_scaling", "rope_theta")}
    new["rope_parameters"] = dict(V3["rope_scaling"], rope_type="yarn", rope_theta=10000)
    del new["rope_parameters"]["type"]
    assert ModelConfig.from_dict(new).rope == ModelConfig.from_dict(V3).rope


def test_roundtrip_through_hf_dict():
    cfg = ModelConfig.from_dict(PRESETS["tiny"])
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg


@pytest.mark.parametrize("field,value", [
    ("n_group", 3), ("topk_group", 9), ("num_experts_per_tok", 200), ("hidden_size", 0), ("hidden_size", "big"),
    ("qk_rope_head_dim", 63), ("first_k_dense_replace", 99), ("scoring_func", "relu"), ("topk_method", "magic"),
    ("hidden_act", "gelu"), ("norm_topk_prob", "yes"), ("q_lora_rank", -1), ("model_type", "llama"),
])
def test_bad_field_is_named(field, value):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(dict(V3, **{field: value}))


def test_missing_field_and_bad_quant():
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        ModelConfig.from_dict({k: v for k, v in V3.items() if k != "kv_lora_rank"})
    with pytest.raises(ConfigError, match="quant_method"):
        ModelConfig.from_dict(dict(V3, quantization_config={"quant_method": "awq"}))
    with pytest.raises(ConfigError, match="rope_type"):
        ModelConfig.from_dict(dict(V3, rope_scaling={"type": "longrope", "factor": 2}))


def test_config_is_frozen():
    cfg = ModelConfig.from_dict(V3)
    with pytest.raises(Exception):
        cfg.hidden_size = 1


def test_role_options_are_the_engines_own():
    from rayinfer.config import ServeConfig
    from rayinfer.config.serve import ROLE_ENGINE_OPTIONS, RoleConfig

    default = ServeConfig().engine_config("decode")
    role = RoleConfig()
    for section, name in ROLE_ENGINE_OPTIONS:
        group = next(g for g in (default.cache, default.scheduler, default.parallel, default.speculative)
                     if isinstance(g, section))
        assert getattr(role, name) in (None, getattr(group, name)), name  # the engine's default, or left to it
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        ServeConfig.from_dict({"decode": {"max_num_batched_tokens": 0}})
    with pytest.raises(ConfigError, match="eplb_interval_s"):
        ServeConfig.from_dict({"prefill": {"eplb_interval_s": -1}})
    tuned = ServeConfig.from_dict({"decode": {"max_num_seqs": 8, "kv_cache_memory": "1MiB"}})
    assert tuned.engine_config("decode").scheduler.max_num_seqs == 8
    assert tuned.engine_config("decode").cache.kv_cache_memory == 2**20
    assert tuned.engine_config("prefill").cache.kv_cache_memory == tuned.kv_cache_memory


def test_speculative_decoding_options():
    from rayinfer.config import EngineConfig, ServeConfig

    assert EngineConfig.from_options("tiny", num_speculative_tokens=3).speculative.num_speculative_tokens == 3
    for bad in (-1, 9, 1.5, True):
        with pytest.raises(ConfigError, match="num_speculative_tokens"):
            EngineConfig.from_options("tiny", num_speculative_tokens=bad)
    served = ServeConfig.from_dict({"decode": {"ep_size": 1, "num_speculative_tokens": 2}})
    assert served.engine_config("decode").speculative.num_speculative_tokens == 2
    with pytest.raises(ConfigError, match="needs ep_size 1"):  # not in expert-parallel gangs yet
        ServeConfig.from_dict({"decode": {"ep_size": 2, "num_speculative_tokens": 2}})
    flagged = ServeConfig(disaggregated=False).with_ep(decode=1).with_speculation(1)
    assert flagged.engine_config("mixed").speculative.num_speculative_tokens == 1
    assert flagged.engine_config("prefill").speculative.num_speculative_tokens == 0
