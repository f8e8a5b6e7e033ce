"""Text <-> token ids for a checkpoint directory, and its chat template.

Reads `tokenizer.json` (with the `tokenizers` library) and `tokenizer_config.json`. A checkpoint
without tokenizer files loads as `None`: such a model takes token-id prompts only.
"""
from __future__ import annotations

import json
import os


class Tokenizer:
    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
        cfg_path = os.path.join(path, "tokenizer_config.json")
        self.config = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
        self.add_bos = bool(self.config.get("add_bos_token", True))

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


def load_tokenizer(path: str) -> Tokenizer | None:
    return Tokenizer(path) if os.path.exists(os.path.join(path, "tokenizer.json")) else None
