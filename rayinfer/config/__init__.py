"""Frozen, validated configuration: the model (model.py), one engine (engine.py), a deployment (serve.py).

Every value is checked when its object is built; a value a user got wrong raises `ConfigError`
naming the field. Import everything from `rayinfer.config`.
"""
from rayinfer.config.engine import (CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig,  # noqa: F401
                                    SpeculativeConfig, parse_bytes)
from rayinfer.config.model import ConfigError, ModelConfig, QuantConfig, RopeConfig  # noqa: F401
from rayinfer.config.serve import AutoscalingConfig, RoleConfig, ServeConfig  # noqa: F401,E402
