"""Health probes with fake backends: a probe never starts a probe, each has its own short deadline, the process a
bounded total, and a killed probe leaves no process behind. Plus the registry's real probes: every native backend
the kernels may pick (DeepEP and torch's grouped GEMM included) has one, with a short deadline."""
from __future__ import annotations

import importlib
import os
import time

import pytest
import torch

from rayinfer.kernels import mla, probe


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (exited; its parent, init, has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_probe_child_asks_for_no_probe(fake_probes):
    reg, log = fake_probes
    reg("t_outer", "nest")
    reg("t_inner", "ok")
    assert probe.healthy("t_outer")
    # Inside the child, the inner backend was refused without starting a grandchild probe of it.
    assert log.read_text() == "nested verdict False\n"
    assert "t_inner" not in probe.verdicts()


def test_inside_a_probe_child_healthy_starts_nothing(monkeypatch):
    monkeypatch.setenv(probe.CHILD_ENV, "flash_mla")
    monkeypatch.setattr(probe, "_run", lambda name: pytest.fail(f"a probe child probed {name}"))
    assert probe.healthy("triton_mla") is False and probe.healthy("deep_gemm") is False


def test_the_mla_probe_reference_never_selects_a_backend(monkeypatch):
    """FlashMLA's probe compares against an fp32 reference: fp32 fails FlashMLA's preconditions, so going through
    `mla_decode` would select a backend (and probe Triton MLA from inside the FlashMLA probe)."""
    monkeypatch.setattr(mla, "decode_backend", lambda *a: pytest.fail("the probe's reference chose a backend"))
    q, cache, table, lens = mla.probe_batch(d=48, h=4, device="cpu")
    got = mla.reference_decode(q.float(), cache.float(), table, lens, 32, 0.07).bfloat16()
    mla.check_against_reference("fake", got, q, cache, table, lens, 32, 0.07)  # agrees: no SystemExit
    with pytest.raises(SystemExit, match="relative error"):
        mla.check_against_reference("fake", got.flip(0), q, cache, table, lens, 32, 0.07)


def test_each_probe_has_its_own_deadline_and_the_total_is_bounded(fake_probes, monkeypatch):
    reg, _ = fake_probes
    monkeypatch.setattr(probe, "BUDGET_S", 5.0)
    for i in range(5):
        reg(f"t_hang{i}", "hang", deadline_s=2.0)
    t0 = time.monotonic()
    assert not any(probe.healthy(f"t_hang{i}") for i in range(5))
    spent = time.monotonic() - t0
    v = probe.verdicts()
    assert "did not finish within 2s" in v["t_hang0"][1] and "did not finish within 2s" in v["t_hang1"][1]
    assert "probe budget of 5s is spent" in v["t_hang4"][1]
    assert spent < 5.0 + 3.0, spent  # the budget plus process start-up slack, not 5 x 2 s (nor 5 x 300 s)


def test_a_killed_probe_leaves_no_process(fake_probes):
    reg, log = fake_probes
    reg("t_orphans", "spawn_and_hang", deadline_s=3.0)
    t0 = time.monotonic()
    assert probe.healthy("t_orphans") is False
    # Killing the child alone would leave the grandchild holding its pipes: the probe would wait for it (60 s).
    assert time.monotonic() - t0 < 3.0 + 4.0
    child, grandchild = map(int, log.read_text().split())
    deadline = time.monotonic() + 5
    while not (_gone(child) and _gone(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child) and _gone(grandchild), (child, grandchild)


def test_every_native_backend_has_a_short_probe_that_exists():
    for name in ("deep_gemm", "deep_gemm_grouped", "scaled_mm", "flash_mla", "triton_mla", "triton_prefill",
                 "grouped_mm", "deep_ep"):
        target, deadline = probe._PROBES[name]
        module, fn = target.split(":")
        assert callable(getattr(importlib.import_module(module), fn)), target
        assert 0 < deadline <= probe.JIT_DEADLINE_S, (name, deadline)


def test_rel_err_is_the_one_agreement_measure():
    want = torch.tensor([3.0, 4.0])
    assert probe.rel_err(want + torch.tensor([0.0, 0.5]), want) == pytest.approx(0.1)
    with pytest.raises(SystemExit, match="x: relative error 0.1"):
        probe.check_close(want + torch.tensor([0.0, 0.5]), want, "x", tol=0.05)
    assert os.environ.get(probe.CHILD_ENV) is None  # the test process itself is no probe child
