"""Numerical parity with transformers' DeepseekV3ForCausalLM, and of the absorbed cached path with the full forward."""
import pytest
import torch

from helpers import YARN, PagedCache, hf_checkpoint, quantize_checkpoint_fp8

from rayinfer.model import load_model
from rayinfer.model.hf_reference import PARITY_CONFIGS

TOL = 1e-4
CONFIGS = PARITY_CONFIGS  # the checkpoint shapes, shared with benchmarks/gpu_check.py


def _prompts(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g) for n in lengths]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    hf = hf_checkpoint(path, **CONFIGS[request.param])
    return request.param, hf, load_model(path), path


def test_full_forward_matches_transformers(pair):
    name, hf, ours, _ = pair
    ids = torch.stack(_prompts(hf.config.vocab_size, [24] * 4))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    print(f"\n[parity] {name}: full forward max |dlogit| = {diff:.2e}")
    assert diff <= TOL


def test_absorbed_incremental_matches_full(pair):
    """Token-by-token decoding over the paged latent cache reproduces full-sequence logits."""
    name, _, ours, _ = pair
    lengths = [5, 70, 33]  # 70 crosses a 64-token page
    prompts = _prompts(ours.cfg.vocab_size, lengths, seed=1)
    cache = PagedCache(ours, lengths)
    worst = 0.0
    with torch.no_grad():
        full = [ours(p[None])[0] for p in prompts]
        # first 3 tokens of each sequence as one prefill chunk (naive path writing the cache) ...
        batch = cache.batch([0, 1, 2], [0, 0, 0], [3, 3, 3])
        logits = ours(torch.cat([p[:3] for p in prompts]), batch)
        for i in range(3):
            worst = max(worst, (logits[i * 3:(i + 1) * 3] - full[i][:3]).abs().max().item())
        # ... then one token per step for every sequence still running (absorbed path, batched).
        for t in range(3, max(lengths)):
            live = [i for i, n in enumerate(lengths) if t < n]
            batch = cache.batch(live, [t] * len(live), [1] * len(live))
            logits = ours(torch.stack([prompts[i][t] for i in live]), batch)
            for row, i in enumerate(live):
                worst = max(worst, (logits[row] - full[i][t]).abs().max().item())
    print(f"\n[parity] {name}: absorbed incremental vs full max |dlogit| = {worst:.2e}")
    assert worst <= TOL


def test_chunked_prefill_over_cached_prefix(pair):
    """A prefill chunk attending over an already cached prefix (naive path reading pages)."""
    name, _, ours, _ = pair
    prompt = _prompts(ours.cfg.vocab_size, [100], seed=2)[0]
    cache = PagedCache(ours, [100])
    with torch.no_grad():
        full = ours(prompt[None])[0]
        ours(prompt[:40], cache.batch([0], [0], [40]))
        tail = ours(prompt[40:], cache.batch([0], [40], [60]))
    assert (tail - full[40:]).abs().max().item() <= TOL


def test_fp8_checkpoint_matches_transformers_on_dequantised_weights(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    src, dst, deq = str(tmp_path / "orig"), str(tmp_path / "fp8"), str(tmp_path / "dequantised")
    # 128-aligned projections so both the dequantise-at-load and the keep-FP8 paths are exercised.
    hf = hf_checkpoint(src, hidden_size=128, moe_intermediate_size=128, intermediate_size=256, q_lora_rank=128,
                       kv_lora_rank=128, qk_nope_head_dim=16, v_head_dim=16, rope_parameters=YARN)
    quantize_checkpoint_fp8(src, dst, deq)
    ref = DeepseekV3ForCausalLM.from_pretrained(deq, dtype=torch.float32).eval()
    ids = torch.stack(_prompts(hf.config.vocab_size, [20] * 3))
    with torch.no_grad():
        want = ref(ids).logits
        for keep in (False, True):
            model = load_model(dst, keep_fp8=keep)
            kept = [n for n, p in model.named_parameters() if p.dtype == torch.float8_e4m3fn]
            assert bool(kept) == keep
            diff = (model(ids) - want).abs().max().item()
            print(f"\n[parity] fp8 keep_fp8={keep} ({len(kept)} fp8 tensors): max |dlogit| = {diff:.2e}")
            assert diff <= TOL
        # the quantisation itself is visible: the original weights give different logits
        assert (hf(ids).logits - want).abs().max().item() > 10 * TOL


def bf16_deviation(path: str, device: str) -> dict[str, float]:
    """Max |logit - transformers fp32| for transformers' bf16 and ours, and argmax agreement of each."""
    from transformers import DeepseekV3ForCausalLM

    ids = torch.stack(_prompts(256, [64] * 4)).to(device)
    with torch.no_grad():
        ref = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()(ids).logits
        hf = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()(ids).logits.float()
        ours = load_model(path, dtype=torch.bfloat16, device=device)(ids).float()
    return {"hf": (hf - ref).abs().max().item(), "ours": (ours - ref).abs().max().item(),
            "hf_mean": (hf - ref).abs().mean().item(), "ours_mean": (ours - ref).abs().mean().item(),
            "hf_argmax": (hf.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "ours_argmax": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bf16_cuda_parity(tmp_path, name):
    """Issue 10 (4): in bf16 on CUDA, at most 1.5x transformers' own bf16 deviation from its fp32 logits, and
    argmax agreement no worse than transformers' bf16 minus 1 point."""
    hf_checkpoint(str(tmp_path), **CONFIGS[name])
    d = bf16_deviation(str(tmp_path), "cuda")
    print(f"\n[parity] cuda bf16 {name}: {d}")
    assert d["ours"] <= 1.5 * d["hf"]
    assert d["ours_argmax"] >= d["hf_argmax"] - 0.01


def test_bf16_cpu_deviation_within_transformers_bound(tmp_path):
    """The same bound on CPU (a proxy: CPU bf16 kernels differ from CUDA's) on the YaRN config, where
    bf16 rope tables once made ours 10x worse than transformers. The mean deviation is held to the bound
    too: a single max over 256 positions of two rounding-noise processes swings by ~1.5x on its own."""
    hf_checkpoint(str(tmp_path), **CONFIGS["yarn-groups-1dense"])
    d = bf16_deviation(str(tmp_path), "cpu")
    print(f"\n[parity] cpu bf16 yarn-groups-1dense: {d}")
    assert d["ours_mean"] <= 1.5 * d["hf_mean"]
    assert d["ours"] <= 2.0 * d["hf"]
    assert d["ours_argmax"] >= d["hf_argmax"] - 0.01
