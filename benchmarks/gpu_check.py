"""One-command GPU check of rayinfer on one H200: correctness, FP8 kernels, memory plan and timings, one table.

Needs no Ray (the GPU image has none). Every native kernel runs behind its health probe (a child process),
so a crashing library shows as a disabled backend, not a dead run; every section is guarded, so one
failure still prints the rest. The first section probes every registered backend (FlashMLA, Triton MLA and
prefill, DeepGEMM dense and grouped, torch's block-scaled FP8 and grouped GEMMs, DeepEP) with its own deadline
inside one budget, and checks no probe process is left; then the sections time what passed: FlashMLA and
Triton MLA decode (each autotune config too) against the cache-read floor, the FP8 GEMMs with the scale
layouts DeepGEMM takes. `--device cpu` is the smoke mode the tests run: same code, small sizes.
Run (after `python3 -m pip install -q --no-deps --no-build-isolation -e .`, from outside the repo root):
  PYTHONUNBUFFERED=1 python3 /path/to/benchmarks/gpu_check.py [--device cuda|cpu] [--budget-s 360]
DeepGEMM / FlashMLA are picked up when importable (see shared/gpu/README.md for building them).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V3_CONFIG = os.path.join(ROOT, "tests", "fixtures", "deepseek_v3")
SERVE_EXAMPLE = os.path.join(ROOT, "examples", "serve_config.yaml")
ROWS: list[tuple[str, str, str]] = []  # (check, result, verdict)
os.environ.setdefault("RAYINFER_PROBE_BUDGET_S", "240")  # all probes together, before kernels.probe reads it


def _row(check: str, result: str, ok: bool | None) -> None:
    verdict = "-" if ok is None else "PASS" if ok else "FAIL"
    ROWS.append((check, result, verdict))
    print(f"[gpu_check] {check}: {result} [{verdict}]", flush=True)


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def _seconds(fn, dev: str, repeats: int = 3) -> float:
    fn()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(dev)
    return (time.perf_counter() - t0) / repeats


def parity(dev: str, smoke: bool) -> None:
    """Logits vs transformers fp32: ours in fp32 and bf16, with transformers' own bf16 deviation beside."""
    from helpers import hf_checkpoint
    from test_parity import CONFIGS
    from transformers import DeepseekV3ForCausalLM

    from rayinfer.model import load_model

    for name, kw in CONFIGS.items():
        path = tempfile.mkdtemp(prefix="gpu-check-")
        hf_checkpoint(path, **kw)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(2, 256, (4, 64), generator=g).to(dev)  # test_bf16_cuda_parity's inputs
        with torch.no_grad():
            ref = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()(ids).logits
            hf16 = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(dev).eval()(ids).logits.float()
            ours32 = load_model(path, torch.float32, dev)(ids)
            ours16 = load_model(path, torch.bfloat16, dev)(ids).float()
        d32, dh, do = ((x - ref).abs().max().item() for x in (ours32, hf16, ours16))
        ah, ao = ((x.argmax(-1) == ref.argmax(-1)).float().mean().item() for x in (hf16, ours16))
        ok = d32 <= 1e-3 and do <= 1.5 * dh and ao >= ah - 0.01
        _row(f"parity {name}", f"fp32 {d32:.1e}; bf16 ours {do:.3f} vs transformers {dh:.3f} ({do / dh:.2f}x, "
             f"bound 1.5x); argmax ours {ao:.3f} vs transformers {ah:.3f}", ok)


def greedy(dev: str, smoke: bool) -> None:
    from transformers import DeepseekV3ForCausalLM

    from rayinfer import LLM, SamplingParams
    from rayinfer.model import resolve_model_path

    preset, n_req, n_tok = ("tiny", 4, 8) if smoke else ("small", 32, 32)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 250, (int(n),), generator=g).tolist() for n in torch.randint(4, 40, (n_req,), generator=g)]
    llm = LLM(preset, device=dev, dtype="float32")
    outs = llm.generate(prompts, SamplingParams(max_tokens=n_tok, temperature=0.0), use_tqdm=False)
    hf = DeepseekV3ForCausalLM.from_pretrained(resolve_model_path(preset), dtype=torch.float32).to(dev).eval()
    same = 0
    with torch.no_grad():
        for p, o in zip(prompts, outs):
            want = hf.generate(torch.tensor([p], device=dev), max_new_tokens=n_tok, do_sample=False)[0, len(p):].tolist()
            same += list(o.token_ids) == want[:len(o.token_ids)]
    _row("engine greedy vs transformers (fp32)", f"{same}/{len(prompts)} requests identical ({preset})",
         same == len(prompts))


def sampling(dev: str, smoke: bool) -> None:
    from rayinfer import LLM, SamplingParams

    llm = LLM("tiny", device=dev, dtype="bfloat16" if dev.startswith("cuda") else "float32")
    prompts = [[5 + i, 9, 11 + i, 40] for i in range(4 if smoke else 16)]
    sp = SamplingParams(max_tokens=8 if smoke else 32, temperature=0.8, top_p=0.9, top_k=50, seed=1234,
                        repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3)
    a = [o.token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    b = [o.token_ids for o in llm.generate(prompts[::-1], sp, use_tqdm=False)][::-1]  # other batch order
    _row("seeded sampling + penalties", f"{sum(x == y for x, y in zip(a, b))}/{len(a)} requests reproduce "
         "across batch orders", a == b)


def _fp8_operands(m: int, n: int, k: int, dev: str, groups: int | None = None):
    from rayinfer.kernels import fp8

    g = torch.Generator(device=dev).manual_seed(2)
    ws = [torch.randn(n, k, device=dev, generator=g) * k ** -0.5 for _ in range(groups or 1)]
    q = [fp8.quantize_weight_blocks(w) for w in ws]
    x = torch.randn(m, k, device=dev, generator=g).bfloat16()
    deq = [fp8.dequantize_weight_blocks(a, b, torch.bfloat16) for a, b in q]
    return x, torch.stack([a for a, _ in q]), torch.stack([b for _, b in q]), deq


def probes(dev: str, smoke: bool) -> None:
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
        _row(f"probe {name}", f"{'passed' if ok else 'disabled: ' + why[:140]} ({time.perf_counter() - t0:.1f}s)",
             None)
    spent = time.perf_counter() - t_all
    _row("probes: total time", f"{spent:.0f}s for {len(names)} (budget {probe.BUDGET_S:.0f}s)",
         spent <= probe.BUDGET_S + 10)
    left = _children(os.getpid())
    _row("probes: processes left", f"{len(left)} children of this process {left[:5]}", not left)


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


def fp8_layouts(dev: str, smoke: bool) -> None:
    """The activation-scale layouts handed to DeepGEMM, built on this device: dense [M, K/128] and the masked
    grouped GEMM's [G, m, K/128], each MN-major with 16-byte-aligned M strides (what act_scale_layout_ok asks)."""
    from rayinfer.kernels import fp8, fp8_native

    g, m, k = 4, 37, 7168 if not smoke else 512
    _, xs = fp8.quantize_act_groups(torch.randn(g * m, k, device=dev))
    dense = fp8_native.mn_major_tma_aligned(xs)
    grouped = fp8_native.mn_major_tma_aligned(xs.view(g, m, -1))
    whys = [fp8_native.act_scale_layout_ok(dense, g * m, k), fp8_native.act_scale_layout_ok(grouped, m, k, groups=g)]
    same = torch.equal(dense, xs) and torch.equal(grouped, xs.view(g, m, -1))
    _row("fp8 scale layouts (dense, masked grouped)", f"strides {dense.stride()} and {grouped.stride()}: "
         + ("; ".join(w for w in whys if w) or "as DeepGEMM takes them"), same and not any(whys))


def fp8_gemms(dev: str, smoke: bool) -> None:
    """Each FP8 backend found, on a DeepSeek-V3 expert shape, vs the bf16 product of the dequantised weights."""
    from rayinfer.kernels import fp8, probe

    m, n, k = (64, 256, 512) if smoke else (4096, 4096, 7168)
    x, wq, ws, deq = _fp8_operands(m, n, k, dev)
    want = (x @ deq[0].t()).float()
    for name in ["reference", *fp8.native_backends(x)]:
        if name != "reference":
            why = fp8._NATIVE[name][0](x, wq[0], ws[0])
            if why is not None or not probe.healthy(name):
                _row(f"fp8 linear {name}", why or f"disabled: {probe.verdicts()[name][1]}", None)
                continue

        def run(name=name):
            if name == "reference":
                return torch.nn.functional.linear(x, fp8.dequantize_weight_blocks(wq[0], ws[0], x.dtype))
            return fp8._NATIVE[name][1](*fp8.quantize_act_groups(x), wq[0], ws[0])

        err = probe.rel_err(run(), want)
        secs = _seconds(run, dev)
        _row(f"fp8 linear {name}", f"M{m} N{n} K{k}: rel err {err:.1e}, {2 * m * n * k / secs / 1e12:.3g} TFLOP/s",
             err < 3e-2)
    e, per = (2, 16) if smoke else (8, 512)
    x, wq, ws, deq = _fp8_operands(e * per, n, k, dev, groups=e)
    counts = [per] * e
    want = torch.cat([(x[i * per:(i + 1) * per] @ deq[i].t()).float() for i in range(e)])
    for label, fn in (("contiguous", lambda: fp8.grouped_linear(x, counts, wq, ws)),
                      ("masked", lambda: fp8.grouped_linear_masked(x.view(e, per, k), counts, wq, ws).view(-1, n))):
        err = probe.rel_err(fn(), want)
        secs = _seconds(fn, dev)
        used = "deep_gemm" if probe.verdicts().get("deep_gemm_grouped", (False,))[0] else \
            f"per-slot {fp8.linear_backend(x[:per], wq[0], ws[0])}"
        _row(f"fp8 grouped {label}", f"{e}x{per} rows via {used}: rel err {err:.1e}, "
             f"{2 * e * per * n * k / secs / 1e12:.3g} TFLOP/s", err < 3e-2)


def mla_decode_kernels(dev: str, smoke: bool) -> None:
    """FlashMLA and the Triton MLA kernel: enabled or why not, and timed on a V3 decode shape against the floor of
    reading the cache once, beside the reference path; Triton's every autotune config timed too."""
    from _h200 import HBM_BYTES_S

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
    ref_s = _seconds(lambda: mla.reference_decode(q, cache, table, lens, 512, 0.07), dev)
    shape = f"B{b} h{h} len {length}"
    _row("mla decode reference", f"{shape}: {ref_s * 1e6:.0f} us, {floor * 1e6:.0f} us floor ({ref_s / floor:.1f}x)",
         None)
    runs = {}
    if smoke:
        for name in ("flash_mla", "triton_mla"):
            _row(f"{name} decode", "not run: needs CUDA (CPU tests run the Triton kernel under the interpreter)", None)
        return
    if backends.installed("flash_mla"):
        why = mla.flash_mla_api_mismatch(backends.module("flash_mla"))
        _row("flash_mla signatures", why or "take the adapter's calls (upstream main or older)", why is None)
        if probe.healthy("flash_mla"):
            runs["flash_mla"] = lambda: mla._flash_mla(q, cache, table, lens, 512, 0.07, True, {})
    if not runs:
        _row("flash_mla decode", "not run: " + probe.verdicts().get("flash_mla", (0, "not installed"))[1][:140], None)
    if mla.triton_usable():
        from rayinfer.kernels import triton_mla

        runs["triton_mla (autotuned)"] = lambda: triton_mla.mla_decode_triton(q, cache, table, lens, 512, 0.07)
        for c in triton_mla.CONFIGS:
            runs[f"triton_mla {c.kwargs['BLOCK_N']}tok/{c.num_warps}w/{c.num_stages}s"] = \
                lambda c=c: triton_mla.mla_decode_triton(q, cache, table, lens, 512, 0.07, config=c)
    else:
        _row("triton_mla decode", "not run: " + probe.verdicts().get("triton_mla", (0, "Triton not installed"))[1][:140],
             None)
    for name, fn in runs.items():
        err = probe.rel_err(fn(), want)
        secs = _seconds(fn, dev)
        _row(f"{name} decode", f"{shape}: {secs * 1e6:.0f} us ({cache.numel() * 2 / secs / 1e9:.0f} GB/s, "
             f"{secs / floor:.1f}x floor, {ref_s / secs:.1f}x faster than the reference); rel err {err:.1e}",
             err < 2e-2)
    chosen = mla.decode_backend(q, cache, 512)
    _row("mla decode backend chosen", chosen, None)


def prefill_attention(dev: str, smoke: bool) -> None:
    """Varlen causal prefill attention on a mid-config shape vs its floor and vs the padded-V SDPA it replaces."""
    from _h200 import BF16_FLOP_S, HBM_BYTES_S

    from rayinfer.kernels import prefill, probe

    b, n, h, dqk, dv = (3, 40, 2, 48, 32) if smoke else (16, 512, 16, 192, 128)
    backend = "torch" if smoke else prefill.default_backend(torch.device(dev))
    if backend is None:
        why = probe.verdicts().get("triton_prefill", (False, "needs CUDA and an importable, enabled Triton"))[1]
        _row("prefill attention triton varlen", f"not run: {why}", None)
        return
    g = torch.Generator(device=dev).manual_seed(5)
    dtype = torch.float32 if smoke else torch.bfloat16
    q, k = (torch.randn(b * n, h, dqk, device=dev, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(b * n, h, dv, device=dev, generator=g).to(dtype)
    meta = prefill.Varlen.build([n] * b, [n] * b, torch.device(dev), with_blocks=backend == "triton")
    got = prefill.varlen_prefill(q, k, v, meta, dqk ** -0.5, backend=backend).float()
    want = prefill.reference(q.float(), k.float(), v.float(), meta, dqk ** -0.5)
    err = probe.rel_err(got, want)
    secs = _seconds(lambda: prefill.varlen_prefill(q, k, v, meta, dqk ** -0.5, backend=backend), dev)
    qb, kb = (t.view(b, n, h, dqk).transpose(1, 2) for t in (q, k))
    vb = torch.nn.functional.pad(v, (0, dqk - dv)).view(b, n, h, dqk).transpose(1, 2)
    sdpa = _seconds(lambda: torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True), dev)
    flops = b * h * n * (n + 1) / 2 * 2 * (dqk + dv)
    floor = max(flops / BF16_FLOP_S, b * n * h * (2 * dqk + 2 * dv) * q.element_size() / HBM_BYTES_S)
    _row(f"prefill attention {backend} varlen", f"{b} x {n}, h{h}, qk{dqk}/v{dv}, {str(dtype)[6:]}: "
         f"{secs * 1e6:.0f} us ({flops / secs / 1e12:.3g} TFLOP/s); floor {floor * 1e6:.0f} us, ratio "
         f"{secs / floor:.1f}x; SDPA padded-V {sdpa * 1e6:.0f} us; rel err {err:.1e}", err < 2e-2)


def plan_v3(dev: str, smoke: bool) -> None:
    from rayinfer.config import ServeConfig
    from rayinfer.plan import plan

    rows = {p.role: p for p in plan(ServeConfig.from_file(SERVE_EXAMPLE, model=V3_CONFIG), 80 * 2**30)}
    pre, dec = rows["prefill"].weight_bytes_per_rank / 1e9, rows["decode"].weight_bytes_per_rank / 1e9
    _row("rayinfer plan V3 (FP8, example topology)", f"prefill {pre:.1f} GB/rank (18 slots), decode {dec:.1f} GB/rank "
         "(9 slots); published 65.0 / 42.1", abs(pre / 65.0 - 1) <= 0.03 and abs(dec / 42.1 - 1) <= 0.03)


def timings(dev: str, smoke: bool) -> None:
    from rayinfer import LLM, SamplingParams
    from rayinfer.model import load_model

    preset = "tiny" if smoke else "small"
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    model = load_model(preset, dtype, dev)
    ids = torch.randint(5, 250, (1, 32) if smoke else (8, 512), device=dev)
    with torch.no_grad():
        secs = _seconds(lambda: model(ids), dev)
    _row(f"prefill forward ({preset})", f"{ids.numel()} tokens in {secs * 1e3:.1f} ms: {ids.numel() / secs:,.0f} tok/s",
         None)
    llm = LLM(preset, device=dev, dtype=str(dtype).replace("torch.", ""))
    n_req, n_tok = (2, 4) if smoke else (64, 64)
    prompts = [[5 + i, 9, 11, 40] for i in range(n_req)]
    sp = SamplingParams(max_tokens=n_tok, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    llm.generate(prompts, sp, use_tqdm=False)
    secs = time.perf_counter() - t0
    _row(f"decode ({preset})", f"{n_req} requests x {n_tok} tokens: {n_req * n_tok / secs:,.0f} output tok/s, "
         f"{secs / n_tok * 1e3:.1f} ms/step", None)


def mid_decode(dev: str, smoke: bool) -> None:
    """The issue's mid config: decode step vs its memory floor, kernels and syncs per step, prefill tok/s."""
    from _mid_decode import decode_rows

    for check, result in decode_rows(dev, smoke):
        _row(check, result, None)


SECTIONS = [probes, parity, greedy, sampling, fp8_layouts, fp8_gemms, mla_decode_kernels, prefill_attention, plan_v3,
            timings, mid_decode]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (smoke mode: same code, small sizes)")
    ap.add_argument("--budget-s", type=float, default=360.0, help="skip sections that would start after this")
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    smoke = not args.device.startswith("cuda")
    if not smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --device cpu for the smoke mode", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    for section in SECTIONS:
        if time.perf_counter() - t0 > args.budget_s:
            _row(section.__name__, f"skipped: past the {args.budget_s:.0f}s budget", None)
            continue
        try:
            section(args.device, smoke)
        except Exception as e:  # one broken section must not hide the others
            _row(section.__name__, f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}", False)
    gpu = torch.cuda.get_device_name() if not smoke else "cpu (smoke mode)"
    print(f"\nrayinfer gpu_check on {gpu}, torch {torch.__version__}, {time.perf_counter() - t0:.0f}s")
    widths = [max(len(r[i]) for r in ROWS + [("check", "result", "verdict")]) for i in range(3)]
    for r in [("check", "result", "verdict"), *ROWS]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 1 if any(v == "FAIL" for _, _, v in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
