"""Speculative decoding served disaggregated (a prefill rank, a decode rank drafting 2 tokens a step, both ep_size 1):
greedy completions, streamed and not, are the offline engine's tokens, usage counts only emitted tokens, and the
decode rank's stats count its drafts per position."""
import json
import urllib.request

import pytest
from ray import serve

from rayinfer import LLM, SamplingParams
from rayinfer.actors.cluster import free_port
from rayinfer.actors.server import APP_NAME, start
from rayinfer.config import ServeConfig
from rayinfer.config.serve import RoleConfig

PROMPTS = ["Speculate: ", "abc" * 30]


@pytest.fixture(scope="module")
def server(ray_cluster):
    serve.shutdown()
    url, _ = start(ServeConfig(port=free_port(), prefill=RoleConfig(ep_size=1),
                               decode=RoleConfig(ep_size=1, num_speculative_tokens=2)))
    yield url
    serve.delete(APP_NAME)
    serve.shutdown()


def _post(url, body):
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=120)


def test_served_greedy_speculation_is_the_offline_engines_output(server):
    want = [o.text for o in LLM("tiny").generate(PROMPTS, SamplingParams(max_tokens=20, temperature=0,
                                                                         ignore_eos=True), use_tqdm=False)]
    body = {"model": "tiny", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    for prompt, text in zip(PROMPTS, want):
        out = json.load(_post(server, dict(body, prompt=prompt)))
        assert out["choices"][0]["text"] == text and out["usage"]["completion_tokens"] == 20
        lines = [ln for ln in _post(server, dict(body, prompt=prompt, stream=True)).read().decode().splitlines()
                 if ln.startswith("data: {")]
        assert "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in lines) == text
    (stats,) = serve.get_deployment_handle("decode", app_name=APP_NAME).broadcast("stats").results(timeout_s=30)
    assert len(stats["spec_draft_tokens"]) == 2 and stats["spec_draft_tokens"][0] > 0
