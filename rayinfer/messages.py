"""Every type that crosses a process boundary, as compact msgpack-serialisable structs.

Requests travel from a front end (the offline `LLM`, the HTTP ingress) to a rank's engine; token
deltas travel back, carrying only what changed since the last one. `pack`/`unpack` turn any of
these into bytes and back; nested messages are packed positionally by field order.
"""
from __future__ import annotations

import functools
import math
import typing
from dataclasses import dataclass, field, fields

import msgpack


def _err(name: str, value, why: str) -> ValueError:
    return ValueError(f"SamplingParams.{name}={value!r}: {why}")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1): no top-k cut
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: the chosen token's logprob plus the top k
    repetition_penalty: float = 1.0  # vLLM's: > 1 discourages any token already in the prompt or output
    min_tokens: int = 0  # no EOS, stop token or stop string ends the output before this many tokens
    # OpenAI's logit_bias as sorted (token id, bias) pairs (a dict is accepted): added to the logits before sampling
    logit_bias: tuple[tuple[int, float], ...] = ()
    structured: tuple[str, str] | None = None  # (kind, text): ("json", schema or "" for any object), regex, choice, grammar
    # vLLM's: logprobs of every prompt token (its own plus the top k; the first None), computed in the prefill
    prompt_logprobs: int | None = None

    def __post_init__(self):
        num = (int, float)
        # max_tokens 0 runs the prompt alone (for its prompt_logprobs, or to warm the prefix cache)
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 0:
            raise _err("max_tokens", self.max_tokens, "must be an integer >= 0")
        for name, lo, hi, lo_open in (("temperature", 0.0, math.inf, False), ("top_p", 0.0, 1.0, True),
                                      ("min_p", 0.0, 1.0, False), ("presence_penalty", -2.0, 2.0, False),
                                      ("frequency_penalty", -2.0, 2.0, False)):
            v = getattr(self, name)
            if not isinstance(v, num) or isinstance(v, bool) or not math.isfinite(v) or v > hi or v < lo \
                    or (lo_open and v == lo):
                raise _err(name, v, f"must be a number in {'(' if lo_open else '['}{lo}, {hi}]")
        rp = self.repetition_penalty
        if not isinstance(rp, num) or isinstance(rp, bool) or not math.isfinite(rp) or not 0 < rp <= 100:
            raise _err("repetition_penalty", rp, "must be a number in (0, 100]")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) \
                or not 0 <= self.min_tokens <= self.max_tokens:
            raise _err("min_tokens", self.min_tokens, f"must be an integer in [0, max_tokens={self.max_tokens}]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise _err("top_k", self.top_k, "must be an integer >= 1, or 0/-1 to disable")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise _err("stop", self.stop, "must be a non-empty string or a list of them")
        object.__setattr__(self, "stop", stop)
        ids = tuple(self.stop_token_ids or ())
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise _err("stop_token_ids", self.stop_token_ids, "must be a list of non-negative token ids")
        object.__setattr__(self, "stop_token_ids", ids)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise _err("seed", self.seed, "must be an integer or None")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 20):
                raise _err(name, k, "must be None or an integer in [0, 20]")

        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else (self.logit_bias or ())
        try:
            pairs = tuple(sorted((int(t), float(b)) for t, b in bias))
        except (TypeError, ValueError):
            raise _err("logit_bias", self.logit_bias, "must map token ids to numbers") from None
        if any(t < 0 or not -100 <= b <= 100 for t, b in pairs):
            raise _err("logit_bias", self.logit_bias, "token ids must be >= 0 and biases in [-100, 100]")
        object.__setattr__(self, "logit_bias", pairs)
        if self.structured is not None:
            st = tuple(self.structured)
            if len(st) != 2 or st[0] not in ("json", "regex", "choice", "grammar") or not isinstance(st[1], str):
                raise _err("structured", self.structured, "must be (json | regex | choice | grammar, text)")
            object.__setattr__(self, "structured", st)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RequestFailed(RuntimeError):
    """A rank failed this one request (its step raised for this sequence alone) and goes on serving the
    others. The request is not retried elsewhere: the rank blamed the request itself."""


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    # A request continued from another rank (disaggregated decode, or a resume) carries what was
    # already generated and streamed, so it picks up exactly where the other rank stopped.
    output_token_ids: list[int] = field(default_factory=list)
    emitted_chars: int = 0  # characters of output text the client already has
    rng_state: bytes | None = None  # an unseeded request's sampling seed (8 bytes, little-endian)
    num_cached_tokens: int = 0  # prefix-cache hits reported by the rank that ran the prefill


@dataclass
class KVHandoff:
    """A prefill rank's finished KV for one request, as the decode rank fetches it.

    `ref` is the transport's handle (a Ray object reference to a [layers, num_tokens, D] latent
    tensor): it travels between processes by Ray, never through msgpack, and its bytes go from
    the prefill node to the decode node directly (the ingress only forwards the reference)."""

    ref: list  # [ObjectRef]: wrapped, so Ray forwards the reference instead of resolving it
    num_tokens: int
    created_at: float
    source: str = ""
    rng_state: bytes | None = None  # the request's sampling seed (see EngineRequest.rng_state)


@dataclass
class Delta:
    """What one engine step produced for one request."""

    request_id: str
    token_ids: list[int]
    text: str = ""
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"; "handoff" leaves a prefill rank
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, float] | None] | None = None  # in a request's first delta, when it asked
    # Speculative decoding, per draft position: drafts proposed and accepted in the steps this delta covers
    spec_draft_tokens: list[int] | None = None
    spec_accepted_tokens: list[int] | None = None


def fold_delta(out, d: Delta) -> None:
    """Folds delta `d` into a result being accumulated (a merged `Delta`, the ingress's choice, an offline
    `RequestOutput`): tokens and text appended, logprobs too where `out` collects them (not None), the
    cached-token count, prompt logprobs and finish reason taken."""
    out.token_ids += d.token_ids
    out.text += d.text
    if d.logprobs is not None and out.logprobs is not None:
        out.logprobs += d.logprobs
    out.num_cached_tokens = d.num_cached_tokens
    if d.prompt_logprobs is not None:
        out.prompt_logprobs = d.prompt_logprobs
    if d.finish_reason:
        out.finish_reason = d.finish_reason
    if d.spec_draft_tokens is not None and hasattr(out, "spec_draft_tokens"):
        out.spec_draft_tokens = _add_counts(out.spec_draft_tokens, d.spec_draft_tokens)
        out.spec_accepted_tokens = _add_counts(out.spec_accepted_tokens, d.spec_accepted_tokens)


def _add_counts(a: list[int] | None, b: list[int]) -> list[int]:
    return list(b) if a is None else [x + y for x, y in zip(a, b)]


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    time_to_first_token: float | None = None  # seconds from submission
    latency: float | None = None  # seconds from submission to finish
    error: str | None = None  # why the engine failed this request alone (then finish_reason is "error")
    prompt_logprobs: list[dict[int, float] | None] | None = None  # SamplingParams.prompt_logprobs: one per prompt token
    # With speculative decoding: per draft position, how many drafts were proposed and how many the target accepted
    spec_draft_tokens: list[int] | None = None
    spec_accepted_tokens: list[int] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _to_plain(obj):
    if hasattr(obj, "__dataclass_fields__"):
        return [_to_plain(getattr(obj, f.name)) for f in fields(obj)]
    if isinstance(obj, (list, tuple)):
        return [_to_plain(x) for x in obj]
    return obj


@functools.cache
def _layout(cls) -> tuple:
    """(field name, nested message class or None, whether a list becomes a tuple) per field of `cls`, in order:
    resolved once per class, since type hints are slow to evaluate and deltas unpack per token."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name] if hasattr(hints[f.name], "__dataclass_fields__") else None,
                  typing.get_origin(hints[f.name]) is tuple) for f in fields(cls))


def _from_plain(cls, data):
    kwargs = {}
    for (name, nested, as_tuple), value in zip(_layout(cls), data):
        if nested is not None and value is not None:
            value = _from_plain(nested, value)
        elif as_tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def pack(obj) -> bytes:
    return msgpack.packb(_to_plain(obj), use_bin_type=True)


def unpack(data: bytes, cls):
    return _from_plain(cls, msgpack.unpackb(data, raw=False, strict_map_key=False))


def unpack_list(data: bytes, cls) -> list:
    """The objects of a `pack`ed list of `cls` (one message carrying many, e.g. a step's deltas)."""
    return [_from_plain(cls, x) for x in msgpack.unpackb(data, raw=False, strict_map_key=False)]
