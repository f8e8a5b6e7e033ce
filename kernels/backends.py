"""Run-time detection of DeepSeek's optional GPU kernel libraries.

DeepGEMM, FlashMLA and DeepEP are installed from their upstream sources on Hopper nodes (their
PyPI uploads do not build). This module answers "is backend X usable for this tensor?" once per
process; everything else falls back to the reference torch kernels.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

_DISABLE = {s.strip() for s in os.environ.get("RAYINFER_DISABLE_BACKENDS", "").split(",") if s.strip()}


@functools.cache
def module(name: str):
    """The imported backend module, or None when absent, disabled, or without a Hopper GPU."""
    if name in _DISABLE or not torch.cuda.is_available():
        return None
    if torch.cuda.get_device_capability()[0] < 9:
        return None
    try:
        return importlib.import_module(name)
    except Exception:  # a broken install must not take the reference path down with it
        return None


@functools.cache
def installed(name: str) -> bool:
    """Present, enabled and on a Hopper GPU, without importing it (importing is left to probed code)."""
    if name in _DISABLE or not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        return False
    return importlib.util.find_spec(name) is not None


@functools.cache
def triton_installed(kernel: str) -> bool:
    """Triton is importable and the Triton kernel `kernel` (a RAYINFER_DISABLE_BACKENDS name) is not switched off."""
    return kernel not in _DISABLE and importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1: how Triton kernels are tested without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def usable(name: str, *tensors: torch.Tensor) -> bool:
    """On CUDA tensors, installed, and its health probe (run once per process, in a child) passed."""
    from rayinfer.kernels import probe

    return all(t.is_cuda for t in tensors) and installed(name) and probe.healthy(name) and module(name) is not None


def disabled() -> set[str]:
    """Backends switched off by RAYINFER_DISABLE_BACKENDS (comma-separated names)."""
    return set(_DISABLE)


def available() -> dict[str, bool]:
    return {n: module(n) is not None for n in ("deep_gemm", "flash_mla", "deep_ep")}
