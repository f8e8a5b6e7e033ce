"""gpu_check's decode section: the issue's "mid" DeepSeek-V3-shaped model, decode step time against its memory floor.

Owns the mid config (1.97B parameters: hidden 2048, 4 layers, first dense, 64 routed experts top-6 in 8 groups,
2 shared, V3's MLA widths), random weights made on the device, a paged cache filled by one prefill, and the
counts per decode step: aten ops and host-syncing ops (a `TorchDispatchMode`) and, on CUDA, kernel launches
(the profiler), each step eager and replayed from a CUDA graph (`engine.cuda_graphs`; on CPU its tape stand-in).
Crosses: (device, smoke) in, rows of (check, result) out. Smoke mode runs a tiny shape on CPU.
"""
from __future__ import annotations

import collections
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _h200 import HBM_BYTES_S
from rayinfer.config import ModelConfig
from rayinfer.engine.cuda_graphs import NOT_CAPTURABLE
from rayinfer.kernels import PAGE_SIZE, probe
from rayinfer.model import DeepseekV3, ForwardBatch
from rayinfer.model.build import weight_bytes
from rayinfer.model.presets import PRESETS

MID = dict(vocab_size=32000, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
           num_hidden_layers=4, first_k_dense_replace=1, n_routed_experts=64, num_experts_per_tok=6, n_group=8,
           topk_group=4, n_shared_experts=2, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
           qk_nope_head_dim=128, v_head_dim=128, num_attention_heads=16, num_nextn_predict_layers=0)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket] += 1
        return func(*args, **(kwargs or {}))


def _model(dev: str, smoke: bool, dtype: torch.dtype) -> DeepseekV3:
    raw = dict(PRESETS["tiny"], num_nextn_predict_layers=0) if smoke else dict(PRESETS["tiny"], **MID)
    with torch.device(dev):
        model = DeepseekV3(ModelConfig.from_dict(raw)).to(dtype)
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("e_score_correction_bias"):
                p.copy_(0.02 * torch.randn(p.shape, device=dev, generator=g))
            else:
                p.copy_(torch.randn(p.shape, device=dev, generator=g) * p.shape[-1] ** -0.5)
    return model.eval()


def _batch(b: int, start: int, n: int, pages: int, caches, dev: str) -> ForwardBatch:
    tables = torch.arange(b * pages, device=dev).view(b, pages)  # sequence i owns pages [i*pages, (i+1)*pages)
    pos = torch.arange(start, start + n, device=dev).repeat(b)
    slots = (tables[:, :, None] * PAGE_SIZE + torch.arange(PAGE_SIZE, device=dev)).view(b, -1)[:, start:start + n]
    return ForwardBatch(pos, [n] * b, [start + n] * b, tables, slots.reshape(-1), caches)


class _Seq:
    """What the graph runner reads of a sequence: its pages and its tokens."""

    def __init__(self, block_ids: list[int], token_ids: list[int]):
        self.block_ids, self.token_ids = block_ids, token_ids


def _launches(fn, cuda: bool) -> str:
    """GPU kernels run and host launch calls made by one call of `fn` (the profiler); n/a on CPU."""
    if not cuda:
        return "n/a on CPU"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type.name == "CUDA")
    calls = sum(1 for e in events if e.name.startswith(("cudaLaunch", "cuLaunch", "cudaGraphLaunch")))
    return f"{kernels} ({calls} host launch calls)"


def _timed(fn, steps: int, cuda: bool) -> float:
    fn(0)  # warm-up (absorbed weights, rope tables, a graph's capture)
    torch.cuda.synchronize() if cuda else None
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        fn(i)
    torch.cuda.synchronize() if cuda else None
    return (time.perf_counter() - t0) / steps


def _graph_step(model, caches, b: int, prompt: int, pages: int, tok: torch.Tensor, dev: str):
    """(step(i) replaying decode position prompt + i from a captured graph, or None, why not)."""
    from rayinfer.engine.cuda_graphs import CudaGraphCapture, DecodeGraphs, TapeCapture

    capture = CudaGraphCapture() if dev.startswith("cuda") else TapeCapture()  # the CPU stand-in in smoke mode
    reason = capture.blocker(model, caches[0])
    if reason:
        return None, reason
    graphs = DecodeGraphs(model, caches, [b], pages * PAGE_SIZE, torch.device(dev), capture)
    seqs = [_Seq(list(range(i * pages, (i + 1) * pages)), [t] * (pages * PAGE_SIZE))  # _batch's page layout
            for i, t in enumerate(tok.tolist())]
    return (lambda i: model.logits(graphs.run([(s, prompt + i, 1) for s in seqs]))), None


def decode_rows(dev: str, smoke: bool) -> list[tuple[str, str]]:
    """Per batch size: the eager decode step and the graph-replayed one (same positions, same tokens), then prefill."""
    cuda = dev.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = _model(dev, smoke, dtype)
    cfg, rows = model.cfg, []
    prompt, steps = (16, 2) if smoke else (512, 8)
    w_bytes = weight_bytes(model) - model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    for b in ((2, 4) if smoke else (64, 256)):
        pages = -(-(prompt + steps + 2) // PAGE_SIZE)
        caches = [torch.empty(b * pages, PAGE_SIZE, cfg.kv_cache_dim, dtype=dtype, device=dev)
                  for _ in range(cfg.num_hidden_layers)]
        ids = torch.randint(5, cfg.vocab_size, (b * prompt,), device=dev)
        name = f"{'tiny' if smoke else 'mid'}, {str(dtype)[6:]}"
        kv_bytes = cfg.num_hidden_layers * b * (prompt + steps) * cfg.kv_cache_dim * caches[0].element_size()
        floor = (w_bytes + kv_bytes) / HBM_BYTES_S
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.logits(model.hidden_states(ids, _batch(b, 0, prompt, pages, caches, dev)))
            torch.cuda.synchronize() if cuda else None
            prefill_s = time.perf_counter() - t0
            tok = torch.randint(5, cfg.vocab_size, (b,), device=dev)
            batches = [_batch(b, prompt + i, 1, pages, caches, dev) for i in range(steps + 1)]
            eager = lambda i: model.logits(model.hidden_states(tok, batches[i]))  # noqa: E731
            step_s = _timed(eager, steps, cuda)
            log = _Ops()
            with log:
                want = eager(steps)
            syncs = sum(n for op, n in log.ops.items() if op in NOT_CAPTURABLE)
            rows.append((f"decode step, {b} seqs ({name})",
                         f"{step_s * 1e3:.2f} ms ({b / step_s:,.0f} tok/s); floor {floor * 1e3:.3f} ms; ratio "
                         f"{step_s / floor:.1f}x; kernels {_launches(lambda: eager(steps), cuda)}; "
                         f"aten ops {sum(log.ops.values())}; syncs {syncs}"))
            graphed, reason = _graph_step(model, caches, b, prompt, pages, tok, dev)
            if graphed is None:
                rows.append((f"decode step, {b} seqs, graphs ({name})", f"eager only: {reason}"))
            else:
                g_s = _timed(graphed, steps, cuda)
                err = probe.rel_err(graphed(steps), want)
                rows.append((f"decode step, {b} seqs, graphs ({name})",
                             f"{g_s * 1e3:.2f} ms ({b / g_s:,.0f} tok/s); ratio {g_s / floor:.1f}x; "
                             f"{step_s / g_s:.2f}x eager; kernels {_launches(lambda: graphed(steps), cuda)}; "
                             f"logits vs eager rel. err {err:.1e}" + ("" if cuda else " (CPU: tape, not a graph)")))
        rows.append((f"prefill, {b} x {prompt} ({'tiny' if smoke else 'mid'})",
                     f"{b * prompt / prefill_s:,.0f} tok/s (first call, includes warm-up)"))
        del caches
    return rows
