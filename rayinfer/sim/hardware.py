"""Hardware profiles for the simulator: one GPU's (or one CPU rank's) speeds, links and price, as data.

Owns the datasheet figures (each with its source), the efficiency factors that turn them into
achievable kernel speeds (fitted once against the kernels' published figures, `calibration.py`), and
the loading of a measured CPU profile (JSON written by `benchmarks/simulate_cpu.py`). What crosses it:
`Hardware` values into the cost model. `hbm_bytes_s` here is the spec (peak) bandwidth; the
achievable one is `hbm_bytes_s * mem_eff`. (benchmarks/gpu_check.py's `HBM_BYTES_S` = 4.3e12 for H200 is a
different figure, an achievable floor for its rows; this module does not replace it.)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class Hardware:
    name: str
    hbm_bytes_s: float          # peak memory bandwidth per device
    fp8_flops: float            # dense FP8 tensor-core peak (0: no FP8, matmuls run in bf16/fp32)
    bf16_flops: float           # dense BF16 peak (the CPU profile: the measured fp32/bf16 GEMM rate)
    memory_bytes: float         # device memory per rank
    nvlink_bytes_s: float       # intra-node all-to-all bandwidth per rank, achievable (DeepEP-measured class)
    rdma_bytes_s: float         # inter-node all-to-all bandwidth per rank, achievable
    gpus_per_node: int = 8
    gpu_hour_usd: float = 2.0
    # Efficiencies: achieved / peak, from calibration.py (GEMM: DeepGEMM's table; attention: FlashMLA's).
    gemm_compute_eff: float = 1.0
    gemm_mem_eff: float = 1.0
    attn_compute_eff: float = 1.0
    attn_mem_eff: float = 1.0
    kernel_overhead_s: float = 0.0   # per GEMM / attention call (launch, dispatch); ~0 under CUDA graphs
    step_overhead_s: float = 0.0     # per engine step: scheduling, sampling, host work not hidden
    row_overhead_s: float = 0.0      # per scheduled sequence per step (per-row host work: CPU attention, sampling)
    layer_overhead_s: float = 0.0    # per layer and microbatch: the non-GEMM kernels (norms, rope, quant, gate top-k)
    ll_latency_s: float = 0.0        # per low-latency dispatch or combine, on top of bytes / bandwidth
    weight_bytes: float = 1.0        # bytes per weight element (FP8 checkpoints: 1)
    act_bytes: float = 2.0           # bytes per activation / KV element (BF16 KV, FlashMLA's cache)
    max_memory_fraction: float = 0.9  # of memory_bytes usable for weights + KV (activations, graphs, NCCL)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and v < 0:
                raise ValueError(f"hardware {self.name!r}: {f.name}={v} must be >= 0")
        if self.bf16_flops <= 0 or self.hbm_bytes_s <= 0:
            raise ValueError(f"hardware {self.name!r}: bf16_flops and hbm_bytes_s must be > 0")

    @property
    def matmul_flops(self) -> float:
        """Peak of the precision weights are stored in (FP8 when there is FP8 and weights are 1 byte)."""
        return self.fp8_flops if self.fp8_flops and self.weight_bytes == 1 else self.bf16_flops


# GEMM/attention efficiencies fitted in calibration.py on H800 (DeepGEMM README table, FlashMLA README):
# the same kernels on other Hopper parts are assumed to reach the same fraction of their peaks. Assumed, not
# fitted: kernel_overhead_s (CUDA-graph launch), step_overhead_s (host work per step), ll_latency_s (NVSHMEM
# round trip). Calibrated ONCE on DeepSeek's service (benchmarks/simulate_deepseek.py): layer_overhead_s,
# the non-GEMM kernels of a layer, on the decode figure of 14.8k output tokens/s per node.
_HOPPER_EFF = dict(gemm_compute_eff=0.65, gemm_mem_eff=0.65, attn_compute_eff=660 / 989, attn_mem_eff=3000 / 3350,
                   kernel_overhead_s=2e-6, step_overhead_s=1e-3, ll_latency_s=10e-6,
                   layer_overhead_s=100e-6)

PROFILES: dict[str, Hardware] = {
    # H800 SXM: NVIDIA H800 datasheet (HBM3 80 GB, 3.35 TB/s; FP8 1,979 / BF16 989 dense TFLOPS, as H100 SXM).
    # Links: DeepEP README, normal kernels on H800: intranode ~153 GB/s NVLink, internode ~43-58 GB/s RDMA (CX7
    # 400 Gb/s IB per GPU); DeepSeek-V3 tech report: NVLink 160 GB/s, IB 50 GB/s per GPU.
    # Price: DeepSeek's own assumption for its day report ($2/GPU-hour rental).
    "h800": Hardware("h800", hbm_bytes_s=3.35e12, fp8_flops=1979e12, bf16_flops=989e12, memory_bytes=80e9,
                     nvlink_bytes_s=153e9, rdma_bytes_s=50e9, gpu_hour_usd=2.0, **_HOPPER_EFF),
    # H100 SXM5 datasheet: 80 GB HBM3 3.35 TB/s, FP8 1,979 / BF16 989 dense TFLOPS, NVLink 900 GB/s (bidirectional;
    # DeepEP-class all-to-all reaches ~a third of it one way); 400 Gb/s IB per GPU. Price: typical 2026 on-demand
    # rental ~$2.5/GPU-hour (assumption, not a quote).
    "h100": Hardware("h100", hbm_bytes_s=3.35e12, fp8_flops=1979e12, bf16_flops=989e12, memory_bytes=80e9,
                     nvlink_bytes_s=300e9, rdma_bytes_s=50e9, gpu_hour_usd=2.5, **_HOPPER_EFF),
    # H200 SXM datasheet: 141 GB HBM3e 4.8 TB/s, compute as H100 SXM. Price ~$3.5/GPU-hour (assumption).
    "h200": Hardware("h200", hbm_bytes_s=4.8e12, fp8_flops=1979e12, bf16_flops=989e12, memory_bytes=141e9,
                     nvlink_bytes_s=300e9, rdma_bytes_s=50e9, gpu_hour_usd=3.5, **_HOPPER_EFF),
    # B200 (HGX B200 datasheet, per GPU): 180 GB HBM3e 8 TB/s, FP8 4.5 / BF16 2.25 dense PFLOPS, NVLink 5 1.8 TB/s
    # bidirectional; ConnectX-8 800 Gb/s per GPU. Efficiencies assumed equal to Hopper's (not calibrated: no
    # published DeepGEMM/FlashMLA/DeepEP figures for it here). Price ~$6/GPU-hour (assumption).
    "b200": Hardware("b200", hbm_bytes_s=8.0e12, fp8_flops=4500e12, bf16_flops=2250e12, memory_bytes=180e9,
                     nvlink_bytes_s=600e9, rdma_bytes_s=100e9, gpu_hour_usd=6.0, **_HOPPER_EFF),
}


def load(name_or_path: str) -> Hardware:
    """A built-in profile by name, or a JSON file of `Hardware` fields (a measured CPU profile)."""
    key = name_or_path.lower()
    if key in PROFILES:
        return PROFILES[key]
    try:
        with open(name_or_path) as f:
            raw = json.load(f)
    except OSError:
        raise ValueError(f"--hardware {name_or_path!r} is neither a built-in profile ({', '.join(PROFILES)}) "
                         f"nor a readable JSON profile") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--hardware {name_or_path!r}: not valid JSON ({e})") from None
    known = {f.name for f in fields(Hardware)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"--hardware {name_or_path!r}: unknown field(s) {', '.join(unknown)}")
    return Hardware(**raw)


def save(hw: Hardware, path: str) -> None:
    with open(path, "w") as f:
        json.dump(asdict(hw), f, indent=2)


def with_price(hw: Hardware, gpu_hour_usd: float | None) -> Hardware:
    return hw if gpu_hour_usd is None else replace(hw, gpu_hour_usd=gpu_hour_usd)
