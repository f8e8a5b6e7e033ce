"""Compute kernels behind stable signatures (installed as `rayinfer.kernels`).

Each kernel has one reference torch implementation that runs on CPU and GPU, plus accelerated
backends (DeepGEMM, FlashMLA, DeepEP) chosen by capability at run time. Callers never branch on
the backend: they call the function here and get the best implementation available.
Owns the one fact every layer shares about the KV cache: its page size (torch-free, for the block manager and
the prefix index too).
"""

PAGE_SIZE = 64  # tokens per paged-KV page: FlashMLA's fixed page size, and every cache, table and hash follows it
