"""Offline generation throughput: rayinfer's engine vs transformers `generate` and vLLM, same weights, same run.

Workload (defaults): the `small` preset, 64 requests of 256-token prompts, 128 output tokens
each, greedy, ignore_eos. transformers runs the whole batch through `generate` (equal-length
prompts, so no padding). Prints output tokens/s of each, the ratio, and peak RSS.
--dtype bfloat16 runs both engines in bf16; --sample makes every request sample (temperature 0.8, top-k 50,
top-p 0.95, repetition penalty 1.1, a seed each), which exercises the sampler (transformers still runs greedy).
--vllm-python PY then runs vLLM's offline `LLM.generate` (in a subprocess of PY, through benchmarks/_vllm.py)
on the same prompt token ids, greedy, ignore_eos, timed after a warm-up, in --vllm-dtype (default bfloat16:
vLLM 0.32's CPU MLA backend packs 16-bit weights only and fails on float32); use a checkpoint with V3's MLA
widths (`--model v3mla`).
Run: python benchmarks/throughput.py [--requests 64] [--prompt-len 256] [--output-len 128] [--dtype bfloat16]
     [--model v3mla --vllm-python /path/to/vllm-venv/bin/python]
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import torch
from _peer import check_python
from _peer import offline as peer_offline  # benchmarks/ is the script's directory


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="compute dtype of both engines (transformers loads the same checkpoint in it)")
    ap.add_argument("--sample", action="store_true", help="seeded top-k/top-p/penalty sampling for every request")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--vllm-python", default=None,
                    help="a Python with vLLM installed; vLLM runs the same prompts there (default: vLLM skipped)")
    ap.add_argument("--vllm-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="vLLM's dtype (its CPU MLA backend takes no float32 weights) [bfloat16]")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads for rayinfer and transformers (default: torch's); vLLM binds its own, "
                         "one core of two by default (VLLM_CPU_OMP_THREADS_BIND)")
    args = ap.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    if args.vllm_python:
        check_python(args.vllm_python)

    from rayinfer import LLM, SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, 261, (args.requests, args.prompt_len), generator=g)
    n_out = args.requests * args.output_len

    llm = LLM(args.model, max_num_seqs=args.requests, max_num_batched_tokens=4096, dtype=args.dtype)
    if args.sample:
        params = [SamplingParams(max_tokens=args.output_len, temperature=0.8, top_k=50, top_p=0.95,
                                 repetition_penalty=1.1, seed=i, ignore_eos=True) for i in range(args.requests)]
    else:
        params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    llm.generate([prompts[0, :16].tolist()], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts.tolist(), params, use_tqdm=False)
    t_ours = time.perf_counter() - t0
    assert sum(len(o.token_ids) for o in outs) == n_out
    rss_ours = peak_rss_mib()
    print(f"model={args.model} dtype={args.dtype} sample={args.sample} requests={args.requests} "
          f"prompt={args.prompt_len} output={args.output_len} threads={torch.get_num_threads()}")
    print(f"rayinfer      {t_ours:8.2f} s  {n_out / t_ours:9.1f} output tok/s  peak RSS {rss_ours:7.0f} MiB")
    checkpoint = llm.engine.runner.checkpoint_path
    llm.shutdown()  # the peers get the machine to themselves
    if not args.skip_transformers:
        compare_transformers(args, checkpoint, prompts, outs, t_ours)
    compare_vllm(args, checkpoint, prompts, outs, t_ours)


def compare_transformers(args, checkpoint: str, prompts: torch.Tensor, outs, t_ours: float) -> None:
    from transformers import DeepseekV3ForCausalLM

    n_out = args.requests * args.output_len
    ref = DeepseekV3ForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, args.dtype)).eval()
    with torch.inference_mode():
        ref.generate(prompts[:1, :16], max_new_tokens=2, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        gen = ref.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.output_len,
                           min_new_tokens=args.output_len, do_sample=False, pad_token_id=2)
        t_ref = time.perf_counter() - t0
    hf_tokens = gen[:, args.prompt_len:]
    same = sum(o.token_ids == hf_tokens[i].tolist() for i, o in enumerate(outs))
    print(f"transformers  {t_ref:8.2f} s  {n_out / t_ref:9.1f} output tok/s  peak RSS {peak_rss_mib():7.0f} MiB "
          f"(process peak, both engines)")
    print(f"ratio rayinfer/transformers = {t_ref / t_ours:.2f}x   ({same}/{args.requests} requests token-identical)")


def compare_vllm(args, checkpoint: str, prompts: torch.Tensor, outs, t_ours: float) -> None:
    if not args.vllm_python:
        print("vllm          skipped (no --vllm-python given)")
        return
    n_out = args.requests * args.output_len
    log = os.path.join(tempfile.gettempdir(), "rayinfer-throughput-vllm.log")
    res = peer_offline(args.vllm_python, checkpoint, prompts.tolist(), args.output_len, args.vllm_dtype,
                       log=log)
    got = res["token_ids"]
    assert sum(map(len, got)) == n_out, f"vLLM returned {sum(map(len, got))} tokens, expected {n_out}"
    same = sum(o.token_ids == got[i] for i, o in enumerate(outs))
    print(f"vllm          {res['seconds']:8.2f} s  {n_out / res['seconds']:9.1f} output tok/s  "
          f"(vLLM {res['vllm_version']} LLM.generate, {res['dtype']}, own process; log {log})")
    print(f"ratio rayinfer/vllm = {res['seconds'] / t_ours:.2f}x   ({same}/{args.requests} requests token-identical)")


if __name__ == "__main__":
    main()
