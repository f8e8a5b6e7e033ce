"""One choice of a request at the ingress: its seed, its state before any delta, and deltas folded into it.

Owns what the ingress keeps per choice (a `ChoiceResult`, and the choice's progress in its
`EngineRequest`: the tokens and text the client already has, from which another rank resumes it) and
how it derives that choice's own identity: the sampling seed (drawn here for a sampled request that
brought none, so that a resumed choice samples what the first rank would have), and the Serve request
id its rank calls travel under. Crossing it: `Delta`s from the ranks in, `ChoiceResult`s out.
"""
import hashlib
import secrets
from dataclasses import replace

from rayinfer.messages import Delta, EngineRequest, SamplingParams, fold_delta
from rayinfer.openai.protocol import ChoiceResult


def choice_seed(seed: int, choice: int) -> int:
    """Choice `choice`'s seed: the request's own for the first, a hash of both for the others, so
    that no choice of one request repeats a choice of another (seed + i would: 5/1 is 6/0)."""
    if choice == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{choice}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def own_seed(params: SamplingParams, choice: int) -> SamplingParams:
    """The params a choice runs with: its own seed (`choice_seed`), or a fresh one when a sampled request
    brought none. Greedy requests need none: their resume is exact without."""
    if params.seed is not None:
        return replace(params, seed=choice_seed(params.seed, choice)) if choice else params
    return params if params.greedy else replace(params, seed=secrets.randbits(63))


def advance(req: EngineRequest, d: Delta) -> None:
    """Folds a delta the client is about to get into the choice's progress: a resume starts from here."""
    req.output_token_ids += d.token_ids
    req.emitted_chars += len(d.text)
    req.num_cached_tokens = d.num_cached_tokens


def empty_choice(spec, index: int) -> ChoiceResult:
    """Choice `index` before any delta (see RequestSpec.choice)."""
    return spec.choice(index)


def fold(out: ChoiceResult, d: Delta) -> None:
    fold_delta(out, d)
    out.num_prompt_tokens = d.num_prompt_tokens


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

