"""Health probes: a native kernel backend is trusted only after it ran once, in a child process, and agreed.

A native extension that segfaults kills the rank and, through it, its gang (DeepGEMM did exactly that on the
H200 image). So, once per process and before first use, each backend's probe function runs in
`python -X faulthandler -c ...` on small inputs against the reference; a crash, an error, a hang or a
disagreement disables the backend with a logged reason and callers take the next backend.
Owns: the registry backend name -> probe function ("module:function"), and the per-process verdicts.
Crosses: a backend name in; healthy or not out (`verdicts()` says why).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

log = logging.getLogger("rayinfer.kernels")

OK_MARK = "RAYINFER-PROBE-OK"
# First use may JIT-compile kernels (DeepGEMM: tens of seconds per shape).
TIMEOUT_S = float(os.environ.get("RAYINFER_PROBE_TIMEOUT_S", "300"))

_PROBES: dict[str, str] = {
    "deep_gemm": "rayinfer.kernels.fp8_native:probe_deep_gemm",
    "deep_gemm_grouped": "rayinfer.kernels.fp8_native:probe_deep_gemm_grouped",
    "scaled_mm": "rayinfer.kernels.fp8_native:probe_scaled_mm",
    "flash_mla": "rayinfer.kernels.mla:probe_flash_mla",
    "triton_mla": "rayinfer.kernels.triton_mla:probe_triton_mla",
    "triton_prefill": "rayinfer.kernels.triton_prefill:probe_triton_prefill",
}
_verdicts: dict[str, tuple[bool, str]] = {}
_lock = threading.Lock()


def register(name: str, target: str) -> None:
    """Sets (or replaces) the probe of backend `name`: `target` is "module:function"; forgets any verdict."""
    if ":" not in target:
        raise ValueError(f"probe target {target!r} must be 'module:function'")
    with _lock:
        _PROBES[name] = target
        _verdicts.pop(name, None)


def healthy(name: str) -> bool:
    with _lock:
        if name not in _verdicts:
            _verdicts[name] = _run(name)
        return _verdicts[name][0]


def verdicts() -> dict[str, tuple[bool, str]]:
    """Backend -> (healthy, reason) for every backend probed so far in this process."""
    with _lock:
        return dict(_verdicts)


def _run(name: str) -> tuple[bool, str]:
    target = _PROBES.get(name)
    if target is None:
        return _disable(name, "no probe is registered for it")
    module, fn = target.split(":", 1)
    code = f"import importlib; importlib.import_module({module!r}).{fn}(); print({OK_MARK!r}, flush=True)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    try:
        proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                              timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return _disable(name, f"its probe {target} did not finish within {TIMEOUT_S:.0f}s")
    if proc.returncode == 0 and OK_MARK in proc.stdout:
        log.info("kernel backend %s passed its health probe", name)
        return True, "probe passed"
    if proc.returncode < 0:
        how = f"killed by {signal.Signals(-proc.returncode).name}"
    else:
        how = f"exit status {proc.returncode}"
    tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
    return _disable(name, f"its probe {target} failed: {how}: {tail[0].strip()}")


def _disable(name: str, reason: str) -> tuple[bool, str]:
    log.warning("kernel backend %s disabled: %s; using the next backend", name, reason)
    return False, reason
