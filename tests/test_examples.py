"""The examples, run the way users run them: offline_generate against `LLM`, openai_client and
batch_job against a real server on 127.0.0.1 whose queue bound is small enough to force 429s."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
from ray import serve

from rayinfer import LLM, SamplingParams
from rayinfer.actors.cluster import free_port
from rayinfer.actors.server import APP_NAME, start
from rayinfer.config import ServeConfig

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
MAX_QUEUE = 4
GREEDY = SamplingParams(max_tokens=8, temperature=0)


def _example(name: str):
    """examples/ is a folder of scripts, not a package: load one by path."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def offline():
    return LLM("tiny")


@pytest.fixture(scope="module")
def server(ray_cluster):
    serve.shutdown()  # earlier tests may have started Serve without an HTTP proxy
    url, _ = start(ServeConfig(port=free_port(), max_queue=MAX_QUEUE))
    yield url + "/v1"
    serve.delete(APP_NAME)
    serve.shutdown()


def _chat_ids(llm, messages):
    return llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages), add_special_tokens=False)


def _jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _results(path) -> dict:
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    by_id = {r["id"]: r for r in records}
    assert len(by_id) == len(records), "an id was written twice"
    return by_id


def _expected(llm, rows) -> dict:
    prompts = [_chat_ids(llm, r["messages"]) if "messages" in r else r["prompt"] for r in rows]
    return {r.get("id", i + 1): o.text for i, (r, o) in enumerate(zip(rows, llm.generate(prompts, GREEDY,
                                                                                           use_tqdm=False)))}


def test_unreachable_server_is_one_clear_line_and_exit_1(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there any more
    _jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    for cmd in (["openai_client.py", "--base-url", url],
                ["batch_job.py", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                 "--base-url", url]):
        r = subprocess.run([sys.executable, os.path.join(EXAMPLES, cmd[0]), *cmd[1:]], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 1, r
        assert url in r.stderr and "rayinfer serve" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out.jsonl").exists() or (tmp_path / "out.jsonl").read_text() == ""


def test_offline_generate_returns_what_llm_generates(offline, capsys):
    prompts = ["Hello, my name is", "The capital of France is"]
    got = _example("offline_generate").main([*prompts, "--max-tokens", "8", "--temperature", "0"])
    want = offline.generate(prompts, GREEDY, use_tqdm=False)
    assert [(o.text, o.token_ids, o.finish_reason) for o in got] == \
        [(o.text, o.token_ids, o.finish_reason) for o in want]
    out = capsys.readouterr().out
    assert "TTFT" in out and "tokens/s" in out


def test_openai_client_streams_the_offline_greedy_text(server, offline, capsys):
    prompt = "Tell me about expert parallelism."
    text = _example("openai_client").main(["--base-url", server, "--prompt", prompt, "--max-tokens", "8",
                                           "--temperature", "0"])
    ids = _chat_ids(offline, [{"role": "user", "content": prompt}])
    assert text == offline.generate([ids], GREEDY, use_tqdm=False)[0].text
    out = capsys.readouterr().out
    assert "models: tiny" in out and text in out
    m = re.search(r"usage: prompt (\d+) tokens \(cached (\d+); DeepSeek cache hit (\d+), miss (\d+)\), "
                  r"completion 8, total (\d+)", out)
    assert m, out
    prompt_tokens, cached, hit, miss, total = map(int, m.groups())
    assert prompt_tokens == len(ids) and cached == hit and hit + miss == prompt_tokens and total == prompt_tokens + 8


def test_batch_job_completes_resumes_and_skips_what_is_done(server, offline, tmp_path):
    rows = [{"id": f"p{i}", "prompt": f"Prompt {i}: " + "lorem ipsum "[: 3 + i % 9] * (1 + i % 4)} for i in range(24)]
    rows += [{"messages": [{"role": "user", "content": f"Question {i}?"}]} for i in range(6)]  # ids: line numbers
    _jsonl(tmp_path / "in.jsonl", rows)
    want = _expected(offline, rows)
    out = tmp_path / "out.jsonl"
    job = _example("batch_job")
    args = [str(tmp_path / "in.jsonl"), "--output", str(out), "--base-url", server, "--max-tokens", "8",
            "--temperature", "0", "--concurrency", str(MAX_QUEUE)]

    stats = job.main(args)
    assert (stats.done, stats.skipped, stats.failed) == (30, 0, 0)
    got = _results(out)
    assert {k: r["text"] for k, r in got.items()} == want
    assert all(r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 8 for r in got.values())
    assert stats.completion_tokens == 30 * 8

    # A crash mid-write: 20 results and half a line survive; the rerun does exactly the other 10.
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines[:20]) + lines[20][:15], encoding="utf-8")
    stats = job.main(args)
    assert (stats.done, stats.skipped, stats.failed) == (10, 20, 0)
    assert {k: r["text"] for k, r in _results(out).items()} == want

    stats = job.main(args)  # everything is done: nothing is sent
    assert (stats.done, stats.skipped, stats.failed) == (0, 30, 0)
    assert len(out.read_text(encoding="utf-8").splitlines()) == 30


def test_batch_job_beyond_the_queue_bound_retries_429s_to_completion(server, offline, tmp_path):
    rows = [{"id": i, "prompt": f"Burst {i}: the same server, four times over its queue bound"} for i in range(16)]
    bad = {"id": "bad", "messages": [{"role": "wizard", "content": "x"}]}  # a 400: recorded, never retried
    _jsonl(tmp_path / "in.jsonl", rows + [bad])
    want = _expected(offline, rows)
    out = tmp_path / "out.jsonl"
    stats = _example("batch_job").main([str(tmp_path / "in.jsonl"), "--output", str(out), "--base-url", server,
                                        "--max-tokens", "8", "--temperature", "0",
                                        "--concurrency", str(4 * MAX_QUEUE)])
    print(f"\n[examples] batch of 16 at concurrency {4 * MAX_QUEUE} vs queue bound {MAX_QUEUE}: "
          f"{stats.rate_limited} 429s retried, {stats.seconds:.1f} s")
    assert stats.rate_limited > 0
    assert (stats.done, stats.failed) == (16, 1)
    got = _results(out)
    assert "HTTP 400" in got.pop("bad")["error"]
    assert {k: r["text"] for k, r in got.items()} == want


def test_batch_job_honours_per_line_fields_and_refuses_another_model(server, tmp_path, capsys):
    rows = [{"id": "three", "prompt": "Per-line fields", "max_tokens": 3, "ignore_eos": True},
            {"id": "default", "prompt": "Per-line fields", "ignore_eos": True},
            {"id": "unknown", "prompt": "Per-line fields", "frobnicate": 1},
            {"id": "same-model", "prompt": "Per-line fields", "model": "tiny", "max_tokens": 2}]
    _jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    args = ["--output", str(out), "--base-url", server, "--max-tokens", "8"]
    stats = _example("batch_job").main([str(tmp_path / "in.jsonl"), *args])
    got = _results(out)
    assert (stats.done, stats.failed) == (3, 1)
    assert got["three"]["usage"]["completion_tokens"] == 3 and got["default"]["usage"]["completion_tokens"] == 8
    assert got["same-model"]["usage"]["completion_tokens"] <= 2
    assert "HTTP 400" in got["unknown"]["error"] and "frobnicate" in got["unknown"]["error"]

    _jsonl(tmp_path / "other.jsonl", [{"id": "x", "prompt": "hi"}, {"id": "y", "prompt": "hi", "model": "gpt-4o"}])
    with pytest.raises(SystemExit) as e:
        _example("batch_job").main([str(tmp_path / "other.jsonl"), "--output", str(tmp_path / "o2.jsonl"),
                                    "--base-url", server])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "'y'" in err and "gpt-4o" in err and "'tiny'" in err
    assert not (tmp_path / "o2.jsonl").exists() or not (tmp_path / "o2.jsonl").read_text()
