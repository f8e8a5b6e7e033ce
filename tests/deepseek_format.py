"""A DeepSeek-format test checkpoint, built from a few lines instead of downloaded: the tiny preset's weights and
byte-level vocabulary plus DeepSeek's added tokens (reasoning, tool calls, FIM: ids 261 on, inside the tiny model's
320-row embedding), with a chat template in the layout of DeepSeek-V3's, R1's or V3.1's published one (system text after
BOS, `<｜User｜>` / `<｜Assistant｜>` turns closed by `<｜end▁of▁sentence｜>`, tool calls and outputs in DeepSeek's
tokens; R1 opens the reply with `<think>\\n` and keeps only what follows `</think>` of a past reply; V3.1 opens it
with `<think>` when `thinking` is set, else closes the reasoning at once with `</think>`, as its past replies are)."""
import json
import os
import shutil

from tokenizers import AddedToken, Tokenizer

from rayinfer.model import resolve_model_path
from rayinfer.openai.markers import (CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, FIM_BEGIN, FIM_END, FIM_HOLE,
                                     THINK_END, THINK_START, TOOL_SEP)

OUTPUTS = ("<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>")
ADDED = (FIM_HOLE, FIM_BEGIN, FIM_END, THINK_START, THINK_END, CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END,
         TOOL_SEP, *OUTPUTS)

def _template(style: str) -> str:
    """The chat template of `style` (v3, r1, v31), composed so that each holds only its own markup (the served
    parsers are chosen by what the template mentions: `</think>`, a ```json call block)."""
    reasoning = style != "v3"
    past = ("{% set c = m['content'] or '' %}" + ("{% set c = c.split('</think>')[-1] %}" if reasoning else "")
            + "<｜Assistant｜>" + ("</think>" if style == "v31" else "") + "{{ c }}")
    call = ("{{ t['function']['name'] }}" + TOOL_SEP + "{{ t['function']['arguments'] }}" if style == "v31" else
            "function" + TOOL_SEP + "{{ t['function']['name'] }}\n```json\n{{ t['function']['arguments'] }}\n```")
    reply = {"v3": "", "r1": "<think>\n",
             "v31": "{% if thinking is defined and thinking %}<think>{% else %}</think>{% endif %}"}[style]
    return ("{{ bos_token }}{% for m in messages if m['role'] == 'system' %}{{ m['content'] }}{% endfor %}"
            "{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
            "{% elif m['role'] == 'assistant' %}" + past + "{% if m.get('tool_calls') %}" + CALLS_BEGIN
            + "{% for t in m['tool_calls'] %}" + CALL_BEGIN + call + CALL_END + "{% endfor %}" + CALLS_END
            + "{% endif %}<｜end▁of▁sentence｜>{% elif m['role'] == 'tool' %}" + OUTPUTS[0] + OUTPUTS[2]
            + "{{ m['content'] }}" + OUTPUTS[3] + OUTPUTS[1] + "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<｜Assistant｜>" + reply + "{% endif %}")


TEMPLATES = {style: _template(style) for style in ("v3", "r1", "v31")}


def deepseek_checkpoint(path: str, template: str = "v3") -> str:
    """Writes the checkpoint into directory `path` (created) and returns it."""
    tiny = resolve_model_path("tiny")
    os.makedirs(path, exist_ok=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny, name), path)
    tok = Tokenizer.from_file(os.path.join(tiny, "tokenizer.json"))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED])
    tok.save(os.path.join(path, "tokenizer.json"))
    cfg = json.load(open(os.path.join(tiny, "tokenizer_config.json")))
    cfg["chat_template"] = TEMPLATES[template]
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, ensure_ascii=False)
    return path
