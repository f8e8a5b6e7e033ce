"""Paged MLA decode attention over the compressed (latent + rope key) cache.

The cache holds, per token, the normalised KV latent (kv_lora_rank values) followed by the
rope key, in pages of 64 tokens: `kv_cache [num_pages, 64, D]`. Queries come already absorbed
(`q [B, s_q, h, D]`: latent-space nope part + rope part), so one cached row serves as key (all
D values) and value (the first `dv` values). FlashMLA is used on Hopper when installed, its health
probe passed and its shapes hold (bf16, page 64, D 576 = 512 latent + 64 rope, dv 512); its
schedule metadata is built once per step (`step_cache`, shared by every layer) not once per layer.
Else, on CUDA with one query per sequence, the Triton split-KV kernel (`triton_mla`) once its probe
passed; else the reference below (gathers the context; products in the cache dtype on CPU, fp32 on a GPU).
"""
from __future__ import annotations

import torch

from rayinfer.kernels import PAGE_SIZE, backends, probe

FLASH_MLA_D, FLASH_MLA_DV = 576, 512


def triton_usable() -> bool:
    """The Triton split-KV kernel is installed, not disabled, and agreed with the reference in its probe."""
    return backends.triton_installed("triton_mla") and probe.healthy("triton_mla")


def flash_mla_preconditions(q: torch.Tensor, kv_cache: torch.Tensor, dv: int) -> str | None:
    if q.dtype != torch.bfloat16 or kv_cache.dtype != torch.bfloat16:
        return f"q {q.dtype} / cache {kv_cache.dtype} are not bfloat16"
    if q.shape[-1] != FLASH_MLA_D or kv_cache.shape[-1] != FLASH_MLA_D or dv != FLASH_MLA_DV:
        return f"head dims q {q.shape[-1]}, cache {kv_cache.shape[-1]}, dv {dv} are not {FLASH_MLA_D}/{FLASH_MLA_DV}"
    if kv_cache.dim() != 3 or kv_cache.shape[1] != PAGE_SIZE:
        return f"cache shape {tuple(kv_cache.shape)} is not [pages, {PAGE_SIZE}, D]"
    return None


def decode_backend(q: torch.Tensor, kv_cache: torch.Tensor, dv: int) -> str:
    """The path `mla_decode` takes for these operands: "flash_mla", "triton" or "reference"."""
    if flash_mla_preconditions(q, kv_cache, dv) is None and backends.usable("flash_mla", q, kv_cache):
        return "flash_mla"
    if q.shape[1] == 1 and q.is_cuda and kv_cache.is_cuda and triton_usable():
        return "triton"
    return "reference"


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
               dv: int, softmax_scale: float, causal: bool = True, step_cache: dict | None = None,
               derived: dict | None = None) -> torch.Tensor:
    """q [B, s_q, h, D]; kv_cache [P, 64, D]; block_table [B, M]; cache_seqlens [B] -> out [B, s_q, h, dv].

    Query i of s_q sits at position cache_seqlens - s_q + i and (when causal) sees keys up to it.
    `step_cache`: a dict living for one step, where per-step kernel metadata is kept across layers.
    `derived`: a dict living for one step, where the reference keeps the gather rows and masks every layer shares.
    """
    backend = decode_backend(q, kv_cache, dv)
    if backend == "flash_mla":
        return _flash_mla(q, kv_cache, block_table, cache_seqlens, dv, softmax_scale, causal,
                          {} if step_cache is None else step_cache)
    if backend == "triton":
        from rayinfer.kernels.triton_mla import mla_decode_triton

        return mla_decode_triton(q, kv_cache, block_table, cache_seqlens, dv, softmax_scale)
    return reference_decode(q, kv_cache, block_table, cache_seqlens, dv, softmax_scale, causal, derived)


def reference_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                     dv: int, softmax_scale: float, causal: bool = True, derived: dict | None = None) -> torch.Tensor:
    """`mla_decode`'s reference, called directly: it never chooses a backend, so never starts a probe."""
    b, s_q, h, d = q.shape
    derived = {} if derived is None else derived
    key = ("mla_reference", s_q, causal)
    if key not in derived:  # what only the step's lengths and tables decide: built by the first layer
        derived[key] = _reference_gather(block_table, cache_seqlens, s_q, causal, kv_cache.device)
    rows, hidden = derived[key]
    kv = kv_cache.view(-1, d).index_select(0, rows).view(b, -1, d)  # [B, S, D]
    # On a CPU the products run in the cache's dtype: its bf16 matmuls accumulate in fp32 and round only
    # their outputs (as every bf16 linear layer does), while copying the context to fp32 cost 2-8x the
    # attention itself. Elsewhere (the GPU fallback) they run in fp32. The softmax is always fp32.
    if kv.is_cuda:
        kv = kv.float()
    scores = torch.bmm(q.to(kv.dtype).reshape(b, s_q * h, d), kv.transpose(1, 2)).float() * softmax_scale
    probs = scores.view(b, s_q, h, -1).masked_fill_(hidden, float("-inf")).softmax(dim=-1).view(b, s_q * h, -1)
    # All D columns then the first dv: cheaper than copying the value slice of every row.
    return torch.bmm(probs.to(kv.dtype), kv)[..., :dv].reshape(b, s_q, h, dv).to(q.dtype)


def _reference_gather(block_table, cache_seqlens, s_q: int, causal: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat cache rows [B * S] of every sequence's context, keys hidden from each query [B, s_q, 1, S])."""
    b = block_table.shape[0]
    s_max = block_table.shape[1] * PAGE_SIZE
    lens = cache_seqlens.to(device).long()
    key_pos = torch.arange(s_max, device=device)  # [S]
    rows = block_table[:, key_pos // PAGE_SIZE] * PAGE_SIZE + key_pos % PAGE_SIZE  # [B, S] cache rows
    # Positions past a sequence's length read its own first row instead of whatever the page holds
    # (maybe NaN), so their zero attention weight times a finite value stays zero.
    rows = torch.where(key_pos[None, :] < lens[:, None], rows, rows[:, :1])
    limit = lens[:, None] - s_q + 1 + torch.arange(s_q, device=device)[None] if causal else \
        lens[:, None].expand(b, s_q)  # [B, s_q] keys visible to each query
    return rows.reshape(-1), (key_pos[None, None, :] >= limit[:, :, None]).unsqueeze(2)


def _flash_mla_metadata(cache_seqlens, block_table, q_rows: int) -> tuple:
    """(lengths, table) as given, their int32 copies, and FlashMLA's schedule over them."""
    seqlens = cache_seqlens.to(torch.int32)
    # Upstream main returns (schedule, None) and wants num_splits=None; older releases return two tensors.
    meta, splits = backends.module("flash_mla").get_mla_metadata(seqlens, q_rows, 1)
    return cache_seqlens, block_table, seqlens, block_table.to(torch.int32), meta, splits


def refresh_step_cache(step: dict) -> None:
    """Rebuilds, in place, the per-step metadata `step` holds from the lengths and tables it was first built from.

    For a captured decode graph: the metadata is built outside the graph (it schedules over the step's
    lengths) into the tensors the graph reads. Upstream FlashMLA's schedule object cannot be rebuilt in
    place: a `NotImplementedError` says so, and the caller stays eager."""
    for key, (lens, table, *built) in step.items():
        if not isinstance(built[2], torch.Tensor):
            raise NotImplementedError(f"{key[0]} metadata of type {type(built[2]).__name__} cannot be rebuilt in place")
        for dst, src in zip(built, _flash_mla_metadata(lens, table, key[1])[2:]):
            dst.copy_(src)


def _flash_mla(q, kv_cache, block_table, cache_seqlens, dv, softmax_scale, causal, step: dict):
    fm = backends.module("flash_mla")
    key = ("flash_mla", q.shape[1] * q.shape[2])
    if key not in step:
        step[key] = _flash_mla_metadata(cache_seqlens, block_table, key[1])
    _, _, seqlens, table, meta, splits = step[key]
    out, _lse = fm.flash_mla_with_kvcache(q, kv_cache.unsqueeze(2), table, seqlens, dv, meta, splits,
                                          softmax_scale=softmax_scale, causal=causal)
    return out


def probe_batch(d: int = FLASH_MLA_D, h: int = 16, device: str = "cuda"):
    """A small paged decode batch for health probes: (q [3, 1, h, d], cache, block table, lengths), bf16."""
    g = torch.Generator(device=device).manual_seed(0)
    lens = [1, 70, 200]
    pages = sum(-(-n // PAGE_SIZE) for n in lens)
    cache = torch.randn(pages, PAGE_SIZE, d, device=device, generator=g).bfloat16()
    width = max(-(-n // PAGE_SIZE) for n in lens)
    table, start = torch.zeros(len(lens), width, dtype=torch.int32, device=device), 0
    for i, n in enumerate(lens):
        k = -(-n // PAGE_SIZE)
        table[i, :k] = torch.arange(start, start + k, device=device)
        start += k
    q = torch.randn(len(lens), 1, h, d, device=device, generator=g).bfloat16()
    return q, cache, table, torch.tensor(lens, device=device, dtype=torch.int32)


def check_against_reference(name: str, got: torch.Tensor, q, cache, table, seqlens, dv: int, scale: float) -> None:
    """In a probe child: `got` against the fp32 reference, which must not select a backend (that would probe)."""
    probe.check_close(got, reference_decode(q.float(), cache.float(), table, seqlens, dv, scale), name)


# How `_flash_mla` calls FlashMLA: these positionally, then softmax_scale and causal by keyword.
FLASH_MLA_POSITIONAL = ("q", "k_cache", "block_table", "cache_seqlens", "head_dim_v", "tile_scheduler_metadata",
                        "num_splits")


def flash_mla_api_mismatch(fm) -> str | None:
    """Why the installed FlashMLA's Python signatures do not take the calls `_flash_mla` makes, or None."""
    import inspect

    try:
        params = list(inspect.signature(fm.flash_mla_with_kvcache).parameters.values())
        meta = list(inspect.signature(fm.get_mla_metadata).parameters.values())
    except (AttributeError, TypeError, ValueError) as e:
        return f"FlashMLA has no inspectable get_mla_metadata / flash_mla_with_kvcache: {e}"
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < len(FLASH_MLA_POSITIONAL):
        return f"flash_mla_with_kvcache takes {len(positional)} positional arguments, not {len(FLASH_MLA_POSITIONAL)}"
    names = {p.name for p in params}
    if not {"softmax_scale", "causal"} <= names and not any(p.kind == p.VAR_KEYWORD for p in params):
        return f"flash_mla_with_kvcache takes no softmax_scale / causal keyword: {sorted(names)}"
    takes = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in meta)
    if takes < 3 and not any(p.kind == p.VAR_POSITIONAL for p in meta):
        return f"get_mla_metadata takes {takes} positional arguments, not (cache_seqlens, q rows, kv heads)"
    return None


def probe_flash_mla() -> None:
    """Health probe (run in a child by kernels.probe): FlashMLA's signatures, then FlashMLA against the reference on
    a small paged batch."""
    why = flash_mla_api_mismatch(backends.module("flash_mla"))
    if why is not None:
        raise SystemExit(why)
    q, cache, table, seqlens = probe_batch()
    got = _flash_mla(q, cache, table, seqlens, FLASH_MLA_DV, 0.07, True, {})
    check_against_reference("flash_mla", got, q, cache, table, seqlens, FLASH_MLA_DV, 0.07)
