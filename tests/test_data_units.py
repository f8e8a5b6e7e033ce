"""rayinfer.data without Ray: the batch-file envelope, resuming an output cut off mid-write, the processor
config's validation, and the error when Ray Data is missing."""
import builtins
import json

import pytest

from rayinfer.config.model import ConfigError
from rayinfer.data.batch_file import Output, envelope, request_id
from rayinfer.data.config import ProcessorConfig
from rayinfer.data.rows import MESSAGES, SAMPLING, decode_row, encode_row, plan_row
from rayinfer.openai.protocol import ModelInfo


def test_envelope_keeps_the_custom_id_of_a_line_it_refuses():
    ok = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}
    req, err = envelope(1, json.dumps(ok))
    assert err is None and req["custom_id"] == "a" and req["openai_url"] == "/v1/completions"
    for line, custom_id, says in ((dict(ok, method="GET"), "a", "'method'"),
                                  (dict(ok, url="/v1/embeddings"), "a", "/v1/embeddings"),
                                  (dict(ok, body="x"), "a", "'body'"),
                                  (dict(ok, custom_id=7), None, "'custom_id'")):
        req, err = envelope(3, json.dumps(line))
        assert req is None and err["custom_id"] == custom_id and says in err["error"]["message"], err
        assert err["id"] == (request_id("a") if custom_id else "batch_req_line3")
    req, err = envelope(9, '{"custom_id": "b", "method"')
    assert req is None and err["id"] == "batch_req_line9" and "line 9 is not valid JSON" in err["error"]["message"]


def test_output_drops_a_torn_last_line_and_knows_what_is_done(tmp_path):
    path = tmp_path / "out.jsonl"
    lines = [json.dumps({"id": request_id(c), "custom_id": c}) for c in ("a", "b")]
    path.write_text("\n".join(lines) + "\n" + lines[0][:10], encoding="utf-8")
    out = Output(str(path))
    assert out.done == {"a", "b"}
    out.write({"id": request_id("c"), "custom_id": "c"})
    with pytest.raises(AssertionError):
        out.write({"id": request_id("a"), "custom_id": "a"})  # written twice: refused
    out.close()
    assert [json.loads(x)["custom_id"] for x in path.read_text(encoding="utf-8").splitlines()] == ["a", "b", "c"]


def test_processor_config_fails_in_the_driver():
    for bad, says in ((dict(ep_size=0), "ep_size"), (dict(engine_kwargs={"frobnicate": 1}), "frobnicate"),
                      (dict(engine_kwargs={"ep_size": 2}), "processor config itself"),
                      (dict(sampling_params={"temperature": -1}), "temperature")):
        with pytest.raises(ConfigError, match=says):
            ProcessorConfig(**bad)


def test_rows_round_trip_and_a_bad_row_fails_alone():
    row = {"messages": [{"role": "user", "content": "hi"}], "sampling_params": {"max_tokens": 3}, "k": 1}
    enc = encode_row(row)
    assert set(enc) == {MESSAGES, SAMPLING, "k"} and decode_row(enc) == row
    info = ModelInfo("tiny", 64, 300)
    plan = plan_row({"prompt_token_ids": [1, 2, 3], SAMPLING: json.dumps({"max_tokens": 3})}, info, {"temperature": 0})
    assert plan.error is None and plan.prompts == [[1, 2, 3]] and plan.params.max_tokens == 3 and plan.params.greedy
    assert "exactly one of" in plan_row({"prompt": "x", "prompt_token_ids": [1]}, info, {}).error.message
    assert "[0, 300)" in plan_row({"prompt_token_ids": [300]}, info, {}).error.message
    assert "temperature" in plan_row({"prompt_token_ids": [1], SAMPLING: '{"temperature": -1}'}, info, {}).error.message


def test_a_missing_ray_data_says_what_to_install(monkeypatch):
    from rayinfer.data import processor

    real = builtins.__import__

    def no_pandas(name, *a, **kw):
        if name == "pandas":
            raise ImportError("No module named 'pandas'", name="pandas")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_pandas)
    with pytest.raises(ImportError, match=r"pandas is missing.*pip install 'rayinfer\[data\]'"):
        processor.require_ray_data()
