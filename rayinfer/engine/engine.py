"""One rank's engine: requests in, token deltas out, one step at a time.

`step()` is the whole loop body: schedule, run, postprocess. Postprocessing appends sampled
tokens (a speculative step's accepted run one by one, so stops cut it where plain decoding would),
detokenizes, applies stop conditions and releases finished sequences' and rejected drafts' pages. The engine
is synchronous and single-threaded; `AsyncEngine` (async_engine.py) drives it from a thread for
servers. Requests that cannot be served (too long, token ids outside the vocabulary, stop strings
without a tokenizer) are rejected at `add_request` with a clear ValueError. A step that raises for one
sequence (in its KV import, its sampling row or its stop checks; in the forward too on a single rank,
which reruns the step without it) fails that request alone: it leaves the engine, and its
`RequestFailed` waits in `take_failures()` for the driver to report; the other sequences step on.
"""
from __future__ import annotations

import time
from dataclasses import replace

from rayinfer.config import EngineConfig
from rayinfer.engine.block_manager import BlockManager
from rayinfer.engine.detokenizer import IncrementalDetokenizer
from rayinfer.engine.scheduler import Scheduler, SchedulerOutput
from rayinfer.engine.sequence import Accepted, PendingKV, Sequence, SeqStatus
from rayinfer.messages import Delta, EngineRequest, RequestFailed, fold_delta
from rayinfer.tokenizer import Tokenizer, load_tokenizer


class Engine:
    def __init__(self, config: EngineConfig, runner=None, tokenizer: Tokenizer | None = None):
        """`runner` executes steps (default: a ModelRunner on `config.model`); tests pass a fake one."""
        self.config = config
        if runner is None:
            from rayinfer.engine.model_runner import ModelRunner  # torch enters only here

            if config.null_runner:
                from rayinfer.engine.null_runner import NullRunner as ModelRunner
            runner = ModelRunner(config)
        self.runner = runner
        self.tokenizer = tokenizer or (load_tokenizer(runner.checkpoint_path) if runner.checkpoint_path else None)
        if self.tokenizer is not None and getattr(runner, "sampler", None) is not None:
            from rayinfer.engine.grammar import Grammars  # built at the first constrained request

            runner.sampler.grammar = Grammars(self.tokenizer, runner.vocab_size, runner.eos_token_ids)
        self.block_manager = BlockManager(self.runner.num_blocks, config.cache.block_size,
                                          config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, getattr(runner, "num_speculative_tokens", 0))
        k = self.scheduler.num_speculative_tokens  # acceptance per draft position, for the rank's metrics
        self.spec_counts = {"spec_draft_tokens": [0] * k, "spec_accepted_tokens": [0] * k} if k else {}
        self.seqs: dict[str, Sequence] = {}
        self.eos = set(runner.eos_token_ids)
        self.max_model_len = self.runner.max_model_len
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "cached_tokens": 0, "steps": 0,
                         "batched_tokens": 0, "requests_finished": 0, "prefill_tokens_computed": 0,
                         "decode_tokens_computed": 0, "kv_imported_tokens": 0, "kv_exported_tokens": 0,
                         # what explains prompt tokens computed on a decode rank: requests it took without
                         # their KV, and the prompt tokens those and preempted sequences may recompute
                         "requests_without_kv": 0, "recompute_budget_tokens": 0}
        self.exports: dict[str, tuple] = {}  # request id -> (latents, rng state), left by prefill handoffs
        self.failures: dict[str, RequestFailed] = {}  # requests a step failed alone, until the driver takes them
        self.disk = self._disk_tier(config.cache)

    def _disk_tier(self, cache):
        if cache.disk_cache_dir is None:
            return None
        from rayinfer.engine.disk_cache import DiskCache
        from rayinfer.engine.disk_tier import DiskTier

        store = DiskCache(cache.disk_cache_dir, cache.disk_cache_bytes, self.runner.kv_fingerprint(), cache.block_size)
        return DiskTier(store, self.block_manager, self.runner)

    def add_request(self, req: EngineRequest, kv=None) -> None:
        """Queues a request. `kv` ([layers, len(prompt), D] latents handed off by a prefill rank)
        lets it decode without computing the prompt; without it (or after a preemption) the prompt
        is computed here (re-prefill), which gives the same tokens."""
        if req.request_id in self.seqs:
            raise ValueError(f"request id {req.request_id!r} is already running")
        if not req.prompt_token_ids:
            raise ValueError(f"request {req.request_id!r}: the prompt is empty")
        vocab = self.runner.vocab_size
        for what, ids in (("token ids", req.prompt_token_ids), ("output token ids", req.output_token_ids),
                          ("stop_token_ids", req.params.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"request {req.request_id!r}: {what} {bad[:5]} are outside the vocabulary "
                                 f"[0, {vocab})")
        if len(req.prompt_token_ids) + req.params.max_tokens > self.max_model_len:
            raise ValueError(f"request {req.request_id!r}: prompt ({len(req.prompt_token_ids)} tokens) + max_tokens "
                             f"({req.params.max_tokens}) exceeds the context length {self.max_model_len}")
        if req.params.stop and self.tokenizer is None:
            raise ValueError(f"request {req.request_id!r}: stop strings need a tokenizer; this checkpoint has none")
        seq = Sequence(req.request_id, req.prompt_token_ids, req.params, req.arrival_time or None)
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, req.params.stop)
        if req.output_token_ids:
            self._resume(seq, req)
        if kv is not None and kv.shape[1] == seq.num_prompt_tokens and seq.num_output_tokens:
            seq.pending_kv = PendingKV(kv.shape[1], kv)  # the scheduler imports it when it admits the request
        self.scheduler.check(seq)
        if self.config.scheduler.mode == "decode" and seq.pending_kv is None:
            self.counters["requests_without_kv"] += 1
            self.counters["recompute_budget_tokens"] += seq.num_prompt_tokens
        self.seqs[req.request_id] = seq
        if seq.pending_kv is None and self.disk is not None and self.disk.admit(seq):
            return  # waits outside the queue while its prefix pages load; `step` admits it when they are back
        self.scheduler.add(seq)

    def _resume(self, seq: Sequence, req: EngineRequest) -> None:
        """Continues a request another rank started: its outputs, streamed text and RNG carry over."""
        seq.token_ids.extend(req.output_token_ids)
        seq.num_cached_tokens = req.num_cached_tokens
        seq.first_admitted = True  # the prefix hit the client is told about happened elsewhere
        if seq.detokenizer is not None:
            for t in req.output_token_ids:
                seq.detokenizer.add(t)
            seq.detokenizer.emitted = min(req.emitted_chars, len(seq.detokenizer.text))
        if req.rng_state is not None:  # an unseeded request's drawn seed: its noise continues unchanged
            seq.sample_seed = int.from_bytes(req.rng_state, "little")

    def abort(self, request_id: str) -> Delta | None:
        self.exports.pop(request_id, None)  # a handoff no one will collect
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        seq.finish_reason = "abort"
        self._finish(seq)
        return Delta(request_id, [], finish_reason="abort", num_prompt_tokens=seq.num_prompt_tokens,
                     num_cached_tokens=seq.num_cached_tokens)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self.disk and self.disk.loading)

    def step(self) -> list[Delta]:
        if self.disk is not None:
            for seq in self.disk.ready(block=not self.scheduler.has_work()):
                self.scheduler.add(seq)
        sched = self.scheduler.schedule()
        self.counters["recompute_budget_tokens"] += sum(seq.num_prompt_tokens for seq in sched.preempted)
        self._import(sched)
        sampled = self._execute(sched)
        return self.postprocess(sched, sampled)

    def take_failures(self) -> dict[str, RequestFailed]:
        """Requests steps failed alone since the last call (each has left the engine already)."""
        failed, self.failures = self.failures, {}
        return failed

    def _fail(self, seq: Sequence, stage: str, e: BaseException) -> None:
        err = e if isinstance(e, RequestFailed) else \
            RequestFailed(f"request {seq.request_id!r} failed in {stage}: {type(e).__name__}: {e}")
        self.failures[seq.request_id] = err
        seq.finish_reason = "error"
        self._finish(seq)

    def _import(self, sched: SchedulerOutput) -> None:
        """Writes the KV of requests admitted with it into the pages the scheduler just gave them; a request
        whose KV cannot be written fails alone (before the forward: nothing of it reaches the gang)."""
        for seq, kv in sched.imports:
            try:
                self._import_one(seq, kv)
            except Exception as e:  # noqa: BLE001 - the request's own handoff or pages
                self._fail(seq, "its KV import", e)
        if self.failures:
            sched.scheduled = [s for s in sched.scheduled if s.seq.request_id not in self.failures]

    def _import_one(self, seq: Sequence, kv) -> None:
        if kv.first_page is not None:  # prefix pages the disk tier read
            self.runner.write_pages(seq.block_ids[kv.first_page:kv.first_page + len(kv.payload)], kv.payload)
            return
        self.runner.import_kv(seq, kv.payload)
        self.counters["kv_imported_tokens"] += kv.num_tokens
        if self.disk is not None:  # the prefill rank wrote the prompt's pages already
            self.block_manager.commit(seq)
            self.disk.mark_on_disk(seq)

    def _execute(self, sched: SchedulerOutput) -> dict:
        """The runner's step. On a single rank a forward that raises is rerun one sequence at a time to find
        the sequences it fails for, then once more without them. In a gang it is fatal: the forward's
        collectives are shared, a rank cannot rerun them alone (and per-sequence failures after it, in
        sampling, are the runner's to isolate)."""
        try:
            return self.runner.execute(sched)
        except Exception:
            if getattr(self.runner, "ctx", None) is not None or len(sched.scheduled) == 0:
                raise
        culprits = []
        for s in sched.scheduled:
            try:
                self.runner.execute(replace(sched, scheduled=[s]))
            except Exception as e:  # noqa: BLE001 - this sequence's own failure
                culprits.append((s, e))
        if not culprits:  # fails only together: not one request's fault
            raise RuntimeError("the step's forward failed for the whole batch but for no sequence alone")
        for s, e in culprits:
            self._fail(s.seq, "the forward", e)
        sched.scheduled = [s for s in sched.scheduled if s.seq.request_id not in self.failures]
        return self.runner.execute(sched) if sched.scheduled else {}

    def postprocess(self, sched: SchedulerOutput, sampled: dict) -> list[Delta]:
        self.counters["steps"] += 1
        self.counters["batched_tokens"] += sched.num_tokens
        deltas = []
        for s in sched.scheduled:
            seq = s.seq
            prompt_part = max(0, min(s.start + s.num_new_tokens, seq.num_prompt_tokens) - s.start)
            self.counters["prefill_tokens_computed"] += prompt_part
            self.counters["decode_tokens_computed"] += s.num_new_tokens + s.num_draft_tokens - prompt_part
            seq.num_computed_tokens += s.num_new_tokens
            self.block_manager.commit(seq)
            if self.disk is not None:
                self.disk.written(seq)
            if s.samples and not seq.finished:
                result = sampled[seq.request_id]
                try:
                    if isinstance(result, BaseException):  # the runner failed this row alone
                        raise result
                    deltas.append(self._append_run(seq, result) if isinstance(result, Accepted)
                                  else self._append(seq, *result))
                except Exception as e:  # noqa: BLE001 - one request's sampling or stop checks
                    self._fail(seq, "sampling or its stop checks", e)
            if s.num_draft_tokens and not seq.finished:  # rejected drafts' pages go back
                self.block_manager.trim(seq, seq.num_tokens)
        return deltas

    def _append_run(self, seq: Sequence, run: Accepted) -> Delta:
        """A verified speculative run, appended token by token as plain decoding would (so stop tokens, stop
        strings, min_tokens and max_tokens cut it where they would); the accepted drafts' KV becomes computed."""
        delta = None
        for token, logprobs in zip(run.tokens, run.logprobs):
            d = self._append(seq, token, logprobs)
            if delta is None:
                delta = d
            else:
                fold_delta(delta, d)
            if seq.finish_reason is not None:
                break
        k = len(self.spec_counts["spec_draft_tokens"])  # per draft position: drafted, accepted
        delta.spec_draft_tokens = [int(j < run.num_drafts) for j in range(k)]
        delta.spec_accepted_tokens = [int(j < run.num_accepted) for j in range(k)]
        for key, counts in self.spec_counts.items():
            self.spec_counts[key] = [a + b for a, b in zip(counts, getattr(delta, key))]
        if not seq.finished:
            seq.num_computed_tokens += run.num_accepted
            self.block_manager.commit(seq)
            if self.disk is not None:
                self.disk.written(seq)
        return delta

    def _append(self, seq: Sequence, token: int, logprobs) -> Delta:
        if seq.params.max_tokens == 0:
            return self._prompt_only(seq)
        first = seq.num_output_tokens == 0
        seq.token_ids.append(token)
        p = seq.params
        # min_tokens (vLLM): no stop token among the first min_tokens outputs, no stop string before the last of them
        n = seq.num_output_tokens
        stopped_by_token = n > p.min_tokens and (token in p.stop_token_ids or (not p.ignore_eos and token in self.eos))
        stop_string = seq.detokenizer.add(None if stopped_by_token else token, n >= p.min_tokens) \
            if seq.detokenizer else False
        if stopped_by_token or stop_string:
            seq.finish_reason = "stop"
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        elif self.config.scheduler.mode == "prefill":
            self._hand_off(seq)
        # A handoff is not an end: text held back for stop strings stays held for the decode rank.
        done = seq.finish_reason is not None and seq.finish_reason != "handoff"
        text = seq.detokenizer.take(done) if seq.detokenizer else ""
        self.counters["generation_tokens"] += 1
        if first:
            self.counters["prompt_tokens"] += seq.num_prompt_tokens
            self.counters["cached_tokens"] += seq.num_cached_tokens
        delta = Delta(seq.request_id, [token], text, [logprobs] if logprobs is not None else None,
                      seq.finish_reason, seq.num_prompt_tokens, seq.num_cached_tokens,
                      prompt_logprobs=seq.prompt_logprobs if first else None)
        if seq.finish_reason:
            self._finish(seq)
        return delta

    def _prompt_only(self, seq: Sequence) -> Delta:
        """max_tokens 0: the prompt ran (its logprobs, its pages cached); the token sampled after it is dropped."""
        seq.finish_reason = "length"
        self.counters["prompt_tokens"] += seq.num_prompt_tokens
        self.counters["cached_tokens"] += seq.num_cached_tokens
        self._finish(seq)
        return Delta(seq.request_id, [], "", [] if seq.params.logprobs is not None else None, "length",
                     seq.num_prompt_tokens, seq.num_cached_tokens, prompt_logprobs=seq.prompt_logprobs)

    def _hand_off(self, seq: Sequence) -> None:
        """A prefill rank's job ends at the first token: keep the prompt's latents for the decode rank."""
        latents = self.runner.export_kv(seq)
        rng = (seq.sample_seed % 2 ** 64).to_bytes(8, "little") if seq.sample_seed is not None else None
        self.exports[seq.request_id] = (latents, rng)
        self.counters["kv_exported_tokens"] += latents.shape[1]
        seq.finish_reason = "handoff"

    def _finish(self, seq: Sequence) -> None:
        if self.disk is not None:
            self.disk.forget(seq.request_id)
        self.scheduler.remove(seq)
        seq.status = SeqStatus.FINISHED
        self.seqs.pop(seq.request_id, None)
        self.counters["requests_finished"] += 1

    def stats(self) -> dict:
        """Counters and current load; call on the engine's own thread (it reads live sequences)."""
        bm, sched = self.block_manager, self.scheduler
        prefill_tokens, attention, live = 0, 0.0, []
        for seq in (*sched.running, *sched.waiting):  # work not yet done: what a prefill balancer weighs
            left = max(0, seq.num_prompt_tokens - seq.num_computed_tokens)
            prefill_tokens += left
            attention += left * (seq.num_computed_tokens + (left + 1) / 2)
            if len(live) < 8:  # a few live requests by name, for operators (and failing tests) to look at
                live.append((seq.request_id, seq.num_output_tokens))
        return dict(self.counters, live_requests=live, num_running=len(sched.running), num_waiting=len(sched.waiting),
                    num_requests=len(sched.running) + len(sched.waiting), prefill_tokens=prefill_tokens,
                    attention_work=attention, kv_usage=bm.usage, kv_blocks_total=bm.num_blocks,
                    kv_blocks_used=bm.num_allocated_blocks(), kv_used_tokens=bm.num_allocated_blocks() * bm.block_size,
                    kv_capacity_tokens=bm.num_blocks * bm.block_size, max_num_seqs=self.config.scheduler.max_num_seqs,
                    num_preemptions=sched.num_preemptions, **{k: list(v) for k, v in self.spec_counts.items()},
                    prefix_hit_rate=bm.hits / bm.queries if bm.queries else 0.0, taken_at=time.time(),
                    **(self.disk.stats() if self.disk is not None else {}))

    def close(self, timeout: float = 30.0) -> None:
        """Lets queued disk-tier writes land (the engine object stays usable)."""
        if self.disk is not None:
            self.disk.cache.flush(timeout)
