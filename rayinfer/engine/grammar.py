"""Grammar-constrained sampling (xgrammar): the one owner of a sequence's grammar state on a rank.

A request's constraint travels in its SamplingParams (`structured`: kind and text), never as state: each rank compiles
it (cached) and keeps one matcher per live sequence, brought up to date from the sequence's own output tokens before
each mask. So the prefill rank's first token, the decode rank after a handoff and a request resumed on another gang
all replay the same grammar state from the tokens already generated, with nothing to transfer. The mask is filled on
the host, once per constrained row, and applied to the step's logits inside `Sampler.filter_logits`.
"""
from __future__ import annotations

import json
import weakref
from functools import lru_cache

KINDS = ("json", "regex", "choice", "grammar")


def _xgr():
    try:
        import xgrammar
    except ImportError as e:  # the ingress refuses such requests first; this guards offline use
        raise ValueError("structured output needs xgrammar: pip install 'rayinfer[structured]'") from e
    return xgrammar


def choice_ebnf(choices: list[str]) -> str:
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def check_structured(kind: str, text: str) -> None:
    """Raises ValueError naming the problem when the constraint does not compile (no tokenizer needed)."""
    xgr = _xgr()
    try:
        if kind == "json":
            xgr.Grammar.from_json_schema(text) if text else xgr.Grammar.builtin_json_grammar()
        elif kind == "regex":
            xgr.Grammar.from_regex(text)
        elif kind == "choice":
            xgr.Grammar.from_ebnf(choice_ebnf(json.loads(text)))
        else:
            xgr.Grammar.from_ebnf(text)
    except Exception as e:  # noqa: BLE001 - xgrammar raises several types; all mean "does not compile"
        raise ValueError(f"the {kind} constraint does not compile: {str(e).strip().splitlines()[0][:300]}") from e


class Grammars:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids):
        self.tokenizer, self.vocab_size, self.eos = tokenizer, vocab_size, sorted(eos_token_ids)
        self.compiler = None  # built at the first constrained request: a tokenizer info over the whole vocabulary
        self.compile = lru_cache(maxsize=64)(self._compile)
        self.matchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Sequence -> [matcher, consumed]

    def _compiler(self):
        if self.compiler is None:
            xgr = self.xgr = _xgr()
            vocab = [self.tokenizer.token_bytes(i) for i in range(self.vocab_size)]
            info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=self.vocab_size, stop_token_ids=self.eos)
            self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self.compiler

    def _compile(self, kind: str, text: str):
        c = self._compiler()
        if kind == "json":
            return c.compile_json_schema(text, any_whitespace=False) if text else c.compile_builtin_json_grammar()
        if kind == "regex":
            return c.compile_regex(text)
        return c.compile_grammar(choice_ebnf(json.loads(text)) if kind == "choice" else text)

    def _matcher(self, seq):
        entry = self.matchers.get(seq)
        if entry is None:
            compiled = self.compile(*seq.params.structured)
            entry = self.matchers[seq] = [self.xgr.GrammarMatcher(compiled), 0]
        m, done = entry
        out = seq.output_token_ids
        for t in out[done:]:  # replay: tokens sampled since the last mask (or all, on a rank new to this sequence)
            if not m.accept_token(t):
                raise ValueError(f"token {t} breaks the request's {seq.params.structured[0]} constraint")
        entry[1] = len(out)
        return m

    def mask(self, logits, seqs: list):
        """logits [B, V] -> logits with every token the rows' grammars forbid at -inf (unconstrained rows as they were)."""
        import torch  # here, not at import: the ingress checks constraints without torch

        rows = [i for i, s in enumerate(seqs) if s.params.structured]
        if not rows:
            return logits
        self._compiler()
        bitmask = self.xgr.allocate_token_bitmask(len(seqs), self.vocab_size)  # [B, ceil(V / 32)] int32, all allowed
        for i in rows:
            self._matcher(seqs[i]).fill_next_token_bitmask(bitmask, i)
        v = logits.shape[1]
        allowed = ((bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).reshape(len(seqs), -1)[:, :v]
        return logits.masked_fill(~allowed.bool().to(logits.device), float("-inf"))
