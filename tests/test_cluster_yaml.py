"""cluster.yaml and examples/serve_config.yaml: Ray's own schema check, run offline, plus what rayinfer needs.

Ray's `ray up` first fills in the provider defaults (`prepare_config`) and validates the result against
ray-schema.json (`validate_config`); only after that does it contact AWS. These tests run exactly those
two steps, with the network closed to anything but loopback, and then check rayinfer's own expectations:
ranks can only land on GPU workers, the kernels come from their upstream sources with a fallback, the
dashboard stays on 127.0.0.1, and the cluster is big enough for the sample serve config.
"""
import copy
import ipaddress
import os
import re
import shutil
import socket
import subprocess

import pytest
import yaml

from rayinfer.config import parse_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "cluster.yaml")
SERVE = os.path.join(ROOT, "examples", "serve_config.yaml")
GPUS_PER_INSTANCE = {"p5.48xlarge": 8, "p5e.48xlarge": 8, "p5en.48xlarge": 8}  # H100 / H200 / H200
KERNEL_REPOS = ("github.com/deepseek-ai/DeepGEMM", "github.com/deepseek-ai/FlashMLA", "github.com/deepseek-ai/DeepEP")
V3_ROUTED_EXPERTS = 256
COMMAND_LISTS = ("setup_commands", "head_setup_commands", "worker_setup_commands",
                 "head_start_ray_commands", "worker_start_ray_commands")


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Any attempt to reach AWS (or anything off this machine) fails the test instead of hanging."""
    real_connect = socket.socket.connect

    def connect(sock, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None:
            try:
                if not ipaddress.ip_address(host).is_loopback:
                    raise AssertionError(f"network access to {address} during an offline test")
            except ValueError:  # a hostname: never resolved here
                if host != "localhost":
                    raise AssertionError(f"network access to {address} during an offline test")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture(scope="module")
def cluster():
    with open(CLUSTER) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def serve_cfg():
    with open(SERVE) as f:
        return yaml.safe_load(f)


def _types(cluster):
    head_name = cluster["head_node_type"]
    types = cluster["available_node_types"]
    workers = {n: t for n, t in types.items() if n != head_name}
    return types[head_name], workers


def _gpu_worker(cluster):
    _, workers = _types(cluster)
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) > 0]
    assert len(gpu) == 1, "expected exactly one GPU worker node type"
    return gpu[0]


def _commands(cluster, *lists):
    return [c for name in lists for c in cluster.get(name, [])]


# ---- Ray's own validation --------------------------------------------------------------------------------


def test_ray_schema_validation_offline(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))  # merges aws/defaults.yaml; no AWS call
    validate_config(prepared)  # jsonschema against ray-schema.json + Ray's cross-field checks
    # The defaults must not have replaced our node types or commands.
    assert set(prepared["available_node_types"]) == set(cluster["available_node_types"])
    assert prepared["head_node_type"] == cluster["head_node_type"]
    assert prepared["available_node_types"][cluster["head_node_type"]]["max_workers"] == 0
    assert prepared["worker_setup_commands"] == cluster["setup_commands"] + cluster["worker_setup_commands"]
    assert prepared["provider"]["type"] == "aws"


def test_aws_network_interface_handling_accepts_the_node_configs(cluster):
    # The one AWS bootstrap step that is pure config rewriting (the rest calls EC2/IAM).
    from ray.autoscaler._private.aws.config import _configure_from_network_interfaces

    out = _configure_from_network_interfaces(copy.deepcopy(cluster))
    assert out["available_node_types"].keys() == cluster["available_node_types"].keys()


def test_provider_and_limits(cluster):
    p = cluster["provider"]
    assert p["region"] and p["availability_zone"].startswith(p["region"])
    assert "," not in p["availability_zone"], "a gang must not be split across availability zones"
    assert isinstance(p["cache_stopped_nodes"], bool)
    assert cluster["auth"]["ssh_user"] == "ubuntu"
    assert cluster["upscaling_speed"] > 0 and cluster["idle_timeout_minutes"] > 0
    gpu = _gpu_worker(cluster)
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= cluster["max_workers"]


# ---- where ranks can land --------------------------------------------------------------------------------


def test_head_takes_no_ranks(cluster):
    head, _ = _types(cluster)
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0, "the head hides its CPUs so no rank or ingress lands on it"
    assert head["node_config"]["InstanceType"] not in GPUS_PER_INSTANCE


def test_gpu_workers_advertise_their_gpus(cluster):
    gpu = _gpu_worker(cluster)
    itype = gpu["node_config"]["InstanceType"]
    assert itype in GPUS_PER_INSTANCE, f"{itype}: expected an 8x H100/H200 instance"
    assert gpu["resources"]["GPU"] == GPUS_PER_INSTANCE[itype]
    assert gpu["resources"].get("CPU", 1) >= gpu["resources"]["GPU"], "each rank also takes a CPU"
    assert gpu["node_config"].get("ImageId"), "GPU nodes need an AMI with the NVIDIA driver"


# ---- setup and start commands ----------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_every_command_is_valid_bash(cluster):
    for cmd in _commands(cluster, *COMMAND_LISTS):
        r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert r.returncode == 0, f"bash syntax error in {cmd!r}: {r.stderr}"


def test_installs_rayinfer_torch_and_ray(cluster):
    import ray

    assert cluster["file_mounts"].get("~/rayinfer") == ".", "the checkout is synced to every node"
    for role in ("head_setup_commands", "worker_setup_commands"):
        cmds = " ; ".join(_commands(cluster, "setup_commands", role))
        assert "pip install -e ~/rayinfer" in cmds, role
        assert re.search(r"pip install \S*torch", cmds), role
    worker = " ; ".join(cluster["worker_setup_commands"])
    assert "whl/cpu" not in worker, "GPU nodes need torch's CUDA build"
    pin = re.search(r'ray\[[^\]]*\]==([0-9][\w.]*)', " ".join(cluster["setup_commands"]))
    assert pin, "pin Ray: the cluster must run the same version as the machine running `ray up`"
    assert pin.group(1) == ray.__version__, f"cluster.yaml pins ray {pin.group(1)}, this machine has {ray.__version__}"


def test_kernels_come_from_upstream_with_a_fallback(cluster):
    worker = cluster["worker_setup_commands"]
    for repo in KERNEL_REPOS:
        steps = [c for c in worker if repo in c]
        assert steps, f"no setup step builds {repo}"
        for c in steps:
            assert re.search(r'\|\|\s*echo\s+"[^"]*unavailable[^"]*"\s*$', c), \
                f"a failed {repo} build must end in a fallback, not fail the node: {c!r}"
    # The PyPI uploads under these names are incomplete and do not build.
    for cmd in _commands(cluster, *COMMAND_LISTS):
        for part in re.split(r"&&|\|\||;|\|", cmd):
            if "pip install" in part:
                assert not re.search(r"\b(deep[-_]ep|deep[-_]gemm|flash[-_]mla)\b", part, re.I), part


def test_ray_start_commands(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    worker = " ".join(cluster["worker_start_ray_commands"])
    assert "ray stop" in head and "ray stop" in worker
    assert "ray start --head" in head and "--port=6379" in head
    assert "--dashboard-host=127.0.0.1" in head, "the dashboard has no authentication: keep it on loopback"
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker
    assert "0.0.0.0" not in head + worker


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_bashrc_edits_are_idempotent(cluster, tmp_path):
    """`ray up` reruns every setup command; the lines they append to ~/.bashrc must not pile up."""
    edits = [c for c in _commands(cluster, "setup_commands", "worker_setup_commands")
             if "~/.bashrc" in c and "pip " not in c and "curl " not in c]
    assert edits
    (tmp_path / ".bashrc").write_text("# stock\n")
    # A stand-in `python` answering as a GPU node's torch would (`torch.version.cuda`).
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python").write_text("#!/bin/sh\necho 12.8\n")
    (fake_bin / "python").chmod(0o755)
    env = dict(os.environ, HOME=str(tmp_path), PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    for _ in range(2):
        for cmd in edits:
            r = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True)
            assert r.returncode == 0, f"{cmd!r}: {r.stderr}"
    lines = [ln for ln in (tmp_path / ".bashrc").read_text().splitlines() if ln.strip()]
    assert len(lines) == len(set(lines)), lines
    text = "\n".join(lines)
    assert "rayinfer-venv/bin/activate" in text and "CUDA_HOME=" in text


# ---- the sample serve config -----------------------------------------------------------------------------


def test_serve_config_keys_and_values(serve_cfg):
    assert set(serve_cfg) == {"model", "dtype", "device", "host", "port", "prefill", "decode", "kv_cache_memory",
                              "max_queue", "max_request_bytes", "resume_deadline_s"}
    assert serve_cfg["resume_deadline_s"] > 0
    assert serve_cfg["device"] == "cuda", "the sample deploys GPU ranks; without device: cuda they would be CPU actors"
    assert parse_bytes(serve_cfg["max_request_bytes"], "max_request_bytes") == 8 * 2**20
    assert isinstance(serve_cfg["model"], str) and serve_cfg["model"]
    assert serve_cfg["dtype"] in ("bfloat16", "float16", "float32")
    assert ipaddress.ip_address(serve_cfg["host"]).is_loopback, "loopback by default; --host opens it on a cluster"
    assert isinstance(serve_cfg["port"], int) and 1024 <= serve_cfg["port"] <= 65535
    assert parse_bytes(serve_cfg["kv_cache_memory"], "kv_cache_memory") >= 2**30
    assert isinstance(serve_cfg["max_queue"], int) and serve_cfg["max_queue"] > 0

    role_keys = {"prefill": "max_num_batched_tokens", "decode": "max_num_seqs"}
    for role, limit in role_keys.items():
        r = serve_cfg[role]
        assert set(r) - {"autoscaling"} == {"ep_size", "num_gangs", "num_redundant_experts", limit}, role
        for k, v in r.items():
            if k == "autoscaling":
                assert 1 <= v["min_gangs"] <= r["num_gangs"] <= v["max_gangs"], (role, v)
                assert v["drain_timeout_s"] > 0 and v["downscale_delay_s"] > v["upscale_delay_s"], (role, v)
                continue
            assert isinstance(v, int) and not isinstance(v, bool) and v >= 0, (role, k, v)
        assert r["ep_size"] > 0 and r["ep_size"] % 8 == 0, f"{role}: gangs fill whole 8-GPU nodes"
        assert r["num_gangs"] >= 1 and r[limit] > 0
        slots = V3_ROUTED_EXPERTS + r["num_redundant_experts"]
        assert slots % r["ep_size"] == 0, f"{role}: {slots} expert slots do not split evenly over {r['ep_size']} ranks"
    # Prefill batches prompts, decode batches sequences: the DeepSeek shape is a wider decode unit.
    assert serve_cfg["decode"]["ep_size"] >= serve_cfg["prefill"]["ep_size"]


def test_cluster_is_sized_for_the_serve_config(cluster, serve_cfg):
    gpu = _gpu_worker(cluster)
    per_node = gpu["resources"]["GPU"]
    roles = (serve_cfg["prefill"], serve_cfg["decode"])

    def nodes(key: str) -> int:  # every role at its min (or max) gangs
        return sum(r["ep_size"] * r.get("autoscaling", {}).get(key, r["num_gangs"]) // per_node for r in roles)

    assert nodes("min_gangs") == gpu["min_workers"], "the night's gangs fill exactly the nodes that always run"
    assert nodes("max_gangs") <= gpu["max_workers"] <= cluster["max_workers"], "the peak's gangs must fit"
    assert nodes("max_gangs") > nodes("min_gangs"), "the sample scales a role"


def test_serve_config_model_is_what_the_nodes_download(cluster, serve_cfg):
    home = f"/home/{cluster['auth']['ssh_user']}"
    model = serve_cfg["model"]
    assert model.startswith(home + "/"), model
    remote = "~" + model[len(home):]
    for role in ("head_setup_commands", "worker_setup_commands"):
        assert any(f"--local-dir {remote}" in c for c in cluster[role]), f"{role} does not fetch {remote}"
