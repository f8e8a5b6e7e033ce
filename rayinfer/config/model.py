"""The model's static description: `ModelConfig`, read from a Hugging Face `config.json`.

Owns every DeepSeek-V3 field (MLA ranks and dims, MoE routing, rope in its legacy
`rope_scaling` and newer `rope_parameters` forms, FP8 `quantization_config`) and the facts
derived from them. Built once, validated when built (a bad value raises `ConfigError` naming
the field), never changed.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any


class ConfigError(ValueError):
    """A configuration value a user supplied is missing, mistyped or inconsistent."""


def check_field(cond: bool, field_name: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"config field '{field_name}'={value!r}: {why}")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `kind` is "default" or "yarn"."""

    kind: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        check_field(self.kind in ("default", "yarn"), "rope_type", self.kind, "only 'default' and 'yarn' are supported")
        check_field(self.theta > 0, "rope_theta", self.theta, "must be > 0")
        if self.kind == "yarn":
            check_field(self.factor >= 1.0, "rope.factor", self.factor, "yarn factor must be >= 1")
            check_field(self.original_max_position_embeddings > 0, "rope.original_max_position_embeddings",
                   self.original_max_position_embeddings, "must be > 0")

    @staticmethod
    def from_hf(raw: dict, max_position_embeddings: int) -> "RopeConfig":
        # Newer checkpoints carry `rope_parameters` (theta inside); older ones `rope_scaling` + `rope_theta`.
        params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        check_field(isinstance(params, dict), "rope_parameters", params, "must be a JSON object")
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default"))
        if kind == "default":
            return RopeConfig(theta=float(theta))
        factor = params.get("factor")
        orig = params.get("original_max_position_embeddings", max_position_embeddings)
        if factor is None:
            factor = max_position_embeddings / orig
        return RopeConfig(
            kind=kind, theta=float(theta), factor=float(factor), original_max_position_embeddings=int(orig),
            beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
            mscale=float(params.get("mscale") or 0.0), mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
            attention_factor=params.get("attention_factor"), truncate=bool(params.get("truncate", True)),
        )


@dataclass(frozen=True)
class QuantConfig:
    """DeepSeek's FP8 checkpoint format: e4m3 weights with one fp32 inverse scale per block."""

    method: str = "fp8"
    fmt: str = "e4m3"
    block_size: tuple[int, int] = (128, 128)
    activation_scheme: str = "dynamic"

    def __post_init__(self):
        check_field(self.method == "fp8", "quantization_config.quant_method", self.method, "only 'fp8' is supported")
        check_field(self.fmt == "e4m3", "quantization_config.fmt", self.fmt, "only 'e4m3' is supported")
        check_field(len(self.block_size) == 2 and all(b > 0 for b in self.block_size),
               "quantization_config.weight_block_size", self.block_size, "must be two positive ints")
        check_field(self.activation_scheme == "dynamic", "quantization_config.activation_scheme",
               self.activation_scheme, "only 'dynamic' is supported")

    @staticmethod
    def from_hf(raw: dict | None) -> "QuantConfig | None":
        if not raw:
            return None
        return QuantConfig(method=raw.get("quant_method", "fp8"), fmt=raw.get("fmt", "e4m3"),
                           block_size=tuple(raw.get("weight_block_size", (128, 128))),
                           activation_scheme=raw.get("activation_scheme", "dynamic"))


_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
               "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
               "max_position_embeddings")


@dataclass(frozen=True)
class ModelConfig:
    """A DeepSeek-V3/R1-architecture model, field names as in its Hugging Face `config.json`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    max_position_embeddings: int
    q_lora_rank: int | None = None
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    num_nextn_predict_layers: int = 0
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    rope: RopeConfig = field(default_factory=RopeConfig)
    quant: QuantConfig | None = None

    def __post_init__(self):
        for name in _INT_FIELDS:
            v = getattr(self, name)
            check_field(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, v, "must be a positive integer")
        check_field(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
               "q_lora_rank", self.q_lora_rank, "must be null or a positive integer")
        check_field(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", self.qk_rope_head_dim, "must be even")
        check_field(self.hidden_act == "silu", "hidden_act", self.hidden_act, "only 'silu' is supported")
        check_field(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "must be > 0")
        check_field(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
               self.first_k_dense_replace, f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        check_field(self.moe_layer_freq >= 1, "moe_layer_freq", self.moe_layer_freq, "must be >= 1")
        check_field(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", self.num_nextn_predict_layers,
               "must be >= 0")
        if self.n_routed_experts:
            self._check_moe()
        else:
            check_field(not self.moe_layers, "n_routed_experts", self.n_routed_experts,
                   "is 0 but first_k_dense_replace leaves MoE layers")

    def _check_moe(self):
        e = self.n_routed_experts
        check_field(e > 0, "n_routed_experts", e, "must be > 0")
        check_field(self.n_group >= 1 and e % self.n_group == 0, "n_group", self.n_group,
               f"must be >= 1 and divide n_routed_experts={e}")
        check_field(1 <= self.topk_group <= self.n_group, "topk_group", self.topk_group,
               f"must be in [1, n_group={self.n_group}]")
        check_field(1 <= self.num_experts_per_tok <= self.topk_group * (e // self.n_group), "num_experts_per_tok",
               self.num_experts_per_tok,
               f"must be in [1, topk_group * experts per group = {self.topk_group * (e // self.n_group)}]")
        check_field(self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"), "topk_method",
               self.topk_method, "must be one of noaux_tc, greedy, group_limited_greedy")
        check_field(self.scoring_func in ("sigmoid", "softmax"), "scoring_func", self.scoring_func,
               "must be 'sigmoid' or 'softmax'")
        check_field(self.topk_method != "noaux_tc" or self.scoring_func == "sigmoid", "topk_method",
               self.topk_method, "noaux_tc needs scoring_func 'sigmoid'")
        # Group scores take the top-2 experts of each group.
        check_field(self.n_group == 1 or e // self.n_group >= 2, "n_group", self.n_group,
               "grouped routing needs at least 2 experts per group")
        check_field(self.routed_scaling_factor > 0, "routed_scaling_factor", self.routed_scaling_factor, "must be > 0")
        check_field(self.moe_intermediate_size > 0, "moe_intermediate_size", self.moe_intermediate_size, "must be > 0")

    # Derived, static facts of the architecture.
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer by absorbed MLA: normalised latent + rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return self.n_routed_experts > 0 and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        r = self.rope
        if r.kind == "yarn" and r.mscale_all_dim and r.factor > 1:
            m = 0.1 * r.mscale_all_dim * math.log(r.factor) + 1.0
            scale *= m * m
        return scale

    @staticmethod
    def from_dict(raw: dict) -> "ModelConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(raw).__name__}")
        arch = raw.get("model_type")
        if arch not in (None, "deepseek_v3", "deepseek_v2"):
            raise ConfigError(f"config field 'model_type'={arch!r}: rayinfer serves deepseek_v3-architecture models")
        missing = [n for n in _INT_FIELDS if n not in raw]
        if missing:
            raise ConfigError(f"config.json is missing required field(s): {', '.join(missing)}")
        known = {f.name for f in fields(ModelConfig)} - {"rope", "quant", "eos_token_id"}
        kw = {k: raw[k] for k in known if k in raw and raw[k] is not None}
        eos = raw.get("eos_token_id")
        kw["eos_token_id"] = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        kw["rope"] = RopeConfig.from_hf(raw, int(raw["max_position_embeddings"]))
        kw["quant"] = QuantConfig.from_hf(raw.get("quantization_config"))
        for k in ("norm_topk_prob", "attention_bias", "rope_interleave", "tie_word_embeddings"):
            if k in kw:
                check_field(isinstance(kw[k], bool), k, kw[k], "must be true or false")
        for k in ("routed_scaling_factor", "rms_norm_eps"):
            if k in kw:
                check_field(isinstance(kw[k], (int, float)) and not isinstance(kw[k], bool), k, kw[k], "must be a number")
                kw[k] = float(kw[k])
        return ModelConfig(**kw)

    @staticmethod
    def from_file(path: str) -> "ModelConfig":
        p = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(p):
            raise ConfigError(f"no config.json at {p!r}")
        with open(p) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}: not valid JSON ({e})") from e
        return ModelConfig.from_dict(raw)

    def to_hf_dict(self) -> dict:
        """The `config.json` form, readable by rayinfer and by transformers."""
        out = {k: getattr(self, k) for k in {f.name for f in fields(self)} - {"rope", "quant", "eos_token_id"}}
        out.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
                   num_key_value_heads=self.num_attention_heads,
                   eos_token_id=list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0])
        r = self.rope
        rope = {"rope_type": r.kind, "rope_theta": r.theta}
        if r.kind == "yarn":
            rope.update(factor=r.factor, original_max_position_embeddings=r.original_max_position_embeddings,
                        beta_fast=r.beta_fast, beta_slow=r.beta_slow, mscale=r.mscale, mscale_all_dim=r.mscale_all_dim)
        out["rope_parameters"] = rope
        if self.quant:
            q = self.quant
            out["quantization_config"] = {"quant_method": q.method, "fmt": q.fmt,
                                          "weight_block_size": list(q.block_size),
                                          "activation_scheme": q.activation_scheme}
        return out

