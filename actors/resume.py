"""One choice's way through the ranks, surviving their failures: the ingress's resume path.

Owns the calls that serve one choice (prefill rank, then the KV handoff to a decode rank; or one
mixed rank) and what happens when one fails. The choice's progress lives in its `EngineRequest`
(tokens and text the client already has, `rayinfer.actors.choice.advance`); when a rank fails, the
call's gang leaves routing at once (rayinfer.balance.health, told by Serve's router) and the choice continues on a
healthy gang from that progress: a decode rank re-prefills prompt + emitted tokens and samples on,
so the client's stream goes on without a gap, a repeat or an error. With no healthy gang of the
role, the choice waits for one to be routed up to `deadline_s`, then ends in a 503 (Retry-After).

Four outcomes of a call are told apart: a rank failure (the call errors, the actor dies, the
stream ends without a finish reason or with `RESUME_REASONS`) resumes; a request error (the rank
refused it: ValueError) is the client's, a 400; a request the rank failed alone (`RequestFailed`: its
step raised for this sequence only, the rank serves on) is a 500, never retried, since the rank blamed the
request itself; cancellation (the client left) aborts the call. Resumes are bounded: at most
`max_resumes` per choice, and a choice whose ranks failed `quarantine_after` times while serving it is
quarantined (a 500 to its client): a request that kills every gang it reaches must not reach them all.
A rank that must shed its requests (a drain) ends their streams with `finish_reason="migrate"`:
`ChoiceRunner.run` continues each elsewhere, as after a failure (the drain keeps new calls away).
Crossing it: packed `EngineRequest`s out to the ranks, `Delta`s in (over the channels of actors/channel.py, for the
streaming calls), `APIError`s up.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import time
from contextlib import aclosing
from dataclasses import replace

from rayinfer.actors.channel import Channels
from rayinfer.actors.choice import advance
from rayinfer.balance import health
from rayinfer.balance.prefix_index import page_keys
from rayinfer.openai.http_input import one_line
from rayinfer.messages import Delta, EngineRequest, RequestFailed, pack, unpack
from rayinfer.openai.protocol import APIError

log = logging.getLogger("rayinfer.ingress")
# `health.HEALTH` is looked up at each use, never bound here: Serve ships these classes by value, which would
# give every router and the ingress a copy of their own of a name bound at import.
RESUME_REASONS = ("migrate", "abort")  # a rank gave the request back (drain, shutdown): continue elsewhere



_collect_scheduled = False


def _collect_soon(delay_s: float = 1.0) -> None:
    """A cancelled call can leave its result (a KV handoff) in a garbage cycle here (a task and its
    traceback), pinning the KV's object-store entry until this process's next full collection, which
    an idle ingress may not run for a long time. So collect once, shortly after cancellations."""
    global _collect_scheduled
    if _collect_scheduled:
        return
    _collect_scheduled = True

    def collect() -> None:
        global _collect_scheduled
        _collect_scheduled = False
        gc.collect()

    asyncio.get_running_loop().call_later(delay_s, collect)


def _wire(req: EngineRequest, attempt: str) -> bytes:
    """`req` as one attempt sends it: under the attempt's own id, so nothing of an earlier attempt (a late delta,
    its abort, its KV on a rank it may share with this one) can be taken for this one's."""
    return pack(replace(req, request_id=attempt))


class RankFailed(Exception):
    """A rank could not finish the call (or gave it back: `given_back`, a drain or shutdown, not a failure)."""

    def __init__(self, message: str, given_back: bool = False):
        super().__init__(message)
        self.given_back = given_back


class ChoiceRunner:
    def __init__(self, prefill=None, decode=None, mixed=None, deadline_s: float = 30.0, max_resumes: int = 8,
                 quarantine_after: int = 2, phase=None, stream_interval_s: float = 0.0):
        """`phase(name, seconds)`: told how long each stage before a choice's first decode took (metrics)."""
        self.prefill, self.decode, self.mixed, self.deadline_s = prefill, decode, mixed, deadline_s
        self.max_resumes, self.quarantine_after = max_resumes, quarantine_after
        self.resumed = 0  # choices continued elsewhere after a rank failed or gave them back
        self.quarantined = 0  # choices refused after their ranks failed `quarantine_after` times
        self.channels = Channels(stream_interval_s)  # the ranks' deltas, a message per step (actors/channel.py)
        self.phase = phase or (lambda name, seconds: None)

    async def run(self, req: EngineRequest):
        """The choice's deltas to the end, across as many ranks as it takes (within the bounds above)."""
        deadline, tries, failures = None, 0, 0
        while True:
            tries += 1
            attempt = f"{req.request_id}#{tries}"
            try:
                async with aclosing(self._attempt(req, attempt, deadline)) as deltas:
                    async for d in deltas:
                        if d.finish_reason in RESUME_REASONS:
                            raise RankFailed(f"the rank gave the request back ({d.finish_reason})", given_back=True)
                        advance(req, d)
                        yield d
                        if d.finish_reason:
                            return
                raise RankFailed("the rank's stream ended before the request finished")
            except (asyncio.CancelledError, GeneratorExit, APIError):
                raise
            except RequestFailed as e:  # the rank failed this request alone: retrying elsewhere would repeat it
                raise APIError(500, f"the serving rank failed this request (and only it; not retried): "
                                    f"{one_line(e)}") from e
            except ValueError as e:  # the rank refused the request (admission): the client's to fix
                raise APIError(400, f"the serving rank refused this request: {one_line(e)}") from e
            except Exception as e:  # noqa: BLE001 - any other failure is the rank's: resume
                # Its gang already left routing: Serve's router reports the dead replica (`on_replica_actor_died`)
                # as this call fails, and the routers skip its whole gang from then on.
                failures += not getattr(e, "given_back", False)
                self._check_bounds(req, tries, failures, e)
                self.resumed += 1
                deadline = deadline or time.monotonic() + self.deadline_s
                log.warning("resuming %s after %d tokens (%s)", req.request_id, len(req.output_token_ids),
                            one_line(e)[:200])
                await asyncio.sleep(0.01 * min(tries, 50))  # a failure that repeats at once does not spin
            finally:
                health.HEALTH.release(attempt)

    def _check_bounds(self, req: EngineRequest, tries: int, failures: int, e: Exception) -> None:
        if failures >= self.quarantine_after:
            self.quarantined += 1
            log.error("quarantined %s: %d rank failures while serving it, the last: %s", req.request_id, failures,
                      one_line(e)[:200])
            raise APIError(500, f"this request was quarantined: the ranks serving it failed {failures} times "
                                f"(the last: {one_line(e)}); it is not retried") from e
        if tries > self.max_resumes:
            raise APIError(503, f"this request was moved between ranks {tries - 1} times without finishing "
                                f"(the last: {one_line(e)}); retry shortly") from e

    async def _attempt(self, req: EngineRequest, attempt: str, deadline: float | None):
        """One try: the calls from where the choice stands to its end (or to a failure)."""
        ids = req.prompt_token_ids
        cost = {"prompt_tokens": len(ids) + len(req.output_token_ids), "max_tokens": req.params.max_tokens,
                "pages": page_keys(ids), "attempt": attempt}
        call = None  # the rank call in flight: cancelled explicitly, as our fresh request id hides it from Serve
        try:
            t0 = time.monotonic()
            handle, role, phase = self.mixed, "mixed", "first_step"
            # A fresh disaggregated choice starts on a prefill rank; one with output (or whose prefill role is
            # down) goes straight to a decode rank, which computes prompt + output as one prefill.
            if self.mixed is None:
                handle, role, phase = self.decode, "decode", "first_decode"
            if self.mixed is None and not req.output_token_ids and health.HEALTH.available("prefill"):
                call = self.prefill.prefill.remote(_wire(req, attempt), cost=cost)
                raw, handoff = await self._bounded(call, attempt, deadline, "prefill")
                self.phase("prefill", time.monotonic() - t0)
                first = unpack(raw, Delta)
                if first.finish_reason != "handoff":
                    yield first
                    return
                first.finish_reason = None
                # The KV goes to a decode rank in a call of its own, so the object store lets it go once that
                # rank holds it (a stream would pin it to its end); the stream is then routed to the same rank.
                # Sent before the first token is yielded: a client leaving there must not leave the KV held here.
                call = self.decode.accept_kv.remote(attempt, len(ids), handoff, cost=cost)
                del raw, handoff
                t1 = time.monotonic()
                yield first  # the caller folds it into req's progress before we go on
                replica = await call
                t0 = time.monotonic()
                self.phase("kv_handoff", t0 - t1)
                cost = dict(cost, replica=replica)
            call, deltas = self._run(handle, role, req, cost, attempt, deadline, phase, t0)
            async with aclosing(deltas):  # closed at once when the choice stops: its queue goes with it
                async for d in deltas:
                    if d.finish_reason is not None:
                        call = None  # the request ended on the rank: its call ends by itself, no cancel
                    yield d
        except (asyncio.CancelledError, GeneratorExit):
            if call is not None:  # the client left (or the choice moves on): the rank aborts it and frees its KV
                call.cancel()
                call = None  # a cancelled call's arguments may hold the KV reference; this frame may outlive it
                _collect_soon()
            raise
        except Exception:
            if call is not None:
                call.cancel()  # a failed stream's rank may still run the request: let it go
                call = None
            raise

    def _run(self, handle, role: str, req: EngineRequest, cost: dict, attempt: str, deadline: float | None,
             phase: str, t0: float):
        """A streaming call of `req` on a rank of `role` -> (the call, its deltas off this replica's channels)."""
        call = handle.options(stream=True).run.remote(_wire(req, attempt), self.channels.id, cost=cost)
        deltas = self.channels.deltas(handle, call, attempt,
                                      lambda first: self._bounded(first, attempt, deadline, role))
        return call, self._timed(deltas, phase, t0)

    async def _timed(self, deltas, phase: str, t0: float):
        """`deltas`, telling `phase` how long the first one took from `t0`."""
        async with aclosing(deltas):
            first = True
            async for d in deltas:
                if first and d.token_ids:
                    self.phase(phase, time.monotonic() - t0)
                    first = False
                yield d

    async def _bounded(self, awaitable, attempt: str, deadline: float | None, role: str):
        """Awaits a call's result (or first item); after a failure (`deadline` set), gives up with a 503
        when no healthy gang of `role` took the call by then. A routed call is never cut short."""
        if deadline is None:
            return await awaitable
        task = asyncio.ensure_future(awaitable)
        try:
            while not task.done():
                if time.monotonic() > deadline and not health.HEALTH.was_routed(attempt):
                    raise APIError(503, f"no healthy {role} gang could take this request within "
                                        f"{self.deadline_s:g}s of a rank failure; retry shortly")
                await asyncio.wait({task}, timeout=0.05)
            return task.result()
        finally:
            if not task.done():
                task.cancel()
