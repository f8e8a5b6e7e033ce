"""The HTTP ingress: OpenAI-compatible endpoints on Ray Serve + FastAPI.

Owns the request's life at the edge: parse and validate (rayinfer.openai_protocol), refuse
beyond the queue bound (429 with Retry-After), fan a request out into its choices, send each to
a prefill rank and then, with the KV handoff, to a decode rank (or to one mixed rank when
colocated), merge the choices' deltas into SSE chunks or one response, and count usage and
latency. It never carries KV bytes (it forwards a reference), never blocks its event loop, and a
client that goes away has its requests aborted on the ranks.
"""

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from ray import serve
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from rayinfer.actors.cluster import bind_replica_grpc_to_loopback
from rayinfer.actors.metrics import IngressMetrics, scrape_cluster
from rayinfer.balance.prefix_index import page_keys
from rayinfer.config import ModelConfig, ServeConfig
from rayinfer.messages import Delta, EngineRequest, pack, unpack
from rayinfer.openai_protocol import (SSE_DONE, APIError, ChoiceResult, ModelInfo, chat_chunk, chat_logprobs,
                                      chat_response, completion_chunk, completion_logprobs, completion_response,
                                      models_response, parse_chat_request, parse_completion_request, sse,
                                      usage_chunk, usage_for)

app = FastAPI(title="rayinfer", docs_url=None, redoc_url=None)


def _error(e: APIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.to_dict(), status_code=e.status, headers=headers)


def _empty_choice(spec, index: int) -> ChoiceResult:
    """Choice `index` before any delta; it collects logprobs when the request asked for them."""
    return ChoiceResult(index=index, token_ids=[], text="", logprobs=[] if spec.params.logprobs is not None else None)


def _fold(out: ChoiceResult, d: Delta) -> None:
    out.token_ids += d.token_ids
    out.text += d.text
    if d.logprobs is not None and out.logprobs is not None:
        out.logprobs += d.logprobs
    out.num_prompt_tokens, out.num_cached_tokens = d.num_prompt_tokens, d.num_cached_tokens
    if d.finish_reason:
        out.finish_reason = d.finish_reason


def _own_request_identity() -> None:
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


def _inc(counter, n: int, tags: dict) -> None:
    if n > 0:  # Ray counters reject increments of zero
        counter.inc(n, tags)


@serve.ingress(app)
class Ingress:
    def __init__(self, config: ServeConfig, prefill=None, decode=None, mixed=None):
        bind_replica_grpc_to_loopback()
        import httpx

        from rayinfer.model import resolve_model_path
        from rayinfer.tokenizer import load_tokenizer

        path = resolve_model_path(config.model)
        model = ModelConfig.from_file(path)
        self.info = ModelInfo(config.model_name, model.max_position_embeddings, model.vocab_size,
                              load_tokenizer(path), int(time.time()))
        self.prefill, self.decode, self.mixed = prefill, decode, mixed
        self.max_queue = config.max_queue
        self.inflight = 0
        self.metrics = IngressMetrics(self.info.name)
        self.http = httpx.AsyncClient()
        self._warm = None

    async def _warm_up(self) -> None:
        """Routes one call through each rank handle before any fan-out.

        Requests issued concurrently on a handle whose router has not yet learnt its replicas
        can miss the update and wait forever (seen with Ray Serve 2.60 inside a replica); one
        call first avoids it."""
        if self._warm is None:
            self._warm = asyncio.ensure_future(asyncio.gather(
                *(h.stats.remote() for h in (self.prefill, self.decode, self.mixed) if h is not None)))
        await asyncio.shield(self._warm)

    # -- endpoints -------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self):
        return {"status": "ok", "inflight": self.inflight}

    @app.get("/v1/models")
    async def models(self):
        return models_response([self.info])

    @app.get("/metrics")
    async def metrics(self):
        return PlainTextResponse(await scrape_cluster(self.http), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, "chat")

    # -- request handling ------------------------------------------------------------------------
    async def _handle(self, request: Request, kind: str) -> Response:
        endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise APIError(400, f"the request body is not valid JSON: {e}") from e
            spec = (parse_chat_request if kind == "chat" else parse_completion_request)(body, self.info)
            if self.inflight >= self.max_queue:
                raise APIError(429, f"server is at its queue bound ({self.max_queue} requests in flight); retry shortly")
        except APIError as e:
            self.metrics.request(endpoint, e.status)
            return _error(e, {"Retry-After": "1"} if e.status == 429 else None)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        await self._warm_up()
        self.inflight += 1
        self.metrics.queue.set(self.inflight, self.metrics.tags)
        if spec.stream:
            return StreamingResponse(self._stream(spec, rid, endpoint), media_type="text/event-stream")
        try:
            results = await asyncio.gather(*(self._collect(spec, rid, i) for i in range(len(spec.prompts) * spec.n)))
        except APIError as e:
            self.metrics.request(endpoint, e.status)
            return _error(e)
        finally:
            self._leave()
        self.metrics.request(endpoint, 200)
        usage, tok = usage_for(results, spec.n), self.info.tokenizer
        if kind == "chat":
            body = chat_response(rid, int(time.time()), self.info.name, results, usage, tok, spec.top_logprobs)
        else:
            body = completion_response(rid, int(time.time()), self.info.name, results, usage, tok)
        return JSONResponse(body)

    def _leave(self) -> None:
        self.inflight -= 1
        self.metrics.queue.set(self.inflight, self.metrics.tags)

    def _request(self, spec, rid: str, index: int) -> EngineRequest:
        text, ids = spec.prompts[index // spec.n]
        params = spec.params
        if params.seed is not None and index % spec.n:  # n samples of one seed must differ, reproducibly
            from dataclasses import replace

            params = replace(params, seed=params.seed + index % spec.n)
        return EngineRequest(f"{rid}-{index}", ids, params, time.time())

    async def _choice(self, req: EngineRequest):
        """Deltas of one choice: prefill rank, then decode rank with the KV handoff (or one mixed rank)."""
        _own_request_identity()
        ids = req.prompt_token_ids
        cost = {"prompt_tokens": len(ids), "max_tokens": req.params.max_tokens, "pages": page_keys(ids)}
        call = None  # the rank call in flight: cancelled explicitly, as our fresh request id hides it from Serve
        try:
            if self.mixed is not None:
                call = self.mixed.options(stream=True).generate.remote(pack(req), cost=cost)
                async for raw in call:
                    yield unpack(raw, Delta)
                return
            call = self.prefill.prefill.remote(pack(req), cost=cost)
            raw, handoff = await call
            first = unpack(raw, Delta)
            if first.finish_reason != "handoff":
                yield first
                return
            first.finish_reason = None
            yield first
            req.output_token_ids, req.emitted_chars = list(first.token_ids), len(first.text)
            req.num_cached_tokens = first.num_cached_tokens
            call = self.decode.options(stream=True).decode.remote(pack(req), handoff, cost=cost)
            async for raw in call:
                yield unpack(raw, Delta)
        except (asyncio.CancelledError, GeneratorExit):
            if call is not None:  # the client left: the rank aborts the request and frees its KV
                call.cancel()
            raise
        except APIError:
            raise
        except Exception as e:  # a rank failed: the client gets an error, not a hang
            raise APIError(503, f"a serving rank failed while handling this request: {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:300]}") from e

    async def _deltas(self, spec, rid: str, index: int):
        """One choice's deltas with latency metrics recorded."""
        req = self._request(spec, rid, index)
        start = last = time.time()
        async for d in self._choice(req):
            now = time.time()
            if d.token_ids:
                if last == start:
                    self.metrics.ttft.observe(now - start, self.metrics.tags)
                else:
                    self.metrics.itl.observe((now - last) / len(d.token_ids), self.metrics.tags)
                last = now
            if d.finish_reason:
                self._count_usage(d, index % spec.n == 0)
            yield d

    def _count_usage(self, d: Delta, first_choice_of_prompt: bool) -> None:
        if first_choice_of_prompt:
            _inc(self.metrics.prompt_tokens, d.num_prompt_tokens, self.metrics.tags)
            _inc(self.metrics.cached_tokens, d.num_cached_tokens, self.metrics.tags)

    async def _collect(self, spec, rid: str, index: int) -> ChoiceResult:
        out = _empty_choice(spec, index)
        async for d in self._deltas(spec, rid, index):
            _fold(out, d)
        _inc(self.metrics.generation_tokens, len(out.token_ids), self.metrics.tags)
        return out

    async def _stream(self, spec, rid: str, endpoint: str):
        """SSE body: chunks of all choices as they come, then usage (when asked) and [DONE]."""
        created, chat = int(time.time()), spec.kind == "chat"
        queue: asyncio.Queue = asyncio.Queue()
        count = len(spec.prompts) * spec.n

        async def pump(index: int) -> None:
            try:
                async for d in self._deltas(spec, rid, index):
                    await queue.put((index, d))
                await queue.put((index, None))
            except Exception as e:  # noqa: BLE001 - reported in-band, as OpenAI streams do
                await queue.put((index, e))

        tasks = [asyncio.create_task(pump(i)) for i in range(count)]
        results = [_empty_choice(spec, i) for i in range(count)]
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
                    err = d if isinstance(d, APIError) else APIError(500, f"internal error: {d!r}")
                    status = err.status
                    yield sse(err.to_dict())
                    break
                sent = len(results[index].text)
                _fold(results[index], d)
                yield sse(self._chunk(spec, rid, created, index, d, sent))
            if status == 200 and spec.include_usage:
                yield sse(usage_chunk(spec.kind, rid, created, self.info.name, usage_for(results, spec.n)))
            yield SSE_DONE
        finally:
            for t in tasks:  # a client that left mid-stream: cancelling aborts its requests on the ranks
                t.cancel()
            _inc(self.metrics.generation_tokens, sum(len(r.token_ids) for r in results), self.metrics.tags)
            self.metrics.request(endpoint, status)
            self._leave()


    def _chunk(self, spec, rid: str, created: int, index: int, d: Delta, sent_chars: int) -> dict:
        tok, lp = self.info.tokenizer, None
        if spec.kind == "chat":
            if d.logprobs is not None and spec.logprobs:
                lp = chat_logprobs(tok, d.token_ids, d.logprobs, spec.top_logprobs)
            return chat_chunk(rid, created, self.info.name, index, d.text, d.finish_reason, logprobs=lp)
        if d.logprobs is not None and spec.logprobs is not None:
            lp = completion_logprobs(tok, d.token_ids, d.logprobs, sent_chars)
        return completion_chunk(rid, created, self.info.name, index, d.text, d.finish_reason, logprobs=lp)
