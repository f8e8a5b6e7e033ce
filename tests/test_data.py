"""Batch jobs through Ray Data (rayinfer.data): `rayinfer run-batch` on an OpenAI batch file of 200 chat
requests (4 malformed) with --model tiny, resumed after a crash mid-write; and the processor on an EP gang of 2
ranks, one of which is killed mid-job. Greedy outputs must equal the offline LLM's for the same prompts."""
import json
import os
import signal

import pytest

pytest.importorskip("ray.data")  # the `data` extra

from rayinfer import LLM, SamplingParams  # noqa: E402
from rayinfer.openai_protocol import APIError, ModelInfo, parse_chat_request  # noqa: E402

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


def test_run_batch_matches_offline_and_resumes_after_a_crash_mid_write(ray_cluster, offline, tmp_path):
    from rayinfer.cli import main
    from rayinfer.data import ProcessorConfig
    from rayinfer.data.run_batch import run_batch

    llm, want = offline
    src, out = tmp_path / "batch.jsonl", tmp_path / "results.jsonl"
    src.write_text("".join(json.dumps(_line(i)) + "\n" for i in range(200)), encoding="utf-8")
    assert main(["run-batch", "-i", str(src), "-o", str(out), "--model", "tiny"]) == 0
    lines = _read(out)
    by_id = {r["custom_id"]: r for r in lines}
    assert len(by_id) == len(lines) == 200
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
    assert sum(b["usage"]["prompt_tokens_details"]["cached_tokens"] for b in got.values()) >= 64 * 100, \
        "rows sharing the system prompt should hit the prefix cache"

    # A crash mid-write: 120 lines and half of the next survive. The rerun does exactly the other 80.
    raw = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(raw[:120]) + raw[120][:40], encoding="utf-8")
    stats = run_batch(str(src), str(out), ProcessorConfig(model="tiny", batch_size=16))
    assert (stats.skipped, stats.done, stats.total) == (120, 80, 200)
    again = _read(out)
    assert sorted(r["custom_id"] for r in again) == sorted(f"req-{i}" for i in range(200))
    strip = lambda r: (r["custom_id"], r["error"], r["response"] and r["response"]["body"].get("choices"))  # noqa: E731
    assert sorted(map(strip, again)) == sorted(map(strip, lines))


def _kill_one_rank(tag: str) -> int:
    from ray import serve

    from rayinfer.actors.data_worker import GANG_APP_PREFIX

    [app] = [n for n in serve.status().applications if n.startswith(f"{GANG_APP_PREFIX}{tag}-")]
    stats = serve.get_deployment_handle("ranks", app_name=app).broadcast("stats").results(timeout_s=30)
    busy = max(stats, key=lambda s: s.get("num_requests", 0))
    os.kill(busy["pid"], signal.SIGKILL)
    return busy["pid"]


def test_processor_on_an_ep2_gang_survives_a_rank_killed_mid_job(ray_cluster, offline):
    import ray

    from rayinfer.data import ProcessorConfig, build_processor

    _, want = offline
    good = [i for i in range(200) if i not in BAD]
    processor = build_processor(
        ProcessorConfig(model="tiny", ep_size=2, batch_size=14, max_concurrent_batches=2),
        # row functions travel by value: they may use constants, not this module's functions
        preprocess=lambda row: {"id": row["id"], "messages": [{"role": "system", "content": SYSTEM},
                                                              {"role": "user", "content": row["q"]}],
                                "sampling_params": {"temperature": 0, "max_tokens": MAX_TOKENS}},
        postprocess=lambda row: {"id": f"req-{row['id']}", "text": row["generated_text"],
                                 "tokens": list(row["generated_token_ids"]), "attempts": row["attempts"],
                                 "error": row["error"]})
    items = [{"id": i, "q": _messages(i)[1]["content"]} for i in good]
    ds = processor(ray.data.from_items(items, override_num_blocks=14))
    rows, killed = [], None
    try:
        for row in ds.iter_rows():
            rows.append(row)
            if killed is None and len(rows) >= 28:
                killed = _kill_one_rank(processor.tag)
    finally:
        processor.cleanup()
    assert killed is not None
    assert sorted(r["id"] for r in rows) == sorted(want), "a row was lost or duplicated"
    assert all(r["error"] is None for r in rows), [r for r in rows if r["error"]][:3]
    assert {r["id"]: (r["text"], r["tokens"]) for r in rows} == want
    recomputed = sum(r["attempts"] > 1 for r in rows)
    print(f"\n[data] rank pid {killed} killed after 28 of {len(good)} rows: {recomputed} rows recomputed")
    assert recomputed > 0, "the kill hit no row in flight"
