"""The offline API, in the convention vLLM users know: `LLM(model, **options).generate(prompts, params)`.

Owns prompt normalisation (strings are tokenized; token-id lists pass through), request ids,
assembling streamed deltas into `RequestOutput`s in input order, timing, and the progress bar.
With `ep_size=1` the engine runs in this process; with `ep_size=N` the requests are spread over
the N data-parallel ranks of an expert-parallel gang on Ray (started on 127.0.0.1 unless an
`address` is given), and the same options drive it.
"""
from __future__ import annotations

import itertools
import time
from typing import Sequence as Seq

from rayinfer.config import EngineConfig
from rayinfer.messages import Delta, EngineRequest, RequestOutput, SamplingParams, fold_delta

_ids = itertools.count()


class LLM:
    def __init__(self, model: str = "tiny", **options):
        self.config = EngineConfig.from_options(model, **options)
        self.engine = self.gang = None
        if self.config.parallel.ep_size == 1:
            from rayinfer.engine.engine import Engine

            self.engine = Engine(self.config)
            self.tokenizer = self.engine.tokenizer
        else:
            from rayinfer.actors.offline import GangClient
            from rayinfer.model.presets import resolve_model_path
            from rayinfer.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(resolve_model_path(model))
            self.gang = GangClient(self.config)

    def rebalance(self) -> dict:
        """Expert-parallel only: re-place experts from the load measured so far; see rayinfer.engine.eplb_live."""
        if self.gang is None:
            raise ValueError("rebalance needs an expert-parallel gang (ep_size > 1)")
        return self.gang.rebalance()

    def stats(self) -> list[dict]:
        """Per-rank engine stats (one entry for an in-process engine)."""
        return self.gang.stats() if self.gang is not None else [self.engine.stats()]

    def shutdown(self) -> None:
        """Releases the gang (ep_size > 1); an in-process engine finishes its disk-tier writes."""
        if self.engine is not None:
            self.engine.close()
        if self.gang is not None:
            self.gang.shutdown()
            self.gang = None

    def _normalise(self, prompts) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("this checkpoint has no tokenizer: pass prompts as lists of token ids")
                out.append((p, self.tokenizer.encode(p)))
            elif isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                out.append((None, list(p)))
            else:
                raise ValueError(f"prompt {i} must be a string or a list of token ids, got {type(p).__name__}")
        return out

    def generate(self, prompts, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        items = self._normalise(prompts)
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(items)
        if len(params) != len(items):
            raise ValueError(f"got {len(params)} SamplingParams for {len(items)} prompts")
        start = time.time()
        outputs: dict[str, RequestOutput] = {}
        requests = []
        for (text, ids), p in zip(items, params):
            rid = f"req-{next(_ids)}"
            requests.append(EngineRequest(rid, ids, p, start))
            outputs[rid] = RequestOutput(rid, text, ids, logprobs=[] if p.logprobs is not None else None)
        bar = _progress(len(requests), use_tqdm)

        def on_delta(d: Delta) -> None:
            if apply_delta(outputs[d.request_id], d, start) and bar is not None:
                bar.update(1)

        try:
            if self.gang is not None:
                self.gang.run(requests, on_delta, on_failed=lambda rid, err: _failed(outputs[rid], err))
            else:
                self._run_local(requests, outputs, on_delta)
        finally:
            if bar is not None:
                bar.close()
        return [outputs[r.request_id] for r in requests]

    def _run_local(self, requests, outputs, on_delta) -> None:
        try:
            for req in requests:
                self.engine.add_request(req)
            while any(not outputs[r.request_id].finished for r in requests):
                for d in self.engine.step():
                    on_delta(d)
                for rid, err in self.engine.take_failures().items():  # failed alone: the others go on
                    _failed(outputs[rid], err)
        finally:
            for r in requests:  # an interrupted call must not leave requests occupying the engine
                if not outputs[r.request_id].finished:
                    self.engine.abort(r.request_id)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="generating", unit="req")


def _failed(out: RequestOutput, err: BaseException) -> None:
    out.finish_reason, out.error = "error", str(err)


def apply_delta(out: RequestOutput, d: Delta, start: float) -> bool:
    """Folds one delta into a RequestOutput; returns True when it finished the request."""
    now = time.time()
    if d.token_ids and out.time_to_first_token is None:
        out.time_to_first_token = now - start
    fold_delta(out, d)
    if d.finish_reason:
        out.latency = now - start
        return True
    return False
