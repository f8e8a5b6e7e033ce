"""The HTTP edge without a server: body bounds, hostile JSON, API keys, rank errors as one line, the
KV-capacity default for max_tokens, vLLM's extensions and /tokenize, per-choice seeds, the CLI."""
import asyncio
import dataclasses
import json

import pytest

from rayinfer.actors.choice import choice_seed
from rayinfer.openai.http_input import MAX_JSON_DEPTH, key_matches, one_line, parse_body, read_body
from rayinfer.model import resolve_model_path
from rayinfer.openai.protocol import APIError, ModelInfo, parse_chat_request, parse_completion_request
from rayinfer.openai.tokenize import detokenize, tokenize
from rayinfer.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def info() -> ModelInfo:
    return ModelInfo("tiny", 4096, 320, load_tokenizer(resolve_model_path("tiny")), max_token_chars=4)


def _error(fn, *args) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*args)
    return e.value


async def _chunks(n: int, size: int):
    for _ in range(n):
        yield b"x" * size


def test_body_limit_is_enforced_while_reading():
    read = asyncio.run(read_body(_chunks(4, 1000), 4000))
    assert len(read) == 4000
    consumed = []

    async def counting():
        async for c in _chunks(10_000, 1000):  # 10 MB
            consumed.append(c)
            yield c

    err = asyncio.run(_raises(read_body(counting(), 8192)))
    assert err.status == 413 and "8192 bytes" in err.message and "max_request_bytes" in err.message
    assert len(consumed) == 9  # stopped at the first chunk past the limit, not at the end of the body
    err = asyncio.run(_raises(read_body(_chunks(0, 0), 8192, content_length="9999999")))
    assert err.status == 413  # a declared length over the limit is refused before reading anything


async def _raises(coro) -> APIError:
    with pytest.raises(APIError) as e:
        await coro
    return e.value


@pytest.mark.parametrize("raw, fragment", [
    (b'{"model": "tiny", "prompt": "\\ud800abc"}', "surrogate"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\udfffb"}]}', "messages[0].content"),
    (b'{"\\ud800": 1}', "surrogate"),
    (b"[" * 100_000 + b"]" * 100_000, f"deeper than {MAX_JSON_DEPTH}"),
    (b"[" * 500 + b"]" * 500, f"deeper than {MAX_JSON_DEPTH}"),
    (b'{"a": ' + b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1) + b"}", "nested"),
    (b"[1, 2]", "JSON object, got list"),
    (b'"text"', "JSON object, got str"),
    (b"null", "JSON object, got NoneType"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{not json", "not valid JSON"),
    (b"", "not valid JSON"),
])
def test_hostile_bodies_are_400s(raw, fragment):
    err = _error(parse_body, raw)
    assert err.status == 400 and fragment in err.message, err.message
    assert "\ud800" not in err.message  # the message itself must be encodable


def test_sane_bodies_parse():
    nested = {"model": "tiny", "metadata": json.loads("[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1))}
    assert parse_body(json.dumps(nested).encode()) == nested
    assert parse_body('{"p": "[[[[ \\" {{{ é 😀"}'.encode()) == {"p": '[[[[ " {{{ é 😀'}


def test_api_keys_match_only_bearer_of_a_listed_key():
    keys = ("alpha-key", "beta-key")
    assert key_matches("Bearer alpha-key", keys) and key_matches("Bearer beta-key", keys)
    for bad in (None, "", "alpha-key", "Bearer ", "Bearer alpha", "Bearer alpha-key2", "Basic alpha-key",
                "bearer alpha-key"):
        assert not key_matches(bad, keys), bad


def test_rank_errors_read_as_one_line():
    class RayTaskError(ValueError):
        def __init__(self, cause):
            super().__init__("\x1b[36mray::ServeReplica:rayinfer:decode.handle_request()\x1b[39m "
                             "(pid=4242, ip=127.0.0.1, actor_id=9f3c1d2e4b5a69788796a5b4c3d2e1f0a1b2c3d4)\n"
                             "  File \"rank.py\", line 1\nValueError: boom")
            self.cause = cause

    wrapped = RayTaskError(ValueError("request 'x' needs 5000 tokens of KV cache; this engine's cache holds 4096"))
    assert one_line(wrapped) == "ValueError: request 'x' needs 5000 tokens of KV cache; this engine's cache holds 4096"
    died = RuntimeError("\x1b[31mThe actor died unexpectedly (pid=77, ip=127.0.0.1) Actor ID: 9f3c1d2e4b5a6978, "
                        "worker <ray._raylet.CoreWorker object at 0x7f00aa11bb22> exited\nmore detail")
    line = one_line(died)
    assert "\x1b" not in line and "0x7f00" not in line and "9f3c1d2e" not in line and "pid" not in line, line
    assert line.startswith("RuntimeError: The actor died unexpectedly") and "exited" in line and "detail" not in line
    rid = "chatcmpl-" + "ab" * 16  # the request's own id is what the client knows it by: kept
    assert rid in one_line(ValueError(f"request {rid!r} needs 5000 tokens"))
    assert len(one_line(RuntimeError("y" * 5000))) <= 300


def test_default_max_tokens_fits_the_ranks_kv_cache(info):
    small = dataclasses.replace(info, kv_capacity_tokens=100)
    spec = parse_chat_request({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, small)
    assert spec.params.max_tokens == 100 - len(spec.prompts[0][1])  # not 4096 - prompt: the cache bounds it
    err = _error(parse_chat_request, {"model": "tiny", "messages": [{"role": "user", "content": "x" * 200}]}, small)
    assert err.status == 400 and "at most 100 tokens of KV cache" in err.message
    err = _error(parse_completion_request, {"model": "tiny", "prompt": "hello", "max_tokens": 99}, small)
    assert err.status == 400 and "100" in err.message and "max_tokens" in err.message
    assert parse_completion_request({"model": "tiny", "prompt": "hello", "max_tokens": 90}, small).params.max_tokens == 90


def test_text_too_long_for_any_tokenization_is_refused_before_tokenizing(info, monkeypatch):
    calls = []
    monkeypatch.setattr(info.tokenizer, "encode", lambda *a, **k: calls.append(1) or [1])
    err = _error(parse_completion_request, {"model": "tiny", "prompt": "x" * (4096 * 4 + 1)}, info)
    assert err.code == "context_length_exceeded" and f"{4096 * 4 + 1} characters" in err.message and not calls
    err = _error(parse_chat_request, {"model": "tiny", "messages": [{"role": "user", "content": "x" * 20000}]}, info)
    assert err.param == "messages" and not calls


# The bodies vLLM's serving benchmark sends (`vllm bench serve --backend openai` / `openai-chat`).
VLLM_COMPLETION = {"model": "tiny", "prompt": "The capital of France is", "repetition_penalty": 1.0,
                   "max_tokens": 8, "logprobs": None, "stream": True, "stream_options": {"include_usage": True},
                   "ignore_eos": True, "temperature": 0.0}
VLLM_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
             "temperature": 0.0, "max_completion_tokens": 8, "stream": True,
             "stream_options": {"include_usage": True}, "ignore_eos": True}


def test_vllm_benchmark_bodies_and_extensions_parse(info):
    c = parse_completion_request(VLLM_COMPLETION, info)
    assert c.stream and c.include_usage and c.params.ignore_eos and c.params.max_tokens == 8
    ch = parse_chat_request(VLLM_CHAT, info)
    assert ch.stream and ch.params.max_tokens == 8
    ext = parse_completion_request(dict(VLLM_COMPLETION, repetition_penalty=1.3, min_tokens=4, top_k=5, min_p=0.1,
                                        stop_token_ids=[7, 9], skip_special_tokens=True,
                                        spaces_between_special_tokens=True, include_stop_str_in_output=False), info)
    p = ext.params
    assert (p.repetition_penalty, p.min_tokens, p.top_k, p.min_p, p.stop_token_ids) == (1.3, 4, 5, 0.1, (7, 9))
    for name, value in (("repetition_penalty", 0), ("min_tokens", 9), ("min_tokens", -1), ("stop_token_ids", [-1]),
                        ("stop_token_ids", "7"), ("skip_special_tokens", False),
                        ("include_stop_str_in_output", True), ("best_of_n_frobs", 1)):
        err = _error(parse_completion_request, dict(VLLM_COMPLETION, **{name: value}), info)
        assert err.status == 400 and name in err.message, (name, err.message)


def test_tokenize_and_detokenize_in_vllms_shapes(info):
    out = tokenize({"model": "tiny", "prompt": "hello", "return_token_strs": True}, info)
    assert out["count"] == len(out["tokens"]) == len(out["token_strs"]) and out["max_model_len"] == 4096
    assert detokenize({"tokens": out["tokens"]}, info)["prompt"] == "hello"
    chat = tokenize({"messages": [{"role": "user", "content": "hello"}]}, info)
    want = info.tokenizer.encode(info.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}]),
                                 add_special_tokens=False)
    assert chat["tokens"] == want and chat["token_strs"] is None
    assert _error(tokenize, {"prompt": "x", "messages": []}, info).status == 400
    assert _error(tokenize, {"model": "gpt-4", "prompt": "x"}, info).status == 404
    assert "frob" in _error(detokenize, {"tokens": [1], "frob": 1}, info).message
    assert "tokens" in _error(detokenize, {"tokens": [10 ** 9]}, info).message


def test_choice_seeds_do_not_collide_across_requests():
    seeds = {(s, i): choice_seed(s, i) for s in range(200) for i in range(16)}
    assert choice_seed(5, 0) == 5 and choice_seed(5, 1) != choice_seed(6, 0)
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= v < 2 ** 63 for v in seeds.values())


def test_bare_cli_prints_help_and_every_option_has_help(capsys):
    import argparse

    from rayinfer import cli

    assert cli.main([]) == 2
    assert "serve" in capsys.readouterr().out
    seen = []
    orig = argparse._ActionsContainer.add_argument

    def spy(self, *args, **kw):
        seen.append((args, kw.get("help")))
        return orig(self, *args, **kw)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(argparse._ActionsContainer, "add_argument", spy)
        with pytest.raises(SystemExit):
            cli.main(["serve", "--help"])
    assert len(seen) > 10 and all(h for args, h in seen if args != ("-h", "--help")), seen


def test_rebalance_fails_fast_without_a_cluster():
    # A fresh process, as a user's shell runs it: this test session may already be connected to Ray.
    import subprocess
    import sys
    import time

    from rayinfer.actors.cluster import free_port

    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "rayinfer.cli", "rebalance", "--address", f"127.0.0.1:{free_port()}",
                        "--connect-timeout", "5"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
    assert time.time() - t0 < 30
    assert "cannot reach the Ray cluster" in p.stderr


def test_serve_config_limits_and_keys():
    from rayinfer.config import ConfigError, ServeConfig

    c = ServeConfig.from_dict({"max_request_bytes": "1MiB", "api_keys": "s3cret"})
    assert c.max_request_bytes == 2**20 and c.api_keys == ("s3cret",) and "s3cret" not in repr(c)
    assert ServeConfig().max_request_bytes == 8 * 2**20 and ServeConfig().api_keys == ()
    with pytest.raises(ConfigError, match="max_request_bytes"):
        ServeConfig(max_request_bytes=10)
    with pytest.raises(ConfigError, match="api_keys") as e:
        ServeConfig(api_keys=(" padded-secret ",))
    assert "padded-secret" not in str(e.value)


def test_unexpected_errors_become_a_500_object_with_a_request_id(caplog):
    from fastapi.testclient import TestClient

    from rayinfer.actors.edge import app

    async def boom():
        raise KeyError("internal detail")

    app.add_api_route("/_boom_for_test", boom)
    try:
        with TestClient(app, raise_server_exceptions=False) as http:
            r = http.get("/_boom_for_test")
            err = r.json()["error"]
            assert r.status_code == 500 and err["type"] == "server_error" and "internal detail" not in err["message"]
            rid = err["message"].split("request id ")[1].split(")")[0]
            assert rid in caplog.text and "KeyError" in caplog.text  # logged with its traceback
            r = http.put("/_boom_for_test")
            assert r.status_code == 405 and r.headers["allow"] == "GET" and "PUT" in r.json()["error"]["message"]
            assert http.get("/nowhere").json()["error"]["type"] == "not_found_error"
    finally:
        app.router.routes[:] = [rt for rt in app.router.routes if getattr(rt, "path", "") != "/_boom_for_test"]


def test_retry_after_on_429_and_503_only():
    from rayinfer.actors.edge import error_response

    assert error_response(APIError(503, "no healthy gang")).headers["retry-after"] == "5"
    assert error_response(APIError(429, "queue full")).headers["retry-after"] == "1"
    assert "retry-after" not in error_response(APIError(400, "bad")).headers


def test_serving_a_public_address_without_a_key_warns(monkeypatch, capsys):
    from rayinfer.actors import server
    from rayinfer.config import ServeConfig

    def stop_here(*a, **k):
        raise RuntimeError("not starting in this test")

    monkeypatch.setattr(server, "start", stop_here)
    for host, keys, warned in (("0.0.0.0", (), True), ("0.0.0.0", ("k",), False), ("127.0.0.1", (), False),
                               ("my-host", (), True)):
        with pytest.raises(RuntimeError, match="not starting"):
            server.serve_forever(ServeConfig(host=host, api_keys=keys))
        err = capsys.readouterr().err
        assert ("without an API key" in err) == warned, (host, keys, err)
