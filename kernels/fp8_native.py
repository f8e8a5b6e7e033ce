"""Native block-scaled FP8 GEMMs behind `kernels.fp8`: DeepGEMM and torch's `_scaled_mm`, with their preconditions.

Each adapter has a precondition check that runs before any call and returns why the call cannot be made
(None when it can): dtype, contiguity, alignment, scale shape and layout, shape limits. A native call is
made only with every precondition met and the backend's health probe (`kernels.probe`) passed. The probe
functions here run in the probe's child process. Layouts (DeepSeek's): activations x [M, K] quantised in
1x128 groups with scales [M, K/128]; weights [N, K] e4m3 with `weight_scale_inv` [ceil(N/128), K/128].
Crosses: quantised operands in, bf16 products out.
"""
from __future__ import annotations

import torch

from rayinfer.kernels import backends, probe

FP8 = torch.float8_e4m3fn
BLOCK = 128
TMA_ALIGN_BYTES = 16
MAX_ELEMS = 2**31 - 1  # 32-bit indexing in both libraries


def mn_major_tma_aligned(xs: torch.Tensor) -> torch.Tensor:
    """Activation scales [M, G] (or [B, M, G], one such matrix per group) -> the same values column-major with the
    M stride padded to 16 bytes, the layout DeepGEMM's TMA loads need, built in place: no copy lands them in another
    layout (built here: DeepGEMM's own helper segfaulted on the H200 image). A batch is one buffer [B, G, M'] seen
    as [B, M, G]: `torch.stack` of 2-D results would copy them back to row-major (K-major) strides."""
    *lead, m, g = xs.shape
    step = TMA_ALIGN_BYTES // xs.element_size()
    aligned = -(-m // step) * step
    buf = torch.empty(*lead, g, aligned, dtype=xs.dtype, device=xs.device)
    buf[..., :m] = xs.transpose(-1, -2)
    return buf[..., :m].transpose(-1, -2)


def _common(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, n_multiple: int, n_why: str) -> str | None:
    if x.dim() != 2 or w.dim() != 2:
        return f"expects 2-D operands, got x {tuple(x.shape)} and weight {tuple(w.shape)}"
    (m, k), (n, kw) = x.shape, w.shape
    if k != kw:
        return f"inner dims differ: x has {k}, weight has {kw}"
    if w.dtype != FP8:
        return f"weight dtype {w.dtype} is not {FP8}"
    if x.dtype not in (torch.bfloat16, torch.float32, torch.float16):
        return f"activation dtype {x.dtype} is not a float type"
    if k % BLOCK:
        return f"K={k} is not a multiple of {BLOCK}"
    if n % n_multiple:
        return f"N={n} is not a multiple of {n_multiple} ({n_why})"
    if not w.is_contiguous():
        return "weight is not contiguous (K-major)"
    if s.dtype != torch.float32 or tuple(s.shape) != (-(-n // BLOCK), k // BLOCK):
        return f"weight scale {s.dtype} {tuple(s.shape)} is not fp32 {(-(-n // BLOCK), k // BLOCK)}"
    if not s.is_contiguous():
        return "weight scale is not contiguous"
    if m == 0 or max(m * k, n * k, m * n) > MAX_ELEMS:
        return f"shape M={m} N={n} K={k} is outside the 32-bit-indexed range"
    if not (x.is_cuda and w.device == x.device and s.device == x.device):
        return f"operands are not on one CUDA device (x {x.device}, weight {w.device}, scale {s.device})"
    return None


def deep_gemm_preconditions(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> str | None:
    return _common(x, w, s, 64, "DeepGEMM's smallest N block")


def scaled_mm_preconditions(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> str | None:
    why = _common(x, w, s, BLOCK, "128x128 weight blocks")
    if why is None and torch.cuda.get_device_capability(x.device)[0] != 9:
        why = "block-scaled _scaled_mm is verified on Hopper (sm90) only"
    return why


def act_scale_layout_ok(xs: torch.Tensor, m: int, k: int, groups: int | None = None) -> str | None:
    """The activation scales DeepGEMM gets: fp32 [M, K/128] (or [groups, M, K/128] for the masked grouped GEMM),
    each matrix MN-major with a 16-byte-aligned M stride, the groups' matrices apart from each other."""
    want = (m, k // BLOCK) if groups is None else (groups, m, k // BLOCK)
    if xs.dtype != torch.float32 or tuple(xs.shape) != want:
        return f"activation scales {xs.dtype} {tuple(xs.shape)} are not fp32 {want}"
    s_m, s_k = xs.stride(-2), xs.stride(-1)
    if s_m != 1 or (s_k * xs.element_size()) % TMA_ALIGN_BYTES or s_k < m:
        return f"activation scales have strides {xs.stride()}, not MN-major with a 16-byte-aligned M stride"
    if groups is not None and groups > 1 and xs.stride(0) < s_k * (k // BLOCK):
        return f"activation scales have strides {xs.stride()}: the groups' matrices overlap"
    return None


def deep_gemm_linear(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    xs = mn_major_tma_aligned(xs)
    why = act_scale_layout_ok(xs, *xq.shape)
    assert why is None, why
    out = torch.empty(xq.shape[0], w.shape[0], dtype=torch.bfloat16, device=xq.device)
    backends.module("deep_gemm").fp8_gemm_nt((xq, xs), (w, s), out)
    return out


def scaled_mm_linear(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # scale_a must be MN-major (strides (1, M)); scale_b is the checkpoint's block scale transposed.
    return torch._scaled_mm(xq, w.t(), scale_a=xs.t().contiguous().t(), scale_b=s.t(), out_dtype=torch.bfloat16)


def contiguous_alignment() -> int:
    dg = backends.module("deep_gemm")
    fn = getattr(dg, "get_mk_alignment_for_contiguous_layout", None) or getattr(
        dg, "get_m_alignment_for_contiguous_layout", None)
    return int(fn()) if fn else BLOCK


def deep_gemm_grouped_contiguous(xq, xs, counts: list[int], w, s) -> torch.Tensor:
    """Rows grouped by expert (counts[e] each) -> [sum(counts), N]; segments padded to DeepGEMM's alignment."""
    align = contiguous_alignment()
    padded = [-(-c // align) * align for c in counts]
    total, dev = sum(padded), xq.device
    starts = torch.tensor([0, *padded[:-1]], device=dev).cumsum(0)
    rows = torch.cat([torch.arange(c, device=dev) + starts[e] for e, c in enumerate(counts)])  # [sum] padded row
    aq = torch.zeros(total, xq.shape[1], dtype=xq.dtype, device=dev)
    a_s = torch.ones(total, xs.shape[1], dtype=xs.dtype, device=dev)
    aq[rows], a_s[rows] = xq, xs
    m_indices = torch.full((total,), -1, dtype=torch.int32, device=dev)
    m_indices[rows] = torch.repeat_interleave(torch.arange(len(counts), device=dev, dtype=torch.int32),
                                              torch.tensor(counts, device=dev))
    out = torch.empty(total, w.shape[1], dtype=torch.bfloat16, device=dev)
    backends.module("deep_gemm").m_grouped_fp8_gemm_nt_contiguous((aq, mn_major_tma_aligned(a_s)), (w, s), out, m_indices)
    return out[rows]


def deep_gemm_grouped_masked(xq, xs, masked_m: torch.Tensor, expected_m: int, w, s) -> torch.Tensor:
    """xq [G, m, K] with the first masked_m[g] rows of group g valid -> [G, m, N] (decode's layout)."""
    g, m, k = xq.shape
    out = torch.empty(g, m, w.shape[1], dtype=torch.bfloat16, device=xq.device)
    xs_t = mn_major_tma_aligned(xs)
    why = act_scale_layout_ok(xs_t, m, k, groups=g)
    assert why is None, why
    backends.module("deep_gemm").m_grouped_fp8_gemm_nt_masked((xq, xs_t), (w, s), out, masked_m.to(torch.int32),
                                                              expected_m)
    return out


# ---- health probes: run in the child process of kernels.probe ------------------------------------------------


def _probe_operands(m=256, n=256, k=512, groups=None, device="cuda"):
    from rayinfer.kernels import fp8

    g = torch.Generator(device=device).manual_seed(0)
    shape = (n, k) if groups is None else (groups, n, k)
    w = torch.randn(*shape, device=device, generator=g) * k ** -0.5
    x = torch.randn(m, k, device=device, generator=g).bfloat16()
    if groups is None:
        wq, ws = fp8.quantize_weight_blocks(w)
    else:
        pairs = [fp8.quantize_weight_blocks(wi) for wi in w]
        wq, ws = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    xq, xs = fp8.quantize_act_groups(x)
    return x, xq, xs, wq, ws


def _agree(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if got.is_cuda:
        torch.cuda.synchronize()
    probe.check_close(got, want, what)


def _reference(xq, xs, wq, ws):
    from rayinfer.kernels import fp8

    xd = (xq.float().view(xq.shape[0], -1, BLOCK) * xs[..., None]).view(xq.shape)
    return xd @ fp8.dequantize_weight_blocks(wq, ws).t()


def probe_deep_gemm() -> None:
    _, xq, xs, wq, ws = _probe_operands()
    _agree(deep_gemm_linear(xq, xs, wq, ws), _reference(xq, xs, wq, ws), "deep_gemm fp8_gemm_nt")


def probe_scaled_mm() -> None:
    _, xq, xs, wq, ws = _probe_operands()
    _agree(scaled_mm_linear(xq, xs, wq, ws), _reference(xq, xs, wq, ws), "torch._scaled_mm block-scaled")


def probe_deep_gemm_grouped(device: str = "cuda") -> None:
    """Both grouped layouts against the reference; `device` lets CPU tests run it against a fake DeepGEMM."""
    _, xq, xs, wq, ws = _probe_operands(m=200, groups=2, device=device)
    counts = [130, 70]
    got = deep_gemm_grouped_contiguous(xq, xs, counts, wq, ws)
    want = torch.cat([_reference(xq[:130], xs[:130], wq[0], ws[0]), _reference(xq[130:], xs[130:], wq[1], ws[1])])
    _agree(got, want, "deep_gemm m_grouped_fp8_gemm_nt_contiguous")
    masked_m = [100, 37]  # a full group and a partial one: every group's valid rows are checked
    masked = deep_gemm_grouped_masked(xq.view(2, 100, -1), xs.view(2, 100, -1), torch.tensor(masked_m, device=device),
                                      64, wq, ws)
    for i, n in enumerate(masked_m):
        rows = slice(100 * i, 100 * i + n)
        _agree(masked[i, :n], _reference(xq[rows], xs[rows], wq[i], ws[i]), f"deep_gemm masked grouped GEMM group {i}")
