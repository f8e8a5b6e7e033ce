"""Batch jobs through Ray Data (rayinfer.data): an OpenAI batch file of 200 chat requests (4 malformed) through
the processor, with `rayinfer run-batch --model tiny` finishing a run that was interrupted (and whose last write
was torn), and on an EP gang of 2 ranks, one of which is killed mid-job. Greedy outputs must equal the offline
LLM's for the same prompts; each custom_id is written exactly once. (The processor's row functions on their own:
tests/test_examples.py, through examples/batch_job.py.)"""
import json
import os
import signal

import pytest

pytest.importorskip("ray.data")  # the `data` extra

from rayinfer import LLM, SamplingParams  # noqa: E402
from rayinfer.openai.protocol import APIError, ModelInfo, parse_chat_request  # noqa: E402

SYSTEM = "You are a careful assistant who answers in one short sentence. " * 2  # > 64 tokens: a shared page
MAX_TOKENS = 6
BAD = {17: ("body", {"messages": [{"role": "wizard", "content": "hi"}]}),
       60: ("body", {"frobnicate": 1}),
       111: ("url", "/v1/embeddings"),
       170: ("body", {"temperature": 5})}


def _messages(i):
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}: what is {i} + {i}?"}]


def _line(i):
    line = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": _messages(i), "max_tokens": MAX_TOKENS, "temperature": 0}}
    where, change = BAD.get(i, (None, None))
    if where == "url":
        line["url"] = change
    elif where == "body":
        line["body"].update(change)
    return line


@pytest.fixture(scope="module")
def offline():
    llm = LLM("tiny")
    good = [i for i in range(200) if i not in BAD]
    ids = [llm.tokenizer.encode(llm.tokenizer.apply_chat_template(_messages(i)), add_special_tokens=False)
           for i in good]
    outs = llm.generate(ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), use_tqdm=False)
    return llm, {f"req-{i}": (o.text, o.token_ids) for i, o in zip(good, outs)}


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _http_error(llm, i):
    """What the HTTP server answers for bad line i's body (none of these depends on the model's limits)."""
    info = ModelInfo("tiny", 4096, llm.tokenizer.vocab_size, llm.tokenizer)
    with pytest.raises(APIError) as e:
        parse_chat_request(_line(i)["body"], info)
    return e.value.message


def _check(out, llm, want):
    """The output holds each custom_id once: the 196 results equal to the offline LLM's, the 4 bad lines as
    errors carrying the HTTP server's own messages."""
    lines = _read(out)
    by_id = {r["custom_id"]: r for r in lines}
    assert len(by_id) == len(lines) == 200, "a custom_id is missing or written twice"
    errors = {k: r for k, r in by_id.items() if r["error"] is not None}
    assert sorted(errors) == sorted(f"req-{i}" for i in BAD)
    for i in (17, 60, 170):  # the HTTP server's own validation and message
        r = errors[f"req-{i}"]
        assert r["response"]["status_code"] == 400 and r["error"]["message"] == _http_error(llm, i), r
        assert r["response"]["body"]["error"]["message"] == r["error"]["message"]
    assert "/v1/embeddings" in errors["req-111"]["error"]["message"] and errors["req-111"]["response"] is None
    got = {k: r["response"]["body"] for k, r in by_id.items() if k not in errors}
    assert {k: b["choices"][0]["message"]["content"] for k, b in got.items()} == {k: t for k, (t, _) in want.items()}
    assert all(b["usage"]["completion_tokens"] == MAX_TOKENS and b["object"] == "chat.completion"
               for b in got.values())
    return got


def _batch_file(tmp_path):
    src = tmp_path / "batch.jsonl"
    src.write_text("".join(json.dumps(_line(i)) + "\n" for i in range(200)), encoding="utf-8")
    return src, tmp_path / "results.jsonl"


class Interrupted(Exception):
    pass


def test_run_batch_matches_offline_and_resumes_an_interrupted_run(ray_cluster, offline, tmp_path, capsys):
    from rayinfer.cli import main
    from rayinfer.data import ProcessorConfig
    from rayinfer.data.run_batch import run_batch

    llm, want = offline
    src, out = _batch_file(tmp_path)

    def interrupt(stats):  # Ctrl-C once a third of the job is on disk
        if stats.done >= 60:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_batch(str(src), str(out), ProcessorConfig(model="tiny", batch_size=16, max_concurrent_batches=2), interrupt)
    raw = out.read_text(encoding="utf-8").splitlines(keepends=True)
    assert 60 <= len(raw) < 200
    out.write_text("".join(raw[:-1]) + raw[-1][:40], encoding="utf-8")  # and the last write was torn by a crash
    capsys.readouterr()
    assert main(["run-batch", "-i", str(src), "-o", str(out), "--model", "tiny"]) == 0
    said = capsys.readouterr().out
    assert f"{200 - (len(raw) - 1)} results written" in said and f"{len(raw) - 1} already there" in said, said
    got = _check(out, llm, want)
    assert sum(b["usage"]["prompt_tokens_details"]["cached_tokens"] for b in got.values()) >= 64 * 100, \
        "rows sharing the system prompt should hit the prefix cache"


def _kill_one_rank() -> int:
    from ray import serve

    from rayinfer.actors.data_worker import GANG_APP_PREFIX

    [app] = [n for n in serve.status().applications if n.startswith(GANG_APP_PREFIX)]
    stats = serve.get_deployment_handle("ranks", app_name=app).broadcast("stats").results(timeout_s=30)
    busy = max(stats, key=lambda s: s.get("num_requests", 0))
    os.kill(busy["pid"], signal.SIGKILL)
    return busy["pid"]


def test_run_batch_on_an_ep2_gang_survives_a_rank_killed_mid_job(ray_cluster, offline, tmp_path):
    from rayinfer.data import ProcessorConfig
    from rayinfer.data.run_batch import run_batch

    llm, want = offline
    src, out = _batch_file(tmp_path)
    killed = []

    def kill_once(stats):
        if not killed and stats.done >= 28:
            killed.append(_kill_one_rank())

    stats = run_batch(str(src), str(out), ProcessorConfig(model="tiny", ep_size=2, batch_size=14,
                                                          max_concurrent_batches=2), kill_once)
    assert killed
    _check(out, llm, want)
    print(f"\n[data] rank pid {killed[0]} killed after 28 of 200 lines: {stats.recomputed} rows recomputed")
    assert stats.recomputed > 0, "the kill hit no row in flight"
    assert (stats.done, stats.errors, stats.skipped) == (200, 4, 0)
