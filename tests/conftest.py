"""Shared pytest setup: make tests/ helpers importable and keep preset caches inside the test session."""
import importlib
import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

# The tiny preset's ops are far too small to gain from intra-op threads, and on a 2-core machine
# shared with Ray rank processes, spinning OpenMP workers slow every op down by 10x or more.
torch.set_num_threads(int(os.environ.get("RAYINFER_TEST_THREADS", "1")))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (everything on 127.0.0.1) for the whole test session."""
    import ray

    from rayinfer.actors.cluster import ensure_ray

    ensure_ray(num_cpus=16)  # logical CPUs: rank replicas take fractions of the 2 real cores
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


TRITON_INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET")  # read before any test module is collected
TRITON_KERNELS = ("rayinfer.kernels.triton_mla", "rayinfer.kernels.triton_prefill")


def _triton_modules() -> list[str]:
    # The native extension stays: it cannot load twice; the Python layers above it re-import.
    return [n for n in sys.modules if (n == "triton" or n.startswith("triton.")) and not n.startswith("triton._C")
            or n in TRITON_KERNELS]


@pytest.fixture(scope="module")
def triton_interpreter():
    """Triton's CPU interpreter for one test module, and nothing else. Triton decides at import whether `@triton.jit`
    interprets (its own library included), so while the module runs TRITON_INTERPRET=1 is set and Triton and the
    kernel modules are imported afresh under it; afterwards the variable and the modules already imported are put
    back as they were. Returns the module loader: `triton_interpreter("rayinfer.kernels.triton_mla")`."""
    pytest.importorskip("triton")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        saved = {name: sys.modules.pop(name) for name in _triton_modules()}
        for name in TRITON_KERNELS:
            importlib.import_module(name)  # callers that import lazily (kernels.mla, kernels.prefill) find these
        yield importlib.import_module
        for name in _triton_modules():
            del sys.modules[name]
        sys.modules.update(saved)
        parent = importlib.import_module("rayinfer.kernels")
        for name in TRITON_KERNELS:
            attr = name.rsplit(".", 1)[1]
            if name in saved:
                setattr(parent, attr, saved[name])
            else:
                parent.__dict__.pop(attr, None)


FAKE_PROBES = '''
import os, signal, subprocess, sys, time

def crash():
    os.kill(os.getpid(), signal.SIGSEGV)

def disagree():
    raise SystemExit("fake fp8_gemm_nt: relative error 0.93 against the dequantised reference")

def hang():
    time.sleep(60)

def ok():
    with open(os.environ["FAKE_PROBE_LOG"], "a") as f:
        f.write("ran\\n")

def nest():  # a probe whose reference would pick a backend: it asks for another probe's verdict
    from rayinfer.kernels import probe
    probe.register("t_inner", "fake_backend:ok")  # known to the child's registry: only the child rule stops it
    with open(os.environ["FAKE_PROBE_LOG"], "a") as f:
        f.write(f"nested verdict {probe.healthy('t_inner')}\\n")

def spawn_and_hang():  # leaves a grandchild behind, then hangs: both must die with the probe
    kid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(os.environ["FAKE_PROBE_LOG"], "a") as f:
        f.write(f"{os.getpid()} {kid.pid}\\n")
    time.sleep(60)
'''


@pytest.fixture
def fake_probes(tmp_path, monkeypatch):
    """(register(name, fake function, deadline_s=None), log path): probes backed by the fake backend above; the
    probe registry, verdicts and spent budget are restored after."""
    from rayinfer.kernels import probe

    (tmp_path / "fake_backend.py").write_text(textwrap.dedent(FAKE_PROBES))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FAKE_PROBE_LOG", str(tmp_path / "ran.log"))
    monkeypatch.setattr(probe, "_spent_s", 0.0)
    names = []

    def reg(name, fn, deadline_s=None):
        if deadline_s is None:
            probe.register(name, f"fake_backend:{fn}")
        else:
            probe.register(name, f"fake_backend:{fn}", deadline_s)
        names.append(name)

    yield reg, tmp_path / "ran.log"
    for n in names:
        probe._PROBES.pop(n, None)
        probe._verdicts.pop(n, None)
