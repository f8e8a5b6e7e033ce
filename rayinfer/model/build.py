"""Constructing a `DeepseekV3` the way a rank will run it: on the meta device, every tensor in its final form.

Owns the storage layout of a model instance: the compute dtype for most weights, FP8 (`weight` float8_e4m3fn +
`weight_scale_inv` fp32 per 128x128 block) for the linears and routed experts that stay FP8, fp32 for the routing
bias, and the byte count of all of it. Crosses: a `ModelConfig`, the rank's expert subset and an `Fp8Layout` in;
a model on `meta` (for `rayinfer plan`) or with uninitialised storage on the rank's device (for the loader) out.
Nothing is allocated off `meta` before `to_empty`, and no checkpoint byte is read here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rayinfer.config import ModelConfig
from rayinfer.kernels import fp8
from rayinfer.model.deepseek_v3 import DeepseekV3
from rayinfer.model.layers import Linear

_HEADS = ("lm_head", ".shared_head.head")  # output heads stay in the compute dtype in DeepSeek's checkpoints


@dataclass(frozen=True)
class Fp8Layout:
    """Which weights stay FP8: Linear modules by name, and whether the routed experts do."""

    linears: frozenset[str] = field(default_factory=frozenset)
    experts: bool = False

    @staticmethod
    def from_config(model: DeepseekV3) -> "Fp8Layout":
        """What DeepSeek's FP8 checkpoints hold, from config.json alone: every linear but the heads, and the experts."""
        if model.cfg.quant is None:
            return Fp8Layout()
        names = frozenset(n for n, m in model.named_modules() if isinstance(m, Linear) and not n.endswith(_HEADS))
        return Fp8Layout(names, model.cfg.n_routed_experts > 0)


def fp8_capable(n: int, k: int) -> bool:
    """A weight [n, k] can run as FP8: activations are quantised in 1x128 groups along k."""
    return k % fp8.BLOCK == 0


def _blocks(n: int) -> int:
    return -(-n // fp8.BLOCK)


def meta_model(cfg: ModelConfig, dtype: torch.dtype, local_experts: dict[int, list[int]] | None = None,
               layout: Fp8Layout | None = None) -> DeepseekV3:
    """The model on `meta` with every tensor in its final dtype and shape; `layout=None` reads it from the config."""
    with torch.device("meta"):
        model = DeepseekV3(cfg, local_experts).to(dtype)
    for moe in model.moe_layers:
        if moe.gate.e_score_correction_bias is not None:  # selection among close scores: fp32 always
            moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.data.float()
    layout = Fp8Layout.from_config(model) if layout is None else layout
    for name in layout.linears:
        lin = model.get_submodule(name)
        n, k = lin.weight.shape
        if fp8_capable(n, k):
            lin.weight = torch.nn.Parameter(torch.empty(n, k, dtype=fp8.FP8, device="meta"), requires_grad=False)
            lin.weight_scale_inv = torch.empty(_blocks(n), _blocks(k), device="meta")
    if layout.experts:
        for moe in model.moe_layers:
            ex = moe.experts
            s, i2, h = ex.w13.shape
            if i2 % (2 * fp8.BLOCK) or h % fp8.BLOCK:
                continue  # gate and up rows must each fill whole blocks to be stacked in FP8
            ex.w13 = torch.nn.Parameter(torch.empty(s, i2, h, dtype=fp8.FP8, device="meta"), requires_grad=False)
            ex.w2 = torch.nn.Parameter(torch.empty(s, h, i2 // 2, dtype=fp8.FP8, device="meta"), requires_grad=False)
            ex.w13_scale = torch.empty(s, i2 // fp8.BLOCK, h // fp8.BLOCK, device="meta")
            ex.w2_scale = torch.empty(s, h // fp8.BLOCK, i2 // 2 // fp8.BLOCK, device="meta")
    return model.requires_grad_(False)


def materialise(model: DeepseekV3, device: str | torch.device) -> DeepseekV3:
    """Uninitialised storage on `device` for every tensor, dtypes kept (the loader fills each one)."""
    return model.to_empty(device=device)


def weight_bytes(model: DeepseekV3) -> int:
    """Bytes of every parameter and buffer (FP8 scales included): what the rank's weights occupy."""
    tensors = [*model.parameters(), *(b for b in model.buffers() if b is not None)]
    return sum(t.numel() * t.element_size() for t in tensors)
