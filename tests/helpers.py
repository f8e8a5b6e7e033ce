"""Test helpers: random tiny DeepSeek-V3 checkpoints written by transformers, FP8 conversion, paged runs."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from rayinfer.kernels import fp8
from rayinfer.kernels.mla import PAGE_SIZE
from rayinfer.model import ForwardBatch

from rayinfer.model.hf_reference import BASE, YARN, hf_checkpoint  # noqa: F401 (re-exported for the tests)


def quantize_checkpoint_fp8(src: str, dst: str, dequant_dst: str) -> None:
    """Rewrites a checkpoint the way DeepSeek stores FP8: linear `weight` as e4m3 + fp32 `weight_scale_inv`
    per 128x128 block, into `dst`; and the dequantised weights (what the FP8 checkpoint really holds)
    as a plain checkpoint into `dequant_dst`."""
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out, dequant = {}, {}
    for k, t in tensors.items():
        linear = t.dim() == 2 and (k.endswith("proj.weight") or k.endswith("proj_with_mqa.weight"))
        if linear:
            q, s = fp8.quantize_weight_blocks(t)
            out[k], out[k.replace(".weight", ".weight_scale_inv")] = q, s
            dequant[k] = fp8.dequantize_weight_blocks(q, s)
        else:
            out[k] = dequant[k] = t
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    for path, tensors, extra in ((dequant_dst, dequant, {}), (dst, out, {"quantization_config": {
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}})):
        os.makedirs(path, exist_ok=True)
        save_file(tensors, os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(dict(cfg, **extra), f)


class PagedCache:
    """A minimal paged latent cache: each sequence gets its own contiguous run of pages."""

    def __init__(self, model, seq_capacity: list[int]):
        cfg = model.cfg
        pages = [-(-n // PAGE_SIZE) for n in seq_capacity]
        dtype = next(model.parameters()).dtype
        n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        self.kv = [torch.zeros(sum(pages), PAGE_SIZE, cfg.kv_cache_dim, dtype=dtype) for _ in range(n_layers)]
        width = max(pages)
        table, start = [], 0
        for p in pages:
            table.append(list(range(start, start + p)) + [0] * (width - p))
            start += p
        self.block_tables = torch.tensor(table)

    def batch(self, seqs: list[int], starts: list[int], lens: list[int], prefill_attention=None) -> ForwardBatch:
        """Sequences `seqs` each add `lens[i]` tokens at positions starting `starts[i]`."""
        pos = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)])
        table = self.block_tables[seqs]
        slots = torch.cat([table[i, torch.arange(s, s + n) // PAGE_SIZE] * PAGE_SIZE + torch.arange(s, s + n) % PAGE_SIZE
                           for i, (s, n) in enumerate(zip(starts, lens))])
        return ForwardBatch(pos, list(lens), [s + n for s, n in zip(starts, lens)], table, slots, self.kv,
                            prefill_attention)


def hand_off(prefill, decode, prompts: list[list[int]], params) -> dict[str, list[int]]:
    """Runs `prompts` (request ids "0", "1", ...) on a prefill engine and queues each on a decode engine with its
    first token and handed-off KV -> request id -> tokens so far (the decode engine has not stepped yet)."""
    from rayinfer.messages import EngineRequest

    got = {}
    for i, p in enumerate(prompts):
        prefill.add_request(EngineRequest(str(i), p, params))
    while prefill.has_unfinished():
        for d in prefill.step():
            got[d.request_id] = list(d.token_ids)
    for i, p in enumerate(prompts):
        latents, _ = prefill.exports.pop(str(i))
        decode.add_request(EngineRequest(str(i), p, params, output_token_ids=got[str(i)]), latents)
    return got
