"""FP8 GEMM backends that cannot crash the process: health probes in a child, preconditions, fallbacks (all on CPU)."""
import logging

import pytest
import torch

from rayinfer.kernels import fp8, fp8_native, probe
from rayinfer.kernels.moe import grouped_ffn

def test_probe_verdicts_crash_error_hang_and_pass_once(fake_probes, monkeypatch, caplog):
    reg, log = fake_probes
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


def test_linear_skips_a_crashing_backend_for_the_next_healthy_one(fake_probes, monkeypatch):
    reg, _ = fake_probes
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


class FakeDeepGEMM:
    """DeepGEMM's grouped GEMMs as its documented API takes them: activation scales MN-major and TMA-aligned (checked
    like the real kernels' host asserts), the product computed the reference way. `bad_group` returns wrong rows
    for one group of the masked GEMM (the case a probe that checks one group's rows would pass)."""

    def __init__(self, bad_group: int | None = None):
        self.bad_group, self.scales = bad_group, []

    @staticmethod
    def get_mk_alignment_for_contiguous_layout():
        return 128

    def m_grouped_fp8_gemm_nt_contiguous(self, a, b, out, m_indices):
        (xq, xs), (w, s) = a, b
        assert fp8_native.act_scale_layout_ok(xs, *xq.shape) is None, xs.stride()
        for e in range(w.shape[0]):
            rows = (m_indices == e).nonzero().view(-1)
            out[rows] = fp8_native._reference(xq[rows], xs[rows], w[e], s[e]).to(out.dtype)

    def m_grouped_fp8_gemm_nt_masked(self, a, b, out, masked_m, expected_m):
        (xq, xs), (w, s) = a, b
        self.scales.append(xs)
        why = fp8_native.act_scale_layout_ok(xs, xq.shape[1], xq.shape[2], groups=xq.shape[0])
        assert why is None, why
        assert masked_m.dtype == torch.int32 and expected_m >= 1
        for g, n in enumerate(masked_m.tolist()):
            if not n:
                continue
            out[g, :n] = fp8_native._reference(xq[g, :n], xs[g, :n], w[g], s[g]).to(out.dtype)
            if g == self.bad_group:
                out[g, :n] = -out[g, :n]


def test_masked_grouped_scales_are_built_in_the_layout_deepgemm_takes(monkeypatch):
    """One buffer, each group's [m, K/128] scales MN-major with a 16-byte-aligned M stride: `torch.stack` of
    per-group MN-major views copies them back to K-major strides, which the layout check (and DeepGEMM) refuse."""
    from rayinfer.kernels import backends

    fake = FakeDeepGEMM()
    monkeypatch.setattr(backends, "module", lambda name: fake)
    g, m, k = 3, 5, 384
    xq, xs = fp8.quantize_act_groups(torch.randn(g * m, k))
    wq, ws = (torch.stack(t) for t in zip(*[fp8.quantize_weight_blocks(torch.randn(128, k)) for _ in range(g)]))
    out = fp8_native.deep_gemm_grouped_masked(xq.view(g, m, k), xs.view(g, m, -1), torch.tensor([5, 2, 0]), 4, wq, ws)
    sent = fake.scales[0]
    assert sent.shape == (g, m, 3) and sent.stride(1) == 1 and sent.stride(2) == 8 and sent.stride(0) >= 8 * 3
    assert torch.equal(sent, xs.view(g, m, -1))
    want = fp8_native._reference(xq[:5], xs[:5], wq[0], ws[0])
    assert torch.allclose(out[0].float(), want, rtol=1e-2, atol=1e-2)
    stacked = torch.stack([fp8_native.mn_major_tma_aligned(xs.view(g, m, -1)[i]) for i in range(g)])
    assert "MN-major" in fp8_native.act_scale_layout_ok(stacked, m, k, groups=g)  # what the old build produced


def test_masked_grouped_probe_checks_every_group(monkeypatch):
    from rayinfer.kernels import backends

    for bad in (None, 0, 1):
        monkeypatch.setattr(backends, "module", lambda name, f=FakeDeepGEMM(bad): f)
        if bad is None:
            fp8_native.probe_deep_gemm_grouped(device="cpu")  # agrees: returns
        else:
            with pytest.raises(SystemExit, match=f"group {bad}: relative error"):
                fp8_native.probe_deep_gemm_grouped(device="cpu")
