"""FP8 GEMM backends that cannot crash the process: health probes in a child, preconditions, fallbacks (all on CPU)."""
import logging
import textwrap

import pytest
import torch

from rayinfer.kernels import fp8, fp8_native, probe
from rayinfer.kernels.moe import grouped_ffn

FAKE = '''
import os, signal, sys, time

def crash():
    os.kill(os.getpid(), signal.SIGSEGV)

def disagree():
    raise SystemExit("fake fp8_gemm_nt: relative error 0.93 against the dequantised reference")

def hang():
    time.sleep(60)

def ok():
    with open(os.environ["FAKE_PROBE_LOG"], "a") as f:
        f.write("ran\\n")
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    (tmp_path / "fake_backend.py").write_text(textwrap.dedent(FAKE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FAKE_PROBE_LOG", str(tmp_path / "ran.log"))
    names = []

    def reg(name, fn):
        probe.register(name, f"fake_backend:{fn}")
        names.append(name)

    yield reg, tmp_path / "ran.log"
    for n in names:
        probe._PROBES.pop(n, None)
        probe._verdicts.pop(n, None)


def test_probe_verdicts_crash_error_hang_and_pass_once(fake, monkeypatch, caplog):
    reg, log = fake
    for name, fn in [("t_crash", "crash"), ("t_disagree", "disagree"), ("t_ok", "ok"), ("t_hang", "hang")]:
        reg(name, fn)
    monkeypatch.setattr(probe, "TIMEOUT_S", 5.0)
    with caplog.at_level(logging.WARNING, logger="rayinfer.kernels"):
        assert probe.healthy("t_crash") is False  # the segfault stayed in the child: we are still here
        assert probe.healthy("t_disagree") is False
        assert probe.healthy("t_hang") is False
    assert probe.healthy("t_ok") and probe.healthy("t_ok")
    assert log.read_text() == "ran\n"  # once per process
    v = probe.verdicts()
    assert "SIGSEGV" in v["t_crash"][1] and "relative error 0.93" in v["t_disagree"][1]
    assert "did not finish within 5s" in v["t_hang"][1]
    assert "kernel backend t_crash disabled" in caplog.text and "using the next backend" in caplog.text
    assert probe.healthy("never_registered") is False


def test_linear_skips_a_crashing_backend_for_the_next_healthy_one(fake, monkeypatch):
    reg, _ = fake
    reg("crashy", "crash")
    reg("good", "ok")
    calls = []

    def good(xq, xs, w, s):  # a correct block-scaled product, computed the reference way
        calls.append("good")
        return fp8_native._reference(xq, xs, w, s)

    def boom(*a):
        raise AssertionError("a backend whose probe crashed was called")

    monkeypatch.setattr(fp8, "_NATIVE", {"crashy": (lambda *a: None, boom), "good": (lambda *a: None, good)})
    monkeypatch.setattr(fp8, "native_backends", lambda x: ["crashy", "good"])
    x, w = torch.randn(3, 256), torch.randn(128, 256)
    wq, ws = fp8.quantize_weight_blocks(w)
    got = fp8.linear(x, wq, ws)
    want = x @ fp8.dequantize_weight_blocks(wq, ws).T
    assert calls == ["good"] and ((got - want).norm() / want.norm()) < 0.05
    # a backend whose preconditions fail for these operands is skipped without being probed
    monkeypatch.setattr(fp8, "_NATIVE", {"good": (lambda *a: "K=256 is not what it wants", good)})
    monkeypatch.setattr(fp8, "native_backends", lambda x: ["good"])
    assert fp8.linear_backend(x, wq, ws) == "reference"
    assert torch.allclose(fp8.linear(x, wq, ws), want, atol=1e-5)


def test_cpu_uses_the_reference_and_probes_nothing(monkeypatch):
    monkeypatch.setattr(probe, "_run", lambda name: pytest.fail(f"probed {name} for a CPU tensor"))
    x = torch.randn(2, 128)
    wq, ws = fp8.quantize_weight_blocks(torch.randn(64, 128))
    assert fp8.native_backends(x) == [] and fp8.linear_backend(x, wq, ws) == "reference"


def test_preconditions_name_what_is_wrong():
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    wq, ws = fp8.quantize_weight_blocks(torch.randn(128, 256))
    check = fp8_native.deep_gemm_preconditions
    assert "not a multiple of 128" in check(torch.randn(4, 200), *fp8.quantize_weight_blocks(torch.randn(128, 200)))
    assert "is not torch.float8_e4m3fn" in check(x, wq.float(), ws)
    assert "not contiguous" in check(x, wq.t().contiguous().t(), ws)
    assert "weight scale" in check(x, wq, ws[:, :1])
    assert "not a multiple of 64" in check(x, *fp8.quantize_weight_blocks(torch.randn(96, 256)))
    assert "inner dims differ" in check(torch.randn(4, 128), wq, ws)
    assert "CUDA" in check(x, wq, ws)  # everything else right: only the device is
    assert "N=96 is not a multiple of 128" in fp8_native.scaled_mm_preconditions(
        x, *fp8.quantize_weight_blocks(torch.randn(96, 256)))


def test_activation_scales_in_tma_aligned_mn_major_layout():
    for m in (1, 5, 8, 130):
        xs = torch.rand(m, 3)
        t = fp8_native.mn_major_tma_aligned(xs)
        assert torch.equal(t, xs) and t.stride(0) == 1 and t.stride(1) % 4 == 0 and t.stride(1) >= m
        assert fp8_native.act_scale_layout_ok(t, m, 384) is None
    assert "MN-major" in fp8_native.act_scale_layout_ok(torch.rand(5, 3), 5, 384)  # row-major is refused
    assert "not fp32" in fp8_native.act_scale_layout_ok(fp8_native.mn_major_tma_aligned(torch.rand(5, 2)), 5, 384)


def test_grouped_fp8_ffn_matches_dequantised_both_layouts():
    g = torch.Generator().manual_seed(3)
    s, h, i = 3, 128, 128
    w13, w2 = torch.randn(s, 2 * i, h, generator=g) * 0.1, torch.randn(s, h, i, generator=g) * 0.1
    q13 = [fp8.quantize_weight_blocks(w) for w in w13]
    q2 = [fp8.quantize_weight_blocks(w) for w in w2]
    w13q, s13 = torch.stack([q[0] for q in q13]), torch.stack([q[1] for q in q13])
    w2q, s2 = torch.stack([q[0] for q in q2]), torch.stack([q[1] for q in q2])
    d13 = torch.stack([fp8.dequantize_weight_blocks(a, b) for a, b in q13])
    d2 = torch.stack([fp8.dequantize_weight_blocks(a, b) for a, b in q2])
    for counts in ([2, 0, 3], [70, 0, 90]):  # few rows per slot (masked layout), many (contiguous)
        x = torch.randn(sum(counts), h, generator=g)
        got = grouped_ffn(x, counts, w13q, w2q, s13, s2)
        assert torch.allclose(got, grouped_ffn(x, counts, d13, d2), atol=1e-4)
    out = fp8.grouped_linear_masked(torch.randn(2, 4, h), [4, 1], w2q[:2], s2[:2])
    assert out.shape == (2, 4, h) and torch.equal(out[1, 1:], torch.zeros(3, h))
