"""DeepSeek's API on a real server (127.0.0.1, one colocated rank) serving the R1-format test checkpoint
(tests/deepseek_format.py): through the official `openai` client, FIM completion, chat prefix completion and R1's
reasoning split each return what the offline engine generates for the prompt the front door builds."""
import openai
import pytest
from ray import serve

from deepseek_format import deepseek_checkpoint
from rayinfer import LLM, SamplingParams
from rayinfer.actors.cluster import free_port
from rayinfer.actors.server import APP_NAME, start
from rayinfer.config import ServeConfig
from rayinfer.openai.markers import FIM_BEGIN, FIM_END, FIM_HOLE
from rayinfer.tokenizer import load_tokenizer

ASK = [{"role": "user", "content": "Quicksort?"}]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    path = deepseek_checkpoint(str(tmp_path_factory.mktemp("r1")), "r1")
    serve.shutdown()
    url, _ = start(ServeConfig(model=path, served_model_name="ds", port=free_port(), disaggregated=False,
                               max_queue=16).with_ep(decode=1))
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield client, LLM(path), load_tokenizer(path)
    serve.delete(APP_NAME)
    serve.shutdown()


def test_fim_prefix_and_reasoning_are_served_as_the_offline_engine_generates_them(served):
    client, llm, tok = served
    extra = {"ignore_eos": True}

    def offline(text: str) -> str:
        return llm.generate([tok.encode(text, add_special_tokens=False)], GREEDY, use_tqdm=False)[0].text

    bos = "<｜begin▁of▁sentence｜>"
    fim = client.completions.create(model="ds", prompt="def f(x):\n", suffix="\n    return y", max_tokens=8,
                                    temperature=0, extra_body=extra).choices[0].text
    assert fim == offline(f"{bos}{FIM_BEGIN}def f(x):\n{FIM_HOLE}\n    return y{FIM_END}")

    prefix = client.chat.completions.create(
        model="ds", messages=ASK + [{"role": "assistant", "content": "```python\n", "prefix": True}],
        max_tokens=8, temperature=0, extra_body=extra).choices[0].message
    assert prefix.content == offline(f"{bos}<｜User｜>Quicksort?<｜Assistant｜>```python\n")

    # R1 opens the reply inside <think>: an output that never closes it is all reasoning, none of it content
    reply = client.chat.completions.create(model="ds", messages=ASK, max_tokens=8, temperature=0,
                                           extra_body=extra).choices[0].message
    reasoning = offline(f"{bos}<｜User｜>Quicksort?<｜Assistant｜><think>\n")
    assert "</think>" not in reasoning and reply.model_extra["reasoning_content"] == reasoning
    assert not reply.content
