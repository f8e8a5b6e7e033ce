"""Compute kernels behind stable signatures (installed as `rayinfer.kernels`).

Each kernel has one reference torch implementation that runs on CPU and GPU, plus accelerated
backends (DeepGEMM, FlashMLA, DeepEP) chosen by capability at run time. Callers never branch on
the backend: they call the function here and get the best implementation available.
"""
