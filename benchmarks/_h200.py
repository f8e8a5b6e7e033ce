"""The H200's measured and published ceilings, the floors gpu_check and its sections hold timings to (one owner)."""

HBM_BYTES_S = 4.3e12  # device-to-device copy, bytes read + written (measured there, shared/gpu/README.md)
BF16_FLOP_S = 989e12  # dense bf16 tensor-core peak (published)
