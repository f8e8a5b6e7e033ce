"""gpu_check's kernel sections: every backend's probe, the FP8 scale layouts and GEMMs, MLA decode (FlashMLA,
Triton, the reference) and varlen prefill attention, each timed against the H200's floor.

Owns the timing helper every gpu_check section uses. Crosses: (device, smoke) in; each section yields rows of
(check, result, verdict: True / False / None for information) that gpu_check prints.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator

import torch

from _h200 import BF16_FLOP_S, HBM_BYTES_S


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def seconds(fn, dev: str, repeats: int = 3) -> float:
    fn()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(dev)
    return (time.perf_counter() - t0) / repeats


def _fp8_operands(m: int, n: int, k: int, dev: str, groups: int | None = None):
    from rayinfer.kernels import fp8

    g = torch.Generator(device=dev).manual_seed(2)
    ws = [torch.randn(n, k, device=dev, generator=g) * k ** -0.5 for _ in range(groups or 1)]
    q = [fp8.quantize_weight_blocks(w) for w in ws]
    x = torch.randn(m, k, device=dev, generator=g).bfloat16()
    deq = [fp8.dequantize_weight_blocks(a, b, torch.bfloat16) for a, b in q]
    return x, torch.stack([a for a, _ in q]), torch.stack([b for _, b in q]), deq


def probes(dev: str, smoke: bool) -> Iterator[tuple]:
    """Every registered backend's probe on the GPU (smoke mode: one, to exercise the machinery): verdict, time."""
    from rayinfer.kernels import probe

    # What the decode and prefill paths need first: DeepGEMM (JIT, slow, known to crash there) last, so a budget
    # spent on it never costs the others their verdict.
    first = ["flash_mla", "triton_mla", "triton_prefill", "grouped_mm", "scaled_mm", "deep_ep"]
    names = [n for n in first if n in probe._PROBES] + [n for n in probe._PROBES if n not in first]
    names = names if not smoke else ["scaled_mm"]
    t_all = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        ok = probe.healthy(name)
        why = probe.verdicts()[name][1]
        yield (f"probe {name}", f"{'passed' if ok else 'disabled: ' + why[:140]} ({time.perf_counter() - t0:.1f}s)",
               None)
    spent = time.perf_counter() - t_all
    yield ("probes: total time", f"{spent:.0f}s for {len(names)} (budget {probe.BUDGET_S:.0f}s)",
           spent <= probe.BUDGET_S + 10)
    left = _children(os.getpid())
    yield ("probes: processes left", f"{len(left)} children of this process {left[:5]}", not left)


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(entry))
    return kids


def fp8_layouts(dev: str, smoke: bool) -> Iterator[tuple]:
    """The activation-scale layouts handed to DeepGEMM, built on this device: dense [M, K/128] and the masked
    grouped GEMM's [G, m, K/128], each MN-major with 16-byte-aligned M strides (what act_scale_layout_ok asks)."""
    from rayinfer.kernels import fp8, fp8_native

    g, m, k = 4, 37, 7168 if not smoke else 512
    _, xs = fp8.quantize_act_groups(torch.randn(g * m, k, device=dev))
    dense = fp8_native.mn_major_tma_aligned(xs)
    grouped = fp8_native.mn_major_tma_aligned(xs.view(g, m, -1))
    whys = [fp8_native.act_scale_layout_ok(dense, g * m, k), fp8_native.act_scale_layout_ok(grouped, m, k, groups=g)]
    same = torch.equal(dense, xs) and torch.equal(grouped, xs.view(g, m, -1))
    yield ("fp8 scale layouts (dense, masked grouped)", f"strides {dense.stride()} and {grouped.stride()}: "
           + ("; ".join(w for w in whys if w) or "as DeepGEMM takes them"), same and not any(whys))


def fp8_gemms(dev: str, smoke: bool) -> Iterator[tuple]:
    """Each FP8 backend found, on a DeepSeek-V3 expert shape, vs the bf16 product of the dequantised weights."""
    from rayinfer.kernels import fp8, probe

    m, n, k = (64, 256, 512) if smoke else (4096, 4096, 7168)
    x, wq, ws, deq = _fp8_operands(m, n, k, dev)
    want = (x @ deq[0].t()).float()
    for name in ["reference", *fp8.native_backends(x)]:
        if name != "reference":
            why = fp8._NATIVE[name][0](x, wq[0], ws[0])
            if why is not None or not probe.healthy(name):
                yield (f"fp8 linear {name}", why or f"disabled: {probe.verdicts()[name][1]}", None)
                continue

        def run(name=name):
            if name == "reference":
                return torch.nn.functional.linear(x, fp8.dequantize_weight_blocks(wq[0], ws[0], x.dtype))
            return fp8._NATIVE[name][1](*fp8.quantize_act_groups(x), wq[0], ws[0])

        err = probe.rel_err(run(), want)
        secs = seconds(run, dev)
        yield (f"fp8 linear {name}", f"M{m} N{n} K{k}: rel err {err:.1e}, {2 * m * n * k / secs / 1e12:.3g} TFLOP/s",
               err < 3e-2)
    e, per = (2, 16) if smoke else (8, 512)
    x, wq, ws, deq = _fp8_operands(e * per, n, k, dev, groups=e)
    counts = [per] * e
    want = torch.cat([(x[i * per:(i + 1) * per] @ deq[i].t()).float() for i in range(e)])
    for label, fn in (("contiguous", lambda: fp8.grouped_linear(x, counts, wq, ws)),
                      ("masked", lambda: fp8.grouped_linear_masked(x.view(e, per, k), counts, wq, ws).view(-1, n))):
        err = probe.rel_err(fn(), want)
        secs = seconds(fn, dev)
        used = "deep_gemm" if probe.verdicts().get("deep_gemm_grouped", (False,))[0] else \
            f"per-slot {fp8.linear_backend(x[:per], wq[0], ws[0])}"
        yield (f"fp8 grouped {label}", f"{e}x{per} rows via {used}: rel err {err:.1e}, "
               f"{2 * e * per * n * k / secs / 1e12:.3g} TFLOP/s", err < 3e-2)


def mla_decode_kernels(dev: str, smoke: bool) -> Iterator[tuple]:
    """FlashMLA and the Triton MLA kernel: enabled or why not, and timed on a V3 decode shape against the floor of
    reading the cache once, beside the reference path; Triton's every autotune config timed too."""
    from rayinfer.kernels import PAGE_SIZE, backends, mla, probe

    b, h, length = (2, 16, 128) if smoke else (64, 128, 4096)
    pages = b * length // PAGE_SIZE
    g = torch.Generator(device=dev).manual_seed(3)
    cache = torch.randn(pages, PAGE_SIZE, 576, device=dev, generator=g).bfloat16()
    table = torch.arange(pages, device=dev, dtype=torch.int32).view(b, -1)
    q = torch.randn(b, 1, h, 576, device=dev, generator=g).bfloat16()
    lens = torch.full((b,), length, device=dev, dtype=torch.int32)
    floor = cache.numel() * 2 / HBM_BYTES_S
    want = mla.reference_decode(q, cache, table, lens, 512, 0.07)
    ref_s = seconds(lambda: mla.reference_decode(q, cache, table, lens, 512, 0.07), dev)
    shape = f"B{b} h{h} len {length}"
    yield ("mla decode reference", f"{shape}: {ref_s * 1e6:.0f} us, {floor * 1e6:.0f} us floor ({ref_s / floor:.1f}x)",
           None)
    runs = {}
    if smoke:
        for name in ("flash_mla", "triton_mla"):
            yield (f"{name} decode", "not run: needs CUDA (CPU tests run the Triton kernel under the interpreter)",
                   None)
        return
    if backends.installed("flash_mla"):
        why = mla.flash_mla_api_mismatch(backends.module("flash_mla"))
        yield ("flash_mla signatures", why or "take the adapter's calls (upstream main or older)", why is None)
        if probe.healthy("flash_mla"):
            runs["flash_mla"] = lambda: mla._flash_mla(q, cache, table, lens, 512, 0.07, True, {})
    if not runs:
        yield ("flash_mla decode", "not run: " + probe.verdicts().get("flash_mla", (0, "not installed"))[1][:140], None)
    if mla.triton_usable():
        from rayinfer.kernels import triton_mla

        runs["triton_mla (autotuned)"] = lambda: triton_mla.mla_decode_triton(q, cache, table, lens, 512, 0.07)
        for c in triton_mla.CONFIGS:
            runs[f"triton_mla {c.kwargs['BLOCK_N']}tok/{c.num_warps}w/{c.num_stages}s"] = \
                lambda c=c: triton_mla.mla_decode_triton(q, cache, table, lens, 512, 0.07, config=c)
    else:
        why = probe.verdicts().get("triton_mla", (0, "Triton not installed"))[1]
        yield ("triton_mla decode", "not run: " + why[:140], None)
    for name, fn in runs.items():
        err = probe.rel_err(fn(), want)
        secs = seconds(fn, dev)
        yield (f"{name} decode", f"{shape}: {secs * 1e6:.0f} us ({cache.numel() * 2 / secs / 1e9:.0f} GB/s, "
               f"{secs / floor:.1f}x floor, {ref_s / secs:.1f}x faster than the reference); rel err {err:.1e}",
               err < 2e-2)
    chosen = mla.decode_backend(q, cache, 512)
    yield ("mla decode backend chosen", chosen, None)


def prefill_attention(dev: str, smoke: bool) -> Iterator[tuple]:
    """Varlen causal prefill attention on a mid-config shape vs its floor and vs the padded-V SDPA it replaces."""
    from rayinfer.kernels import prefill, probe

    b, n, h, dqk, dv = (3, 40, 2, 48, 32) if smoke else (16, 512, 16, 192, 128)
    backend = "torch" if smoke else prefill.default_backend(torch.device(dev))
    if backend is None:
        why = probe.verdicts().get("triton_prefill", (False, "needs CUDA and an importable, enabled Triton"))[1]
        yield ("prefill attention triton varlen", f"not run: {why}", None)
        return
    g = torch.Generator(device=dev).manual_seed(5)
    dtype = torch.float32 if smoke else torch.bfloat16
    q, k = (torch.randn(b * n, h, dqk, device=dev, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(b * n, h, dv, device=dev, generator=g).to(dtype)
    meta = prefill.Varlen.build([n] * b, [n] * b, torch.device(dev), with_blocks=backend == "triton")
    got = prefill.varlen_prefill(q, k, v, meta, dqk ** -0.5, backend=backend).float()
    want = prefill.reference(q.float(), k.float(), v.float(), meta, dqk ** -0.5)
    err = probe.rel_err(got, want)
    secs = seconds(lambda: prefill.varlen_prefill(q, k, v, meta, dqk ** -0.5, backend=backend), dev)
    qb, kb = (t.view(b, n, h, dqk).transpose(1, 2) for t in (q, k))
    vb = torch.nn.functional.pad(v, (0, dqk - dv)).view(b, n, h, dqk).transpose(1, 2)
    sdpa = seconds(lambda: torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True), dev)
    flops = b * h * n * (n + 1) / 2 * 2 * (dqk + dv)
    floor = max(flops / BF16_FLOP_S, b * n * h * (2 * dqk + 2 * dv) * q.element_size() / HBM_BYTES_S)
    yield (f"prefill attention {backend} varlen", f"{b} x {n}, h{h}, qk{dqk}/v{dv}, {str(dtype)[6:]}: "
           f"{secs * 1e6:.0f} us ({flops / secs / 1e12:.3g} TFLOP/s); floor {floor * 1e6:.0f} us, ratio "
           f"{secs / floor:.1f}x; SDPA padded-V {sdpa * 1e6:.0f} us; rel err {err:.1e}", err < 2e-2)
