"""The HTTP ingress: OpenAI-compatible endpoints on Ray Serve + FastAPI.

Owns the request's life at the edge: check the API key, read the body within its bound
(rayinfer.openai.http_input), parse, validate and tokenize it off the event loop
(rayinfer.openai.protocol), admit it by its choices and tokens (rayinfer.openai.limits.Admission:
429 with Retry-After beyond the queue bound), fan a request out into its choices, send each to
a prefill rank and then, with the KV handoff, to a decode rank (or to one mixed rank when
colocated), merge the choices' deltas into SSE chunks or one response, and count usage and
latency. A choice whose rank fails goes on elsewhere (actors/resume.py). It never carries KV bytes (it forwards a reference), never blocks its event loop, and a
client that goes away has its requests aborted on the ranks.
"""

import asyncio
import math
import time
import uuid
from contextlib import aclosing
from dataclasses import replace

from fastapi import Request
from ray import serve
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from rayinfer.actors.cluster import bind_replica_grpc_to_loopback
from rayinfer.actors.choice import empty_choice, fold, own_request_identity, own_seed
from rayinfer.actors.edge import app, error_response
from rayinfer.actors.metrics import IngressMetrics
from rayinfer.config import ModelConfig, ServeConfig
from rayinfer.actors.resume import ChoiceRunner
from rayinfer.messages import Delta, EngineRequest
from rayinfer.openai.chat_output import StreamSplit, choose_reasoning_parser, split_message, tool_format_of
from rayinfer.openai.limits import Admission, RequestLimits
from rayinfer.openai.protocol import (SSE_DONE, APIError, ChoiceResult, ModelInfo, chat_chunk, chat_logprobs,
                                      chat_response, completion_delta_chunk, completion_response,
                                      models_response, parse_chat_request, parse_completion_request, sse,
                                      usage_chunk, usage_for)
from rayinfer.openai.http_input import key_matches, one_line, parse_body, read_body
from rayinfer.openai.tokenize import detokenize, tokenize


def inc(counter, n: int, tags: dict) -> None:
    if n > 0:  # Ray counters reject increments of zero
        counter.inc(n, tags)


@serve.ingress(app)
class Ingress:
    def __init__(self, config: ServeConfig, prefill=None, decode=None, mixed=None):
        bind_replica_grpc_to_loopback()
        from rayinfer.model import resolve_model_path
        from rayinfer.tokenizer import load_tokenizer

        path = resolve_model_path(config.model)
        model = ModelConfig.from_file(path)
        tok = load_tokenizer(path)
        longest = max((len(tok.token_bytes(i)) for i in range(tok.vocab_size)), default=0) if tok else 0
        limits = RequestLimits(config.max_prompts_per_request, config.max_choices_per_request,
                               config.max_stop_strings, config.max_stop_token_ids, max_tools=config.max_tools,
                               max_prompt_logprob_tokens=config.max_prompt_logprob_tokens)
        self.info = ModelInfo(config.model_name, model.max_position_embeddings, model.vocab_size,
                              tok, int(time.time()), max_token_chars=longest, limits=limits,
                              reasoning_parser=choose_reasoning_parser(config.reasoning_parser, tok),
                              tool_format=tool_format_of(tok))
        self.prefill, self.decode, self.mixed = prefill, decode, mixed
        self.runner = ChoiceRunner(prefill, decode, mixed, config.resume_deadline_s, config.max_resumes,
                                   config.quarantine_after, phase=self._phase,
                                   stream_interval_s=config.stream_interval_s)
        self.max_request_bytes = config.max_request_bytes
        self.api_keys, self.metrics_need_key = config.api_keys, config.metrics_need_key
        self.admission = Admission(config.max_queue, config.max_queue_tokens)
        self.metrics = IngressMetrics(self.info.name, {"prefill": prefill, "decode": decode, "mixed": mixed})
        self._phase_tags = {p: dict(self.metrics.tags, phase=p) for p in ("prefill", "kv_handoff", "first_decode",
                                                                         "first_step")}
        self._warm = None

    async def _warm_up(self) -> None:
        """Routes one call through each rank handle before any fan-out.

        Requests issued concurrently on a handle whose router has not yet learnt its replicas
        can miss the update and wait forever (seen with Ray Serve 2.60 inside a replica); one
        call first avoids it."""
        if self._warm is None:
            self._warm = asyncio.ensure_future(self._rank_stats())
        stats = await asyncio.shield(self._warm)
        if not self.info.kv_capacity_tokens:
            caps = [s.get("kv_capacity_tokens") for s in stats]
            if all(caps):  # known once every role's ranks have reported (their first stats period)
                # A decode rank admits prompt + first token + max_tokens: the handed-off token counts twice.
                slack = 1 if self.decode is not None else 0
                self.info = replace(self.info, kv_capacity_tokens=min(caps) - slack)
            else:
                self._warm = None

    async def _rank_stats(self) -> list[dict]:
        return await asyncio.gather(*(h.stats.remote() for h in (self.prefill, self.decode, self.mixed)
                                      if h is not None))

    def _phase(self, name: str, seconds: float) -> None:
        self.metrics.ttft_phase.observe(seconds, self._phase_tags[name])

    def _authorize(self, request: Request) -> None:
        if self.api_keys and not key_matches(request.headers.get("authorization"), self.api_keys):
            raise APIError(401, "Missing or incorrect API key: send 'Authorization: Bearer <key>' with one of "
                                "the keys this server was started with", code="invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        """The raw body, after the key check: what `parse_body` reads, off the event loop."""
        self._authorize(request)
        return await read_body(request.stream(), self.max_request_bytes, request.headers.get("content-length"))

    # -- endpoints -------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self):
        return {"status": "ok", **self.admission.snapshot(), "resumed": self.runner.resumed,
                "quarantined": self.runner.quarantined}

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        return models_response([self.info])

    @app.get("/metrics")
    async def metrics(self, request: Request):
        if self.metrics_need_key:
            self._authorize(request)
        # sampling polls every rank with a blocking broadcast: off the event loop
        return PlainTextResponse(await asyncio.to_thread(self.metrics.exposition),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/metrics/history")
    async def metrics_history(self, request: Request, since: float | None = None):
        """The sampled series `rayinfer report` reads, over the last `since` seconds (default: all)."""
        if self.metrics_need_key:
            self._authorize(request)
        if since is not None and not (math.isfinite(since) and since > 0):  # NaN compares false to everything
            return error_response(APIError(400, f"since must be a finite number of seconds > 0, got {since}",
                                           param="since"))
        return await asyncio.to_thread(self.metrics.history, since)

    @app.post("/tokenize")
    async def tokenize(self, request: Request):
        raw = await self._body(request)
        return await asyncio.to_thread(lambda: tokenize(parse_body(raw), self.info))

    @app.post("/detokenize")
    async def detokenize(self, request: Request):
        raw = await self._body(request)
        return await asyncio.to_thread(lambda: detokenize(parse_body(raw), self.info))

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, "chat")

    # -- request handling ------------------------------------------------------------------------
    async def _handle(self, request: Request, kind: str) -> Response:
        endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        self.admission.parsing += 1
        try:
            raw = await self._body(request)
            await self._warm_up()  # the ranks' KV capacity bounds the request's default max_tokens
            # Parsing, tokenizing and the chat template take time in proportion to the body: off the event loop.
            parse = parse_chat_request if kind == "chat" else parse_completion_request
            spec = await asyncio.to_thread(lambda: parse(parse_body(raw), self.info))
            tokens = spec.n * sum(len(ids) + spec.params.max_tokens for _, ids in spec.prompts)
            ticket = self.admission.admit(len(spec.prompts) * spec.n, tokens)
        except APIError as e:
            self.metrics.request(endpoint, e.status)
            return error_response(e)
        finally:
            self.admission.parsing -= 1
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.metrics.queue.set(self.admission.requests, self.metrics.tags)
        if spec.stream:
            return StreamingResponse(self._stream(spec, rid, endpoint, ticket), media_type="text/event-stream")
        tasks = [asyncio.ensure_future(self._collect(spec, rid, i)) for i in range(len(spec.prompts) * spec.n)]
        try:
            results = await asyncio.gather(*tasks)
        except APIError as e:
            self.metrics.request(endpoint, e.status)
            return error_response(e)
        finally:
            for t in tasks:  # one choice failed (or the client left): the others' rank calls end too
                t.cancel()
            self._leave(ticket)
        self.metrics.request(endpoint, 200)
        usage, tok = usage_for(results, spec.n), self.info.tokenizer
        if kind == "chat":
            body = chat_response(rid, int(time.time()), self.info.name, results, usage, tok, spec.top_logprobs,
                                 message=lambda text: split_message(text, spec))
        else:
            body = completion_response(rid, int(time.time()), self.info.name, results, usage, tok)
        return JSONResponse(body)

    def _leave(self, ticket: tuple[int, int]) -> None:
        self.admission.release(ticket)
        self.metrics.queue.set(self.admission.requests, self.metrics.tags)

    def _request(self, spec, rid: str, index: int) -> EngineRequest:
        text, ids = spec.prompts[index // spec.n]
        # n samples of one seed differ, reproducibly; an unseeded sampled choice gets a seed, so a resume is exact
        return EngineRequest(f"{rid}-{index}", ids, own_seed(spec.params, index % spec.n), time.time())

    async def _choice(self, req: EngineRequest):
        """Deltas of one choice, to its end however many ranks fail on the way (actors/resume.py)."""
        own_request_identity()
        async with aclosing(self.runner.run(req)) as deltas:
            async for d in deltas:
                yield d

    async def _deltas(self, spec, rid: str, index: int):
        """One choice's deltas with latency metrics recorded."""
        req = self._request(spec, rid, index)
        start = last = time.time()
        times: list[float] = []  # when each output token arrived: for TPOT and the KV read per token
        async with aclosing(self._choice(req)) as choice:  # closed with this one: its rank call cancelled at once
            async for d in choice:
                now = time.time()
                if d.token_ids:
                    if last == start:
                        self.metrics.ttft.observe(now - start, self.metrics.tags)
                    else:
                        self.metrics.itl.observe((now - last) / len(d.token_ids), self.metrics.tags)
                    last = now
                    times += [now] * len(d.token_ids)
                if d.finish_reason:
                    self._count_usage(d, index % spec.n == 0)
                    self.metrics.finished(len(req.prompt_token_ids), times)
                yield d

    def _count_usage(self, d: Delta, first_choice_of_prompt: bool) -> None:
        if first_choice_of_prompt:
            inc(self.metrics.prompt_tokens, d.num_prompt_tokens, self.metrics.tags)
            inc(self.metrics.cached_tokens, d.num_cached_tokens, self.metrics.tags)

    async def _collect(self, spec, rid: str, index: int) -> ChoiceResult:
        out = empty_choice(spec, index)
        async with aclosing(self._deltas(spec, rid, index)) as deltas:
            async for d in deltas:
                fold(out, d)
        inc(self.metrics.generation_tokens, len(out.token_ids), self.metrics.tags)
        return out

    async def _stream(self, spec, rid: str, endpoint: str, ticket: tuple[int, int]):
        """SSE body: chunks of all choices as they come, then usage (when asked) and [DONE]."""
        created, chat = int(time.time()), spec.kind == "chat"
        queue: asyncio.Queue = asyncio.Queue()
        count = len(spec.prompts) * spec.n

        async def pump(index: int) -> None:
            try:
                # a cancelled pump closes its choice's generators now, not when the garbage collector finds them:
                # that close is what cancels the rank call and frees the request's KV
                async with aclosing(self._deltas(spec, rid, index)) as deltas:
                    async for d in deltas:
                        await queue.put((index, d))
                await queue.put((index, None))
            except Exception as e:  # noqa: BLE001 - reported in-band, as OpenAI streams do
                await queue.put((index, e))

        tasks = [asyncio.create_task(pump(i)) for i in range(count)]
        results = [empty_choice(spec, i) for i in range(count)]
        split = StreamSplit(rid, created, self.info.name, count, spec) if chat else None
        status = 200
        try:
            if chat:
                for i in range(count):
                    yield sse(chat_chunk(rid, created, self.info.name, i, "", None, role="assistant"))
            live = count
            while live:
                index, d = await queue.get()
                if d is None:
                    live -= 1
                    continue
                if isinstance(d, BaseException):
                    err = d if isinstance(d, APIError) else APIError(500, f"internal error: {one_line(d)}")
                    status = err.status
                    yield sse(err.to_dict())
                    break
                sent = len(results[index].text)
                fold(results[index], d)
                for chunk in self._chunks(spec, rid, created, results[index], d, sent, split):
                    yield sse(chunk)
            if status == 200 and spec.include_usage:
                yield sse(usage_chunk(spec.kind, rid, created, self.info.name, usage_for(results, spec.n)))
            yield SSE_DONE
        finally:
            for t in tasks:  # a client that left mid-stream: cancelling aborts its requests on the ranks
                t.cancel()
            inc(self.metrics.generation_tokens, sum(len(r.token_ids) for r in results), self.metrics.tags)
            self.metrics.request(endpoint, status)
            self._leave(ticket)


    def _chunks(self, spec, rid: str, created: int, choice, d: Delta, sent_chars: int, split) -> list[dict]:
        """`choice`: the choice's result with `d` folded in already."""
        tok, lp = self.info.tokenizer, None
        if spec.kind == "chat":
            if d.logprobs is not None and spec.logprobs:
                lp = chat_logprobs(tok, d.token_ids, d.logprobs, spec.top_logprobs)
            return split.chunks(choice.index, d.text, d.finish_reason, lp)
        return [completion_delta_chunk(rid, created, self.info.name, choice, d, sent_chars, tok)]
