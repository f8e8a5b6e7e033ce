"""One choice of a request at the ingress: its seed, its state before any delta, and deltas folded into it.

Owns what the ingress keeps per choice (a `ChoiceResult`) and how it derives that choice's own
identity: the sampling seed, and the Serve request id its rank calls travel under. Crossing it:
`Delta`s from the ranks in, `ChoiceResult`s out.
"""
import hashlib

from rayinfer.messages import Delta
from rayinfer.openai_protocol import ChoiceResult


def choice_seed(seed: int, choice: int) -> int:
    """Choice `choice`'s seed: the request's own for the first, a hash of both for the others, so
    that no choice of one request repeats a choice of another (seed + i would: 5/1 is 6/0)."""
    if choice == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{choice}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def empty_choice(spec, index: int) -> ChoiceResult:
    """Choice `index` before any delta; it collects logprobs when the request asked for them."""
    return ChoiceResult(index=index, token_ids=[], text="", logprobs=[] if spec.params.logprobs is not None else None)


def fold(out: ChoiceResult, d: Delta) -> None:
    out.token_ids += d.token_ids
    out.text += d.text
    if d.logprobs is not None and out.logprobs is not None:
        out.logprobs += d.logprobs
    out.num_prompt_tokens, out.num_cached_tokens = d.num_prompt_tokens, d.num_cached_tokens
    if d.finish_reason:
        out.finish_reason = d.finish_reason


def own_request_identity() -> None:
    """Gives the calling task's outgoing handle calls their own internal request id.

    Serve (2.60) copies the HTTP request's internal id onto every handle call made while serving
    it, and its router keeps pending calls in a dict keyed by that id: two calls in flight from
    one HTTP request (choices of n > 1, several prompts) overwrite each other and one never
    routes. Each choice runs in its own task, so setting the context here affects only it."""
    from dataclasses import replace

    from ray.serve import context
    from ray.serve._private.utils import generate_request_id

    ctx = context._get_serve_request_context()
    context._serve_request_context.set(replace(ctx, _internal_request_id=generate_request_id()))

