"""Loading Hugging Face safetensors checkpoints into `DeepseekV3`, as the rank will run it.

Owns the mapping from checkpoint tensor names to model parameters: HF per-expert tensors are
stacked into slots, `model.layers.{N+k}` becomes MTP module k. The model is built on `meta`
(`model.build`) in its final layout and materialised on the rank's device, then filled tensor by
tensor: no fp32 copy of the model, no full-model staging. FP8 weights (`weight` +
`weight_scale_inv`, 128x128 blocks) stay FP8 where an FP8 kernel can run (CUDA) and are
dequantised, one tensor at a time, where none can (CPU) or when asked. Single-file, sharded
and unindexed multi-file checkpoints load the same way. Only the tensors the instance needs are
read, each once: a rank never touches other experts' bytes, and redundant slots of one expert
copy the bytes read for the first. Any missing or unexpected tensor is an error that lists them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from rayinfer.config import ModelConfig
from rayinfer.kernels import fp8
from rayinfer.model.build import Fp8Layout, materialise, meta_model
from rayinfer.model.deepseek_v3 import DeepseekV3
from rayinfer.model.layers import Linear

_EXPERT = re.compile(r"^(layers|mtp)\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")


class CheckpointError(ValueError):
    """The checkpoint on disk does not match the model its config.json describes."""


@dataclass
class LoadReport:
    read_keys: set[str] = field(default_factory=set)
    bytes_read: int = 0


def checkpoint_index(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file holding it."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors files in {path!r}")
    out = {}
    for name in files:
        with safe_open(os.path.join(path, name), "pt") as f:
            out.update({k: os.path.join(path, name) for k in f.keys()})
    return out


def _model_name(key: str, num_layers: int) -> str | None:
    """Checkpoint tensor name -> our parameter name (None: a known tensor we deliberately skip)."""
    name = key[len("model."):] if key.startswith("model.") else key
    m = _LAYER.match(name)
    if m and int(m.group(1)) >= num_layers:
        rest = m.group(2)
        if rest.startswith("embed_tokens."):
            return None  # MTP modules share the main embedding
        name = f"mtp.{int(m.group(1)) - num_layers}.{rest}"
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return name


class _Reader:
    """Opens each file once and reads tensors by name, counting what it read."""

    def __init__(self, index: dict[str, str], report: LoadReport):
        self.index, self.report, self.handles = index, report, {}

    def get(self, key: str) -> torch.Tensor:
        path = self.index[key]
        if path not in self.handles:
            self.handles[path] = safe_open(path, "pt", device="cpu")
        t = self.handles[path].get_tensor(key)
        self.report.read_keys.add(key)
        self.report.bytes_read += t.numel() * t.element_size()
        return t


def load_weights(model: DeepseekV3, path: str, progress: bool = False) -> LoadReport:
    """Fills every tensor of `model` from the checkpoint; FP8 parameters take FP8 bytes and scales, others
    take (dequantised where stored FP8) values in their own dtype."""
    cfg = model.cfg
    index = checkpoint_index(path)
    report = LoadReport()
    reader = _Reader(index, report)
    params = dict(model.named_parameters())
    slots = _expert_slots(model)  # (layer, logical expert) -> [(RoutedExperts, slot)]
    filled: set[str] = set()
    unexpected, experts_seen = [], set()
    moe_layers = {moe.layer_idx for moe in model.moe_layers}
    keys = [k for k in index if not k.endswith("_scale_inv")]
    for key in _progress(keys, progress, "loading weights"):
        name = _model_name(key, cfg.num_hidden_layers)
        if name is None or _unbuilt_mtp(name, model):
            continue
        m = _EXPERT.match(name)
        if m:
            layer = int(m.group(2)) + (cfg.num_hidden_layers if m.group(1) == "mtp" else 0)
            expert, proj = int(m.group(3)), m.group(4)
            if layer not in moe_layers or expert >= cfg.n_routed_experts:
                unexpected.append(key)
                continue
            experts_seen.add((layer, expert, proj))
            if (layer, expert) in slots:
                _load_expert(slots[(layer, expert)], proj, key, reader, index)
            continue
        if name not in params:
            unexpected.append(key)
            continue
        _load_param(model, name, params[name], key, reader, index)
        filled.add(name)
    missing = [_hf_name(n, cfg.num_hidden_layers) for n in params if n not in filled and not _is_expert_param(n)]
    missing += [f"layer {layer} expert {e} {p}" for (layer, e) in slots for p in ("gate_proj", "up_proj", "down_proj")
                if (layer, e, p) not in experts_seen]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path!r} does not match its config: "
                              f"missing {_listing(missing)}; unexpected {_listing(unexpected)}")
    return report


def _unbuilt_mtp(name: str, model: DeepseekV3) -> bool:
    return name.startswith("mtp.") and int(name.split(".")[1]) >= len(model.mtp)


def _hf_name(name: str, num_layers: int) -> str:
    """Our parameter name -> its checkpoint tensor name (inverse of `_model_name`)."""
    if name.startswith("mtp."):
        k, rest = name[4:].split(".", 1)
        name = f"layers.{num_layers + int(k)}.{rest}"
    return name if name.startswith("lm_head.") else "model." + name


def _listing(items: list[str]) -> str:
    if not items:
        return "none"
    head = ", ".join(items[:12])
    return f"{len(items)} ({head}{', ...' if len(items) > 12 else ''})"


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit="tensor")


def _is_expert_param(name: str) -> bool:
    return name.endswith(".experts.w13") or name.endswith(".experts.w2")


def _expert_slots(model: DeepseekV3) -> dict[tuple[int, int], list]:
    out: dict[tuple[int, int], list] = {}
    for moe in model.moe_layers:
        for s, logical in enumerate(moe.experts.logical_ids):
            out.setdefault((moe.layer_idx, logical), []).append((moe.experts, s))
    return out


def _read(key: str, reader: _Reader, index: dict[str, str], dtype: torch.dtype):
    """(tensor, fp8 scale or None): FP8 tensors come with their scale when `dtype` is FP8, else dequantised."""
    t = reader.get(key)
    if t.dtype != fp8.FP8:
        return t, None
    scale_key = key + "_scale_inv"
    if scale_key not in index:
        raise CheckpointError(f"FP8 tensor {key!r} has no {scale_key!r}")
    scale = reader.get(scale_key)
    if dtype == fp8.FP8:
        return t, scale
    return fp8.dequantize_weight_blocks(t, scale, dtype), None


def _check_shape(key: str, got, want) -> None:
    if tuple(got) != tuple(want):
        raise CheckpointError(f"tensor {key!r} has shape {tuple(got)}, the config implies {tuple(want)}")


def _load_param(model, name, param, key, reader, index):
    t, scale = _read(key, reader, index, param.dtype)
    _check_shape(key, t.shape, param.shape)
    if param.dtype == fp8.FP8 and scale is None:
        raise CheckpointError(f"tensor {key!r} is {t.dtype}, but this model keeps it in FP8 with a block scale")
    with torch.no_grad():
        if scale is not None:
            module = model.get_submodule(name.rsplit(".", 1)[0])
            _check_shape(key + "_scale_inv", scale.shape, module.weight_scale_inv.shape)
            module.weight_scale_inv.copy_(scale)
        elif name.endswith("gate.weight") and t.dtype == torch.float32 and param.dtype != torch.float32:
            # The router stays as precise as stored (transformers keeps it fp32): expert choice flips otherwise.
            param.data = torch.empty(param.shape, dtype=torch.float32, device=param.device)
        param.copy_(t)


def _load_expert(targets: list, proj: str, key, reader, index):
    """One checkpoint expert tensor, read once, into every slot holding that expert."""
    experts = targets[0][0]
    inter = experts.w2.shape[2]
    dst = experts.w2 if proj == "down_proj" else experts.w13
    rows = slice(None) if proj == "down_proj" else slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
    t, scale = _read(key, reader, index, dst.dtype)
    _check_shape(key, t.shape, dst[0, rows].shape)
    with torch.no_grad():
        for ex, slot in targets:
            (ex.w2 if proj == "down_proj" else ex.w13)[slot, rows].copy_(t)
            if scale is not None:
                s_dst = ex.w2_scale if proj == "down_proj" else ex.w13_scale
                s_rows = slice(None) if proj == "down_proj" else slice(rows.start // fp8.BLOCK, rows.stop // fp8.BLOCK)
                _check_shape(key + "_scale_inv", scale.shape, s_dst[slot, s_rows].shape)
                s_dst[slot, s_rows].copy_(scale)


def checkpoint_fp8_layout(model: DeepseekV3, index: dict[str, str]) -> Fp8Layout:
    """The weights the checkpoint stores in FP8 (those with a `weight_scale_inv`)."""
    n = model.cfg.num_hidden_layers
    linears = frozenset(name for name, m in model.named_modules() if isinstance(m, Linear)
                        and _hf_name(name + ".weight", n) + "_scale_inv" in index)
    experts = any(k.endswith("_proj.weight_scale_inv") and ".mlp.experts." in k for k in index)
    return Fp8Layout(linears, experts)


def rank_model(path: str, dtype: torch.dtype, device: str | torch.device = "cpu",
               local_experts: dict[int, list[int]] | None = None, keep_fp8: bool | None = None,
               mtp: bool = False) -> DeepseekV3:
    """The rank's model on `meta`, every tensor in the layout `load_model` fills: what a rank will hold.

    Needs only config.json; with weights present, FP8 is kept exactly where the checkpoint has scales,
    without them (planning) where DeepSeek's FP8 format puts them. `keep_fp8` defaults to "on CUDA"."""
    cfg = ModelConfig.from_file(path)
    has_weights = any(f.endswith(".safetensors") for f in os.listdir(path)) if os.path.isdir(path) else False
    index = checkpoint_index(path) if has_weights else None
    mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
    if not mtp or (index is not None and not any(k.startswith(mtp_prefix) for k in index)):
        # Not asked for (nothing runs it yet), or declared but not shipped (transformers drops it).
        cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    if keep_fp8 is None:
        keep_fp8 = torch.device(device).type == "cuda"
    if not keep_fp8:
        return meta_model(cfg, dtype, local_experts, Fp8Layout())
    if index is None:
        return meta_model(cfg, dtype, local_experts)
    return meta_model(cfg, dtype, local_experts, checkpoint_fp8_layout(meta_model(cfg, dtype, {}, Fp8Layout()), index))


def load_model(path_or_preset: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               local_experts: dict[int, list[int]] | None = None, keep_fp8: bool | None = None,
               mtp: bool = False, progress: bool = False) -> DeepseekV3:
    """A ready model from a checkpoint directory or a built-in preset name ("tiny", "small", "v3mla").

    `keep_fp8`: keep the checkpoint's FP8 weights in FP8 (default: on CUDA, where FP8 GEMMs run).
    `mtp`: also load the MTP module when the checkpoint ships it."""
    from rayinfer.model.presets import resolve_model_path

    path = resolve_model_path(path_or_preset)
    model = materialise(rank_model(path, dtype, device, local_experts, keep_fp8, mtp), device)
    load_weights(model, path, progress=progress)
    model.checkpoint_path = path
    return model.eval().requires_grad_(False)


def to_hf_state_dict(model: DeepseekV3) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face checkpoint names (experts unstacked, MTP as layer N+k)."""
    n = model.cfg.num_hidden_layers
    out = {}
    for name, t in model.state_dict().items():
        if not _is_expert_param(name):
            out[_hf_name(name, n)] = t
    for moe in model.moe_layers:
        inter = moe.experts.w2.shape[2]
        for s, e in enumerate(moe.experts.logical_ids):
            pre = f"model.layers.{moe.layer_idx}.mlp.experts.{e}."
            out[pre + "gate_proj.weight"] = moe.experts.w13[s, :inter]
            out[pre + "up_proj.weight"] = moe.experts.w13[s, inter:]
            out[pre + "down_proj.weight"] = moe.experts.w2[s]
    return {k: v.contiguous() for k, v in out.items()}


def read_experts(path: str, wanted: list[tuple[int, int]], dtype: torch.dtype) -> dict[tuple[int, int], tuple]:
    """(layer, logical expert) -> (w13 [2I, H], w2 [H, I]) read from the checkpoint, nothing else read;
    with `dtype` FP8 -> (w13, w2, w13_scale [2I/128, H/128], w2_scale [H/128, I/128]), the slots' layout.

    What a rank uses when a new expert placement gives it an expert it does not hold."""
    index = checkpoint_index(path)
    reader = _Reader(index, LoadReport())
    out = {}
    for layer, e in wanted:
        pre = f"model.layers.{layer}.mlp.experts.{e}."
        (gate, gs), (up, us), (down, ds) = (_read(pre + f"{p}_proj.weight", reader, index, dtype)
                                            for p in ("gate", "up", "down"))
        if dtype == fp8.FP8:
            if gs is None or us is None or ds is None:
                raise CheckpointError(f"expert {e} of layer {layer} is not stored in FP8; cannot keep it in FP8")
            out[(layer, e)] = (torch.cat([gate, up]), down, torch.cat([gs, us]), ds)
        else:
            out[(layer, e)] = (torch.cat([gate, up]).to(dtype), down.to(dtype))
    return out
