"""Prefill throughput of one full-sequence forward: rayinfer vs transformers on the same weights.

Both models load the `small` preset checkpoint (or --model PATH) in the same process and run the
same batch of prompts without a cache; we report tokens/s for each and the ratio.
Run: python benchmarks/forward.py [--model small] [--batch 4] [--seq 256] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    from transformers import DeepseekV3ForCausalLM

    from rayinfer.model import load_model, resolve_model_path

    dtype = getattr(torch, args.dtype)
    path = resolve_model_path(args.model)
    ours = load_model(path, dtype=dtype)
    ref = DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, ours.cfg.vocab_size, (args.batch, args.seq), generator=g)
    tokens = ids.numel()
    with torch.inference_mode():
        diff = (ours(ids).float() - ref(ids).logits.float()).abs().max().item()
        t_ours = _time(lambda: ours(ids), args.repeats)
        t_ref = _time(lambda: ref(ids, use_cache=False), args.repeats)
    print(f"model={args.model} dtype={args.dtype} batch={args.batch} seq={args.seq} threads={torch.get_num_threads()}")
    print(f"{'engine':<14}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'rayinfer':<14}{t_ours:>10.3f}{tokens / t_ours:>12.0f}")
    print(f"{'transformers':<14}{t_ref:>10.3f}{tokens / t_ref:>12.0f}")
    print(f"ratio rayinfer/transformers = {t_ref / t_ours:.2f}x   (max |dlogit| between them {diff:.1e})")


if __name__ == "__main__":
    main()
