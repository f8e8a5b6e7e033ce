"""Health probes: a native kernel backend is trusted only after it ran once, in a child process, and agreed.

A native extension that segfaults kills the rank and, through it, its gang (DeepGEMM did exactly that on the
H200 image). So, once per process and before first use, each backend's probe function runs in
`python -X faulthandler -c ...` on small inputs against the reference; a crash, an error, a hang or a
disagreement disables the backend with a logged reason and callers take the next backend.

Probes never nest: the child runs with `RAYINFER_PROBE_CHILD` set, and there every `healthy()` answers False
without starting anything, so whatever a probe calls (a reference that would pick a backend) takes the
reference path. Each probe has its own deadline, and the process has a total probe budget: a probe starts only
with what is left of it, so a host with every backend hanging still gives up in bounded time. A child runs in
its own session and its whole process group is killed when it ends or times out: nothing it started survives it.
Owns: the registry backend name -> (probe function "module:function", deadline), the per-process verdicts, and
the relative-error check every probe and gpu_check uses. Crosses: a backend name in; healthy or not out
(`verdicts()` says why).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger("rayinfer.kernels")

OK_MARK = "RAYINFER-PROBE-OK"
CHILD_ENV = "RAYINFER_PROBE_CHILD"  # set in a probe's child: probes do not nest
# A cap on every probe's own deadline (unset: each probe's own); and the total a process may spend probing.
TIMEOUT_S = float(os.environ.get("RAYINFER_PROBE_TIMEOUT_S", "inf"))
BUDGET_S = float(os.environ.get("RAYINFER_PROBE_BUDGET_S", "300"))
DEFAULT_DEADLINE_S = 60.0  # a child's CUDA start-up plus one Triton compile (and its short autotune)
JIT_DEADLINE_S = 120.0  # DeepGEMM JIT-compiles each kernel shape at first use: tens of seconds each

_PROBES: dict[str, tuple[str, float]] = {
    "deep_gemm": ("rayinfer.kernels.fp8_native:probe_deep_gemm", JIT_DEADLINE_S),
    "deep_gemm_grouped": ("rayinfer.kernels.fp8_native:probe_deep_gemm_grouped", JIT_DEADLINE_S),
    "scaled_mm": ("rayinfer.kernels.fp8_native:probe_scaled_mm", DEFAULT_DEADLINE_S),
    "flash_mla": ("rayinfer.kernels.mla:probe_flash_mla", DEFAULT_DEADLINE_S),
    "triton_mla": ("rayinfer.kernels.triton_mla:probe_triton_mla", DEFAULT_DEADLINE_S),
    "triton_prefill": ("rayinfer.kernels.triton_prefill:probe_triton_prefill", DEFAULT_DEADLINE_S),
    "grouped_mm": ("rayinfer.kernels.moe:probe_grouped_mm", DEFAULT_DEADLINE_S),
    "deep_ep": ("rayinfer.kernels.deepep:probe_deep_ep", DEFAULT_DEADLINE_S),
}
_verdicts: dict[str, tuple[bool, str]] = {}
_lock = threading.Lock()
_spent_s = 0.0  # wall time this process has spent in probe children


def register(name: str, target: str, deadline_s: float = DEFAULT_DEADLINE_S) -> None:
    """Sets (or replaces) the probe of backend `name`: `target` is "module:function"; forgets any verdict."""
    if ":" not in target:
        raise ValueError(f"probe target {target!r} must be 'module:function'")
    with _lock:
        _PROBES[name] = (target, deadline_s)
        _verdicts.pop(name, None)


def in_probe_child() -> bool:
    return bool(os.environ.get(CHILD_ENV))


def healthy(name: str) -> bool:
    if in_probe_child():  # a probe's reference must not start another probe: it runs the reference
        return False
    with _lock:
        if name not in _verdicts:
            _verdicts[name] = _run(name)
        return _verdicts[name][0]


def verdicts() -> dict[str, tuple[bool, str]]:
    """Backend -> (healthy, reason) for every backend probed so far in this process."""
    with _lock:
        return dict(_verdicts)


def rel_err(got, want) -> float:
    """||got - want|| / ||want|| in fp32: the one agreement measure of probes, tests' callers and gpu_check."""
    want = want.float()
    return ((got.float() - want).norm() / want.norm()).item()


def check_close(got, want, what: str, tol: float = 2e-2) -> None:
    """Ends a probe child with a reason when `got` is not within `tol` relative error of `want`."""
    err = rel_err(got, want)
    if not err < tol:
        raise SystemExit(f"{what}: relative error {err:.3g} against the reference")


def _run(name: str) -> tuple[bool, str]:
    global _spent_s
    entry = _PROBES.get(name)
    if entry is None:
        return _disable(name, "no probe is registered for it")
    target, own = entry
    deadline = min(own, TIMEOUT_S, BUDGET_S - _spent_s)
    if deadline <= 0:
        return _disable(name, f"the process's probe budget of {BUDGET_S:.0f}s is spent")
    t0 = time.monotonic()
    try:
        return _run_child(name, target, deadline)
    finally:
        _spent_s += time.monotonic() - t0


def _run_child(name: str, target: str, deadline: float) -> tuple[bool, str]:
    module, fn = target.split(":", 1)
    code = f"import importlib; importlib.import_module({module!r}).{fn}(); print({OK_MARK!r}, flush=True)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), **{CHILD_ENV: name})
    # Its own session: the child and anything it starts form one process group, killed as one.
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.communicate()
        return _disable(name, f"its probe {target} did not finish within {deadline:.0f}s")
    finally:
        _kill_group(proc.pid)  # whatever the child left running (it has exited or been killed by now)
    if proc.returncode == 0 and OK_MARK in out:
        log.info("kernel backend %s passed its health probe", name)
        return True, "probe passed"
    if proc.returncode < 0:
        how = f"killed by {signal.Signals(-proc.returncode).name}"
    else:
        how = f"exit status {proc.returncode}"
    tail = [line for line in err.strip().splitlines() if line.strip()][-1:] or ["no output"]
    return _disable(name, f"its probe {target} failed: {how}: {tail[0].strip()}")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left in it


def _disable(name: str, reason: str) -> tuple[bool, str]:
    log.warning("kernel backend %s disabled: %s; using the next backend", name, reason)
    return False, reason
