"""`rayinfer serve` as a user runs it, when a deployment cannot start: the replica's own error in the
terminal and a non-zero exit, instead of Ray's "Failed to update the deployments"."""
import os
import shutil
import subprocess
import sys

from rayinfer.actors.cluster import free_port
from rayinfer.model import resolve_model_path


def test_serve_prints_the_replicas_error_and_exits_nonzero(tmp_path):
    ckpt = tmp_path / "broken"
    shutil.copytree(resolve_model_path("tiny"), ckpt)  # config and tokenizer fine, weights not
    (ckpt / "model.safetensors").write_bytes(os.urandom(100))
    cli = os.path.join(os.path.dirname(sys.executable), "rayinfer")
    r = subprocess.run([cli, "serve", "--model", str(ckpt), "--port", str(free_port()), "--colocated"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    last = r.stderr[r.stderr.rfind("rayinfer: error:"):]
    assert "failed to start" in last and "deployment 'mixed'" in last, r.stderr[-3000:]
    assert "SafetensorError" in last and "deserializing header" in last, last[-2000:]
