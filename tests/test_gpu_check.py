"""benchmarks/gpu_check.py in its CPU smoke mode: every section runs and the table comes out (the GPU run reuses it)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_smoke_mode_prints_its_table_without_ray(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "gpu_check.py")
    # -X importtime lists every module imported: Ray must not be one (the GPU image has none)
    proc = subprocess.run([sys.executable, "-X", "importtime", script, "--device", "cpu"], capture_output=True,
                          text=True, timeout=900, cwd=str(tmp_path))
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "ray" not in imported
    out = proc.stdout
    table = out[out.index("rayinfer gpu_check on cpu (smoke mode)"):]
    for check in ("parity yarn-groups-1dense", "parity plain-4groups-2shared", "parity yarn-noqlora-halfrope-2dense",
                  "engine greedy vs transformers (fp32)", "seeded sampling + penalties", "fp8 linear reference",
                  "fp8 grouped contiguous", "fp8 grouped masked", "mla decode reference", "flash_mla decode", "triton_mla decode",
                  "probe scaled_mm", "probes: total time", "probes: processes left",
                  "fp8 scale layouts (dense, masked grouped)", "prefill attention torch varlen",
                  "rayinfer plan V3", "prefill forward (tiny)", "decode (tiny)", "decode step, 2 seqs (tiny",
                  "decode step, 4 seqs (tiny", "decode step, 4 seqs, graphs (tiny", "prefill, 4 x 16 (tiny)"):
        assert check in table, f"{check!r} missing from:\n{table}"
    assert "error:" not in table, table
    fails = [line for line in table.splitlines() if line.rstrip().endswith("FAIL")]
    assert not fails and proc.returncode == 0, table
