"""The on-disk KV tier's storage, without a model: format checks, atomic concurrent writes, the byte
budget and LRU eviction, bad files, a full disk, an unusable directory, dropped writes, counters."""
import multiprocessing as mp
import os
import threading

import pytest

from rayinfer.config import ConfigError, EngineConfig
from rayinfer.engine import disk_cache
from rayinfer.engine.block_manager import prefix_hashes
from rayinfer.engine.disk_cache import DiskCache, DiskCacheError

FP = "model=tiny; dtype=float32; layers=3; layout=[layers,64,24]"


def _page(i: int, size: int = 4096) -> bytes:
    return bytes((i * 31 + j) % 251 for j in range(size))


def _hashes(n: int, seed: int = 0) -> list[bytes]:
    return prefix_hashes(list(range(seed, seed + 64 * n)), 64, n)


def _files(d) -> list[str]:
    return sorted(os.path.join(d, f) for f in os.listdir(d))


def test_pages_round_trip_and_count_hits_and_misses_in_tokens(tmp_path):
    c = DiskCache(str(tmp_path), 2**20, FP)
    hs = _hashes(3)
    for i, h in enumerate(hs[:2]):
        assert c.write(h, _page(i))
    assert c.read_prefix(hs) == [_page(0), _page(1)]  # the third page is not there: the prefix stops
    assert c.load_async(hs[1:]).result(timeout=10) == [_page(1)]
    s = c.stats()
    assert (s["hit_tokens"], s["miss_tokens"], s["pages_read"], s["pages_written"]) == (192, 128, 3, 2)
    size = os.path.getsize(c.path(hs[0]))
    assert size > 4096 and s["bytes_written"] == 2 * size and s["bytes_read"] == 3 * size
    assert s["read_seconds"] > 0 and s["corrupt_pages"] == 0
    assert not c.write(hs[0], _page(0))  # content-addressed: a page already there is not rewritten


@pytest.mark.parametrize("damage", ["flip_payload", "flip_header", "truncate", "empty", "wrong_hash", "foreign"])
def test_bad_files_read_as_misses_are_counted_and_removed(tmp_path, damage):
    c = DiskCache(str(tmp_path), 2**20, FP)
    h, other = _hashes(2)
    c.write(h, _page(0))
    p = c.path(h)
    data = bytearray(open(p, "rb").read())
    if damage == "flip_payload":
        data[-100] ^= 1
    elif damage == "flip_header":
        data[30] ^= 1
    elif damage == "truncate":
        data = data[:-1]
    elif damage == "empty":
        data = b""
    elif damage == "wrong_hash":  # a whole, valid page filed under another page's name
        data = bytearray(c.encode(other, _page(0)))
    else:  # a page of another model (or dtype, or layout) under this model's name
        data = bytearray(DiskCache(str(tmp_path / "x"), 2**20, FP + " bf16").encode(h, _page(0)))
    open(p, "wb").write(bytes(data))
    assert c.read(h) is None and c.read_prefix([h]) == []
    assert c.stats()["corrupt_pages"] == 1  # the first read removed it: the second is a plain miss
    assert not os.path.exists(p)
    assert c.write(h, _page(0)) and c.read(h) == _page(0)  # recomputed and written again


def test_another_models_pages_are_never_seen(tmp_path):
    a, b = DiskCache(str(tmp_path), 2**20, FP), DiskCache(str(tmp_path), 2**20, FP.replace("float32", "bfloat16"))
    h = _hashes(1)[0]
    a.write(h, _page(0))
    assert b.read_prefix([h]) == [] and not b.contains(h) and a.read(h) == _page(0)


def _writer(d: str, seed: int, n: int) -> None:
    c = DiskCache(d, 2**30, FP)
    for i, h in enumerate(_hashes(n)):  # every process writes the same pages...
        c.write(h, _page(i))
    for i, h in enumerate(_hashes(n, seed=1000 * (seed + 1))):  # ...and some of its own
        c.write(h, _page(i + seed))


def test_concurrent_writers_in_several_processes_leave_whole_pages(tmp_path):
    d, n = str(tmp_path), 20
    procs = [mp.get_context("fork").Process(target=_writer, args=(d, s, n)) for s in range(4)]
    threads = [threading.Thread(target=_writer, args=(d, 9, n)) for _ in range(2)]
    c = DiskCache(d, 2**30, FP)
    seen = []  # a reader racing the writers sees whole pages or none: never a half-written file

    def read_while_writing():
        while any(w.is_alive() for w in procs + threads):
            seen.extend(p for p in c.read_prefix(_hashes(n)))

    for w in procs + threads:
        w.start()
    reader = threading.Thread(target=read_while_writing)
    reader.start()
    for w in procs + threads + [reader]:
        w.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert c.stats()["corrupt_pages"] == 0 and set(seen) <= {_page(i) for i in range(n)}
    assert c.read_prefix(_hashes(n)) == [_page(i) for i in range(n)]
    for s in (0, 1, 2, 3, 9):
        assert c.read_prefix(_hashes(n, seed=1000 * (s + 1))) == [_page(i + s) for i in range(n)]
    assert c.stats()["corrupt_pages"] == 0
    assert all(f.endswith(".kvp") for f in os.listdir(d))  # no temporary file left behind
    assert len(os.listdir(d)) == 6 * n


def test_budget_evicts_least_recently_used_pages(tmp_path):
    probe = DiskCache(str(tmp_path / "probe"), 2**20, FP)
    size = len(probe.encode(b"\0" * 16, _page(0)))
    c = DiskCache(str(tmp_path / "c"), 3 * size, FP)
    hs = _hashes(5)
    for i, h in enumerate(hs[:3]):
        c.write(h, _page(i))
        os.utime(c.path(h), (1000 + i, 1000 + i))  # distinct ages regardless of the clock's resolution
    assert c.read(hs[0]) == _page(0)  # page 0 becomes the most recently used
    c.write(hs[3], _page(3))
    assert [c.contains(h) for h in hs[:4]] == [True, False, True, True]
    assert c.stats()["evictions"] == 1 and c.stats()["used_bytes"] <= 3 * size
    c2 = DiskCache(str(tmp_path / "c"), 3 * size, FP)  # another process sharing the directory sees the same budget
    assert c2.stats()["used_bytes"] == 3 * size
    c2.write(hs[4], _page(4))
    assert sum(c.contains(h) for h in hs) == 3 and c.contains(hs[4])


def test_full_disk_skips_writes_and_reads_go_on(tmp_path, monkeypatch):
    c = DiskCache(str(tmp_path), 2**20, FP)
    h1, h2 = _hashes(2)
    c.write(h1, _page(0))

    def enospc(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(disk_cache.os, "replace", enospc)
    assert not c.write(h2, _page(1))
    c.write_async(h2, _page(1))
    c.flush()
    monkeypatch.undo()
    s = c.stats()
    assert s["write_errors"] == 2 and s["pages_written"] == 1
    assert c.read_prefix([h1, h2]) == [_page(0)]
    assert os.listdir(tmp_path) == [os.path.basename(c.path(h1))]  # no temporary file left


def test_unusable_directory_is_a_clear_error_naming_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(DiskCacheError, match="a-file/kv.*not a writable directory"):
        DiskCache(str(blocker / "kv"), 2**20, FP)
    from rayinfer import LLM

    with pytest.raises(ValueError, match="disk_cache_dir .*a-file/kv"):
        LLM("tiny", disk_cache_dir=str(blocker / "kv"))


def test_writes_that_cannot_keep_up_are_dropped_not_waited_for(tmp_path, monkeypatch):
    c = DiskCache(str(tmp_path), 2**20, FP, max_pending_writes=2)
    gate, entered = threading.Event(), threading.Event()
    real = c.write

    def slow_write(h, payload):
        entered.set()
        gate.wait(30)
        return real(h, payload)

    monkeypatch.setattr(c, "write", slow_write)
    hs = _hashes(6)
    assert c.write_async(hs[0], _page(0))
    entered.wait(10)  # the writer holds page 0; two more fit the queue, the rest are dropped
    kept = [c.write_async(h, _page(i)) for i, h in enumerate(hs[1:], 1)]
    assert kept == [True, True, False, False, False] and not c.can_accept()
    assert c.stats()["writes_dropped"] == 3
    gate.set()
    c.flush()
    assert [c.contains(h) for h in hs] == [True, True, True, False, False, False]


def test_engine_options_for_the_disk_tier_are_validated():
    cfg = EngineConfig.from_options("tiny", disk_cache_dir="/tmp/kv", disk_cache_bytes="2GiB")
    assert cfg.cache.disk_cache_dir == "/tmp/kv" and cfg.cache.disk_cache_bytes == 2 * 2**30
    with pytest.raises(ConfigError, match="disk_cache_bytes.*-5"):
        EngineConfig.from_options("tiny", disk_cache_dir="/tmp/kv", disk_cache_bytes=-5)
    with pytest.raises(ConfigError, match="enable_prefix_caching"):
        EngineConfig.from_options("tiny", disk_cache_dir="/tmp/kv", enable_prefix_caching=False)


def test_serve_config_and_cli_carry_the_disk_tier_to_every_role(tmp_path, capsys):
    from rayinfer.cli import main
    from rayinfer.config import ServeConfig

    cfg = ServeConfig.from_dict({"disk_cache_dir": str(tmp_path), "disk_cache_bytes": "3GiB"})
    for role in ("prefill", "decode"):
        c = cfg.engine_config(role).cache
        assert (c.disk_cache_dir, c.disk_cache_bytes) == (str(tmp_path), 3 * 2**30)
    with pytest.raises(ConfigError, match="disk_cache_bytes.*'lots'"):
        ServeConfig.from_dict({}, disk_cache_dir=str(tmp_path), disk_cache_bytes="lots")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # refused before any Ray or Serve process starts
    from rayinfer.actors.cluster import free_port

    argv = ["serve", "--port", str(free_port()), "--disk-cache-dir", str(blocker / "kv"), "--disk-cache-bytes", "1GiB"]
    assert main(argv) == 2
    assert f"disk_cache_dir '{blocker / 'kv'}' is not a writable directory" in capsys.readouterr().err


def test_weights_digest_sees_a_tuned_inner_layer_and_not_the_ranks_expert_share():
    import torch

    from rayinfer.engine.model_runner import weights_digest
    from rayinfer.model import load_model

    base = load_model("tiny")
    digest = weights_digest(base)
    assert weights_digest(load_model("tiny")) == digest
    moe_layers = sorted({int(n.split(".")[1]) for n, _ in base.named_parameters() if n.endswith(".experts.w13")})
    share = load_model("tiny", local_experts={layer: [0, 1] for layer in moe_layers})  # another rank's experts
    assert weights_digest(share) == digest, "ranks holding other experts must share the disk tier"
    for name in ("layers.1.self_attn.kv_a_layernorm.weight", "layers.1.mlp.shared_experts.down_proj.weight",
                 "layers.1.mlp.gate.weight"):
        tuned = load_model("tiny")
        with torch.no_grad():
            p = dict(tuned.named_parameters())[name]
            p.add_(torch.randn_like(p) * 1e-3)  # what a fine-tune does to an inner layer's tensor
        assert weights_digest(tuned) != digest, name
