"""The published kernel figures the GPU efficiency factors are fitted to, and the fit.

Owns the data (DeepGEMM's dense FP8 GEMM table on H800, FlashMLA's and DeepEP's headline figures)
and `fit_gemm`, which finds the (compute, memory) efficiencies that make the roofline
max(flops / (eff_c * peak), bytes / (eff_m * bandwidth)) reproduce DeepGEMM's table best (least
squares in log time). The fitted values are written into `hardware._HOPPER_EFF` once; the test
checks they still are the fit. Nothing here runs on the simulator's hot path.
"""
from __future__ import annotations

import math

# DeepGEMM README (deepseek-ai/DeepGEMM, the Feb-2025 table "normal GEMMs for dense models", H800 SXM5,
# FP8 1x128 / 128x128 scales, BF16 out): (M, N, K, achieved TFLOPS). Transcribed; the shapes are
# DeepSeek-V3's own projections at decode (M 64/128) and prefill (M 4096) sizes.
DEEPGEMM_H800 = [
    (64, 2112, 7168, 206), (64, 24576, 1536, 289), (64, 32768, 512, 219), (64, 7168, 16384, 336),
    (64, 4096, 7168, 287), (64, 7168, 2048, 295),
    (128, 2112, 7168, 352), (128, 24576, 1536, 535), (128, 32768, 512, 358), (128, 7168, 16384, 645),
    (128, 4096, 7168, 533), (128, 7168, 2048, 510),
    (4096, 2112, 7168, 1127), (4096, 24576, 1536, 1212), (4096, 32768, 512, 775), (4096, 7168, 16384, 1520),
    (4096, 4096, 7168, 1410), (4096, 7168, 2048, 1168),
]
# FlashMLA README: up to 3000 GB/s memory-bound and 660 TFLOPS (BF16) compute-bound on H800 SXM5.
FLASHMLA_H800 = dict(mem_bytes_s=3000e9, compute_flops=660e12)
# DeepEP README, low-latency kernels on H800 (CX7 400 Gb/s IB), 128 tokens per rank, hidden 7168, top-8,
# FP8 dispatch / BF16 combine: EP size -> (dispatch us, dispatch GB/s, combine us, combine GB/s).
DEEPEP_LL_H800 = {8: (77, 98, 114, 127), 16: (118, 63, 195, 80), 32: (155, 48, 273, 57),
                  64: (173, 43, 314, 50), 128: (192, 39, 369, 39), 256: (194, 39, 360, 40)}
# DeepEP README, normal kernels (prefill, 4096 tokens, top-4 groups / top-8 experts): intranode NVLink
# ~153-158 GB/s; internode RDMA bottleneck bandwidth 43-58 GB/s (EP16 43, EP32 58, EP64 51 dispatch).
DEEPEP_NORMAL_H800 = dict(nvlink_bytes_s=153e9, rdma_bytes_s={16: 43e9, 32: 58e9, 64: 51e9})

H800_PEAK = dict(fp8_flops=1979e12, hbm_bytes_s=3.35e12)


def gemm_time(m: int, n: int, k: int, eff_c: float, eff_m: float, peak_flops: float, bw: float,
              w_bytes: float = 1.0, a_bytes: float = 1.0, out_bytes: float = 2.0) -> float:
    """Roofline time of an [m, k] x [k, n] GEMM: FP8 operands and a BF16 output by default."""
    flops = 2.0 * m * n * k
    moved = m * k * a_bytes + n * k * w_bytes + m * n * out_bytes
    return max(flops / (eff_c * peak_flops), moved / (eff_m * bw))


def fit_gemm(table=DEEPGEMM_H800, peak=H800_PEAK) -> tuple[float, float, float]:
    """(eff_c, eff_m, rms log error) minimising the log-time error over `table`, on a 0.01 grid."""
    best = None
    for ic in range(30, 101):
        for im in range(30, 101):
            ec, em = ic / 100, im / 100
            err = 0.0
            for m, n, k, tflops in table:
                t_pub = 2.0 * m * n * k / (tflops * 1e12)
                t = gemm_time(m, n, k, ec, em, peak["fp8_flops"], peak["hbm_bytes_s"])
                err += math.log(t / t_pub) ** 2
            if best is None or err < best[2]:
                best = (ec, em, err)
    ec, em, err = best
    return ec, em, math.sqrt(err / len(table))


def ll_bandwidth(ep_size: int, kind: str) -> float:
    """Effective low-latency dispatch ("dispatch") or combine ("combine") bandwidth at `ep_size`, bytes/s,
    interpolated in log2(EP) between DeepEP's published points (clamped at the ends)."""
    pts = sorted(DEEPEP_LL_H800)
    col = 1 if kind == "dispatch" else 3
    if ep_size <= pts[0]:
        return DEEPEP_LL_H800[pts[0]][col] * 1e9
    if ep_size >= pts[-1]:
        return DEEPEP_LL_H800[pts[-1]][col] * 1e9
    for lo, hi in zip(pts, pts[1:]):
        if lo <= ep_size <= hi:
            f = (math.log2(ep_size) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
            return (DEEPEP_LL_H800[lo][col] * (1 - f) + DEEPEP_LL_H800[hi][col] * f) * 1e9
    raise AssertionError(ep_size)


def main() -> None:
    ec, em, rms = fit_gemm()
    print(f"DeepGEMM fit on H800: compute eff {ec:.2f}, memory eff {em:.2f}, rms log error {rms:.3f} "
          f"(x{math.exp(rms):.2f})")
    for m, n, k, tflops in DEEPGEMM_H800:
        t = gemm_time(m, n, k, ec, em, H800_PEAK["fp8_flops"], H800_PEAK["hbm_bytes_s"])
        print(f"  M={m:5d} N={n:5d} K={k:5d}: published {tflops:5d} TFLOPS, model {2 * m * n * k / t / 1e12:6.0f}")
    print(f"FlashMLA: memory eff {FLASHMLA_H800['mem_bytes_s'] / H800_PEAK['hbm_bytes_s']:.3f}, "
          f"compute eff {FLASHMLA_H800['compute_flops'] / 989e12:.3f} (of 989 BF16 TFLOPS)")


if __name__ == "__main__":
    main()
