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


def test_api_keys_from_a_file_join_the_flags_and_a_bad_file_is_named(tmp_path, monkeypatch, capsys):
    from rayinfer import cli

    seen = []
    monkeypatch.setattr("rayinfer.actors.server.serve_forever", lambda cfg, address, ready: seen.append(cfg))
    monkeypatch.delenv("RAYINFER_API_KEY", raising=False)
    keys = tmp_path / "keys"
    keys.write_text("# serving keys\nsk-one\n\n  sk-two  \n")
    assert cli.main(["serve", "--api-key-file", str(keys), "--api-key", "sk-flag"]) == 0
    assert seen[-1].api_keys == ("sk-flag", "sk-one", "sk-two")
    keys.write_text("# nothing\n\n")
    assert cli.main(["serve", "--api-key-file", str(keys)]) == 2
    assert "holds no key" in capsys.readouterr().err
    assert cli.main(["serve", "--api-key-file", str(tmp_path / "missing")]) == 2
    assert "cannot read it" in capsys.readouterr().err and len(seen) == 1
