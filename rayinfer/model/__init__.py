"""The DeepSeek-V3 model: architecture, checkpoint loading and built-in presets.

`load_model(path_or_preset, dtype, device)` is the entry point; `model(input_ids [B, T])` gives
logits [B, T, vocab] for a full-sequence forward without a cache.
"""
from rayinfer.model.batch import ForwardBatch
from rayinfer.model.deepseek_v3 import DeepseekV3
from rayinfer.model.loader import CheckpointError, load_model, load_weights
from rayinfer.model.presets import PRESETS, resolve_model_path

__all__ = ["DeepseekV3", "ForwardBatch", "load_model", "load_weights", "CheckpointError", "PRESETS",
           "resolve_model_path"]
