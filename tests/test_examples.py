"""The examples, run the way users run them: offline_generate against `LLM`, openai_client against a real
server on 127.0.0.1, batch_job (the Ray Data processor) against the offline `LLM`'s greedy output."""
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


def _expected(llm, rows) -> dict:
    prompts = [_chat_ids(llm, r["messages"]) if "messages" in r else r["prompt"] for r in rows]
    return {r.get("id", i + 1): o.text for i, (r, o) in enumerate(zip(rows, llm.generate(prompts, GREEDY,
                                                                                           use_tqdm=False)))}


def test_unreachable_server_is_one_clear_line_and_exit_1():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there any more
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, "openai_client.py"), "--base-url", url],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r
    assert url in r.stderr and "rayinfer serve" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


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


def test_batch_job_runs_the_processor_and_matches_offline(ray_cluster, offline, tmp_path):
    rows = [{"id": f"p{i}", "prompt": f"Prompt {i}: " + "lorem ipsum "[: 3 + i % 9] * (1 + i % 4)} for i in range(8)]
    rows += [{"id": f"m{i}", "messages": [{"role": "user", "content": f"Question {i}?"}]} for i in range(4)]
    _jsonl(tmp_path / "in.jsonl", rows)
    got = _example("batch_job").main([str(tmp_path / "in.jsonl"), "--max-tokens", "8", "--temperature", "0"])
    assert {r["id"]: r["text"] for r in got} == _expected(offline, rows)
    assert len(got) == len(rows)
    assert all(r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 8 for r in got)
