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

os.environ.setdefault("RAYINFER_PROBE_BUDGET_S", "240")  # all probes together, before kernels.probe reads it
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sections' modules beside this script
import _kernel_checks as kc  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V3_CONFIG = os.path.join(ROOT, "tests", "fixtures", "deepseek_v3")
SERVE_EXAMPLE = os.path.join(ROOT, "examples", "serve_config.yaml")
ROWS: list[tuple[str, str, str]] = []  # (check, result, verdict)


def _row(check: str, result: str, ok: bool | None) -> None:
    verdict = "-" if ok is None else "PASS" if ok else "FAIL"
    ROWS.append((check, result, verdict))
    print(f"[gpu_check] {check}: {result} [{verdict}]", flush=True)


def parity(dev: str, smoke: bool) -> None:
    """Logits vs transformers fp32: ours in fp32 and bf16, with transformers' own bf16 deviation beside."""
    from rayinfer.model.hf_reference import PARITY_CONFIGS as CONFIGS
    from rayinfer.model.hf_reference import hf_checkpoint
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
        secs = kc.seconds(lambda: model(ids), dev)
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


def _rows(gen):
    """A gpu_check section from a kernel-check generator: each row printed as it comes."""
    def section(dev: str, smoke: bool) -> None:
        for check, result, ok in gen(dev, smoke):
            _row(check, result, ok)
    section.__name__ = gen.__name__
    return section


SECTIONS = [_rows(kc.probes), parity, greedy, sampling, _rows(kc.fp8_layouts), _rows(kc.fp8_gemms),
            _rows(kc.mla_decode_kernels), _rows(kc.prefill_attention), plan_v3, timings, mid_decode]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (smoke mode: same code, small sizes)")
    ap.add_argument("--budget-s", type=float, default=360.0, help="skip sections that would start after this")
    args = ap.parse_args()
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
