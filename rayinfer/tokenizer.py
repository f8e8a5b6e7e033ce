"""Text <-> token ids for a checkpoint directory, and its chat template.

Reads `tokenizer.json` (with the `tokenizers` library) and `tokenizer_config.json`. A checkpoint
without tokenizer files loads as `None`: such a model takes token-id prompts only.

Single-token views for logprobs: `token_bytes(id)` is the exact bytes an id contributes to text
(a byte-level BPE piece may be half a UTF-8 character; special tokens give their content);
`id_to_token(id)` is the vocabulary's own spelling ("Ġ" for a byte-level space). A model's
embedding may be larger than its tokenizer's vocabulary (the `tiny` preset: 320 vs 261): ids the
tokenizer does not know decode to nothing, so their `token_bytes` is b"" and their `id_to_token`
is None, as `tokenizers` and transformers themselves answer.

`apply_chat_template` renders the checkpoint's Jinja chat template the way transformers does
(sandboxed, trim_blocks/lstrip_blocks, `raise_exception`), so prompts match what the model saw.
"""
from __future__ import annotations

import json
import os
import re
from datetime import datetime
from functools import cache, cached_property

# DeepSeek-V3's layout (BOS, the system prompts, then <｜User｜>/<｜Assistant｜> turns) without the
# tool-call parts of its real template: what the presets ship, and what a checkpoint without a
# chat template gets.
DEEPSEEK_CHAT_TEMPLATE = (
    "{% if add_generation_prompt is not defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}")
_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # sentencepiece byte-fallback pieces


class Tokenizer:
    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
        cfg_path = os.path.join(path, "tokenizer_config.json")
        self.config = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
        self.add_bos = bool(self.config.get("add_bos_token", True))
        self.path = path

    def _token(self, key: str) -> str | None:
        v = self.config.get(key)
        return v.get("content") if isinstance(v, dict) else v

    @property
    def bos_token(self) -> str | None:
        return self._token("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._token("eos_token")

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        add = self.add_bos if add_special_tokens is None else add_special_tokens
        return self._tok.encode(text, add_special_tokens=add).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    # ---- single tokens (logprobs) ----

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id) if 0 <= token_id < self.vocab_size else None

    @cached_property
    def _added(self) -> dict[int, tuple[str, bool]]:
        """id -> (content, special) for added tokens, whose content is raw text, not byte-mapped."""
        return {i: (t.content, t.special) for i, t in self._tok.get_added_tokens_decoder().items()}

    def is_special(self, token_id: int) -> bool:
        """Special tokens never appear in decoded output text (decode skips them)."""
        return self._added.get(token_id, ("", False))[1]

    @cached_property
    def _byte_level(self) -> bool:
        def has(d) -> bool:
            return isinstance(d, dict) and (d.get("type") == "ByteLevel" or any(has(x) for x in d.get("decoders", [])))
        return has(json.loads(self._tok.to_str()).get("decoder"))

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id][0].encode("utf-8")
        piece = self.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level:
            table = _byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        if m := _BYTE_PIECE.match(piece):
            return bytes([int(m.group(1), 16)])
        # Other schemes (sentencepiece "▁"): the id decoded on its own is the best single view.
        return self._tok.decode([token_id], skip_special_tokens=False).encode("utf-8")

    # ---- chat template ----

    @cached_property
    def chat_template(self) -> str:
        tpl = self.config.get("chat_template")
        if isinstance(tpl, list):  # named templates, as some checkpoints ship them
            tpl = next((t.get("template") for t in tpl if t.get("name") == "default"), None)
        jinja_file = os.path.join(self.path, "chat_template.jinja")  # newer transformers save it apart
        if not tpl and os.path.exists(jinja_file):
            tpl = open(jinja_file, encoding="utf-8").read()
        return tpl or DEEPSEEK_CHAT_TEMPLATE

    @cached_property
    def _compiled_template(self):
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # Jinja's own tojson HTML-escapes; templates expect plain JSON, as transformers gives them.
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, extra: dict | None = None) -> str:
        """Renders a conversation; raises jinja2.TemplateError when the template rejects it.

        Content given as a list of text parts is joined with newlines first (vLLM's convention),
        since DeepSeek's templates concatenate `content` as a string."""
        msgs = [dict(m, content="\n".join(p["text"] for p in m["content"]))
                if isinstance(m.get("content"), list) else dict(m) for m in messages]
        specials = {k: self._token(k) for k in _SPECIAL_KEYS if self._token(k) is not None}
        # `extra`: a request's chat_template_kwargs (V3.1's `thinking`); what the renderer sets itself wins
        return self._compiled_template.render({**(extra or {}), **specials, "messages": msgs, "tools": tools,
                                               "documents": None, "add_generation_prompt": add_generation_prompt})


@cache
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable stand-in character map that byte-level BPE vocabularies use."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(256 + extra)] = b
            extra += 1
    return out


def load_tokenizer(path: str) -> Tokenizer | None:
    return Tokenizer(path) if os.path.exists(os.path.join(path, "tokenizer.json")) else None
