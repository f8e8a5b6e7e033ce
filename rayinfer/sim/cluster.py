"""The discrete-event loop: simulated gangs of `SimRank`s per role, the real balancers routing to them, an
autoscaler sizing each role, all in simulated time.

Owns `Cluster` (events: arrivals, gang steps, KV handoffs, disk loads, load reports, autoscaling ticks). What crosses it:
a `ServeConfig`, `ModelConfig`, `Hardware` and workload in; per-request timings and counters out to
`Meter` (results.py).

Sampling (how a day of hundreds of GPUs fits in minutes on 2 cores): attention DP ranks are independent
given the balancer, so a role whose ranks exceed `sample_ranks` is simulated as ONE gang of `sample_ranks`
ranks that stands for all `num_gangs x ep_size` ranks: it receives the share `fraction` of the traffic
(arrivals are thinned to it), its MoE layers see the whole gang's routed tokens (scaled from the sampled
ranks' mean), and every counter is divided by `fraction`. The balancers pick among the sampled ranks.
"""
from __future__ import annotations

import heapq
import itertools
import math
import random

from rayinfer.balance.policies import RequestCost
from rayinfer.balance.prefix_index import page_keys
from rayinfer.config import ModelConfig, ServeConfig
from rayinfer.engine.block_manager import prefix_hashes
from rayinfer.messages import EngineRequest, SamplingParams
from rayinfer.sim.cost import CostModel
from rayinfer.sim.hardware import Hardware
from rayinfer.sim.rank import TOKEN, SimDiskStore, SimRank, _Latents
from rayinfer.sim.roles import SimRole
from rayinfer.sim.workload import Request, prompt_tokens


class Cluster:
    def __init__(self, serve: ServeConfig, cfg: ModelConfig, hw: Hardware, workload, opts, meter):
        self.serve, self.cfg, self.hw, self.opts, self.meter = serve, cfg, hw, opts, meter
        disk = None
        if serve.disk_cache_dir is not None:
            page_bytes = 64 * CostModel(cfg, hw, 1, 0).kv_bytes_per_token()
            budget = serve.disk_cache_bytes or 64 * 2 ** 30
            disk = SimDiskStore(int(budget // page_bytes), page_bytes, opts.disk_read_bytes_s)
        self.disk = disk
        self.roles = {r: SimRole(r, serve, cfg, hw, opts, disk) for r in serve.roles}
        self.entry = self.roles["prefill" if serve.disaggregated else "mixed"]
        self.decode = self.roles.get("decode")
        self.workload = workload
        self.rng = random.Random(opts.seed)
        self.events: list = []
        self.seq = itertools.count()
        self.reqs: dict[str, dict] = {}
        self.ttft_mean = 1.0  # for requests decoded in the sample whose prefill was not simulated
        self.now = 0.0

    # ---- events -------------------------------------------------------------------------------------
    def push(self, t: float, kind: str, data=None) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, data))

    def scale(self) -> float:
        """The arrival thinning that covers every simulated role's share."""
        return max(r.fraction for r in self.roles.values())

    def run_until(self, t_end: float) -> None:
        while self.events and self.events[0][0] <= t_end:
            t, _, kind, data = heapq.heappop(self.events)
            self.now = t
            getattr(self, "_on_" + kind)(data)
        self.now = t_end

    def start(self, arrivals) -> None:
        """`arrivals`: an `Arrivals` generator or a sorted list of trace `Request`s."""
        self.arrivals = arrivals
        if isinstance(arrivals, list):
            self.trace_pos = 0
            if arrivals:
                self.push(arrivals[0].arrival, "arrive", None)
        else:
            self.push(0.0, "arrive", None)
        self.push(0.0, "report", None)
        if any(r.rc.autoscaling for r in self.roles.values()) and self.opts.window_s >= 3600:
            self.push(self.opts.autoscale_tick_s, "autoscale", None)

    def _next_request(self) -> Request | None:
        if isinstance(self.arrivals, list):
            if self.trace_pos >= len(self.arrivals):
                return None
            self.trace_pos += 1
            return self.arrivals[self.trace_pos - 1]
        return self.arrivals.next(self.now, self.scale())

    def _on_arrive(self, data) -> None:
        req = data
        if req is not None:
            self._admit(req)
        nxt = self._next_request()
        if nxt is not None:
            self.push(max(nxt.arrival, self.now), "arrive", nxt)

    def _admit(self, req: Request) -> None:
        # Which simulated roles this arrival belongs to: thinning by each role's share of the cluster.
        u = self.rng.random() * (1.0 if isinstance(self.arrivals, list) else self.scale())
        in_entry = u < self.entry.fraction
        in_decode = self.decode is not None and u < self.decode.fraction
        if not (in_entry or in_decode):
            return
        rid = str(req.id)
        if in_entry and self.disk is not None and req.prefix_id >= 0 and self.entry.fraction < 0.5:
            self._shadow_write(req)
        # Weights: how many cluster requests this one stands for in each role (its share when sampled).
        self.reqs[rid] = dict(req=req, arrival=self.now, decode=in_decode, first=None,
                              w_entry=1 / self.entry.fraction, w_decode=1 / self.decode.fraction if in_decode else 0.0)
        if in_entry:
            self._route_entry(rid, req)
        else:  # its prefill ran on ranks outside the sample: it arrives with KV after a typical TTFT
            self.reqs[rid]["first"] = self.now + self.ttft_mean
            self.push(self.now + self.ttft_mean + self._transfer_s(req), "handoff", rid)

    def _shadow_write(self, req: Request) -> None:
        """The disk tier is shared by the whole cluster, but only a sample of its traffic is simulated: a prefix
        this request carries was sent (and written to disk) by the unsimulated ranks ~1/fraction - 1 times for
        each time it reaches the sample, so its full pages are written here on their behalf."""
        n = min(req.prefix_tokens, req.prompt_tokens - 1) // 64
        if n:
            for h in prefix_hashes(prompt_tokens(req)[:n * 64], 64, n):
                self.disk.write_async(h, None)

    def _route_entry(self, rid: str, req: Request) -> None:
        role = self.entry
        tokens = prompt_tokens(req)
        cost = RequestCost(req.prompt_tokens, 0, req.output_tokens)
        ids = [r.id for r in role.ranks]
        keys = page_keys(tokens)
        hits = role.index.device_tokens(keys, ids)
        disk_hit = role.index.seen_tokens(keys) if self.disk is not None else 0
        if role.name == "prefill":
            rank_id = role.tracker.pick(ids, cost, self.now, hits, disk_hit)
        else:
            rank_id = role.tracker.pick(ids, RequestCost(req.prompt_tokens, 0, self._max_tokens(req)), self.now)
        role.tracker.routed(rank_id, cost, self.now)
        role.index.record(keys, rank_id)
        self.reqs[rid].update(rank=rank_id, cost=cost)
        params = SamplingParams(max_tokens=1 if role.name == "prefill" else req.output_tokens, ignore_eos=True)
        rank = role.by_id[rank_id]
        rank.engine.add_request(EngineRequest(rid, tokens, params, self.now))
        self._kick(role, rank)

    def _max_tokens(self, req: Request) -> int:
        return max(req.output_tokens, getattr(self.workload, "max_tokens", req.output_tokens))

    def _transfer_s(self, req: Request) -> float:
        """Prefill -> decode KV move: the prompt's latents over RDMA (DESIGN: device transfer where possible)."""
        return req.prompt_tokens * self.entry.cost.kv_bytes_per_token() / self.hw.rdma_bytes_s

    def _on_handoff(self, rid: str) -> None:
        st = self.reqs[rid]
        req, role = st["req"], self.decode
        cost = RequestCost(req.prompt_tokens, 0, self._max_tokens(req))
        ids = [r.id for r in role.ranks]
        rank_id = role.tracker.pick(ids, cost, self.now)
        role.tracker.routed(rank_id, cost, self.now)
        st.update(drank=rank_id, dcost=cost, dstart=self.now)
        rank = role.by_id[rank_id]
        params = SamplingParams(max_tokens=req.output_tokens, ignore_eos=True)
        if req.output_tokens <= 1:
            self._done(rid, role, rank_id)
            return
        rank.engine.add_request(EngineRequest(rid, prompt_tokens(req), params, self.now, output_token_ids=[TOKEN]),
                                kv=_Latents(req.prompt_tokens))
        self._kick(role, rank)

    def _gang_of(self, role: SimRole, rank: SimRank) -> int:
        return next(i for i, g in enumerate(role.gangs) if rank in g)

    def _kick(self, role: SimRole, rank: SimRank) -> None:
        g = self._gang_of(role, rank)
        if not role.busy[g]:
            role.busy[g] = True
            self.push(self.now, "step", (role.name, g))

    def _on_step(self, data) -> None:
        name, g = data
        role = self.roles[name]
        if self.disk is not None:
            due = self.disk.tick(self.now)
            if due is not None:
                self.push(due, "wake", (name, g))
        outs = [rank.step() for rank in role.gangs[g]]
        batches = [b for _, b in outs]
        cost = role.cost.step(batches)
        if cost["seconds"] <= 0:
            role.busy[g] = False
            return
        self.meter.step(role, batches, cost)
        self.push(self.now + cost["seconds"], "step_end", (name, g, [d for d, _ in outs]))

    def _on_wake(self, data) -> None:
        name, g = data
        role = self.roles[name]
        if not role.busy[g]:
            role.busy[g] = True
            self._on_step(data)

    def _on_step_end(self, data) -> None:
        name, g, deltas = data
        role = self.roles[name]
        for rank, ds in zip(role.gangs[g], deltas):
            for d in ds:
                self._delta(role, rank, d)
        self._on_step((name, g))

    def _delta(self, role: SimRole, rank: SimRank, d) -> None:
        st = self.reqs.get(d.request_id)
        if st is None:
            return
        w = st["w_decode"] if role is self.decode else st["w_entry"]
        self.meter.tokens(role, len(d.token_ids), w)
        if st["first"] is None:  # the first token: prefill (or mixed) is done with the prompt
            st["first"] = self.now
            ttft = self.now - st["arrival"]
            self.ttft_mean += 0.01 * (ttft - self.ttft_mean)
            self.meter.first_token(role, st["req"], d.num_cached_tokens, ttft, w)
        if role.name == "prefill":
            role.tracker.finished(rank.id, st["cost"], self.now)
            if st["decode"]:
                self.push(self.now + self._transfer_s(st["req"]), "handoff", d.request_id)
            else:
                del self.reqs[d.request_id]
        elif d.finish_reason is not None:
            self._done(d.request_id, role, rank.id)

    def _done(self, rid: str, role: SimRole, rank_id: str) -> None:
        st = self.reqs.pop(rid)
        start = st.get("dstart", st["first"])
        cost = st.get("dcost", st.get("cost"))
        role.tracker.finished(rank_id, cost, self.now)
        w = st["w_decode"] if role is self.decode else st["w_entry"]
        self.meter.finished(role, st["req"], self.now - start, self.now, w)

    # ---- periodic -----------------------------------------------------------------------------------
    def _on_report(self, _) -> None:
        for role in self.roles.values():
            per_rank = 0
            for rank in role.ranks:
                load = role.load(rank)
                role.tracker.report(rank.id, load, self.now)
                per_rank += load.num_requests
            role.ongoing.append((self.now, per_rank / len(role.ranks)))
            self.meter.sample(role, self.now)
        self.push(self.now + self.opts.stats_period_s, "report", None)

    def desired_gangs(self, role: SimRole, look_back_s: float | None = None) -> float:
        """Gangs the autoscaler wants for the load averaged over the look-back (a fraction: the caller rounds)."""
        a = role.rc.autoscaling
        cut = self.now - (a.look_back_s if look_back_s is None else look_back_s)
        role.ongoing = [(t, v) for t, v in role.ongoing if t >= cut]
        avg = sum(v for _, v in role.ongoing) / len(role.ongoing) if role.ongoing else 0.0
        return avg * role.num_gangs / a.target_ongoing_requests

    def clamp_gangs(self, role: SimRole, want: float) -> int:
        a = role.rc.autoscaling
        return min(max(math.ceil(want - 1e-9), a.min_gangs), a.max_gangs)

    def _on_autoscale(self, _) -> None:
        for role in self.roles.values():
            a = role.rc.autoscaling
            if a is None:
                continue
            want = self.clamp_gangs(role, self.desired_gangs(role))
            if want == role.num_gangs:
                role.pending_scale = None
                continue
            if role.pending_scale is None or role.pending_scale[0] != want:
                role.pending_scale = (want, self.now)
            delay = a.upscale_delay_s if want > role.num_gangs else a.downscale_delay_s
            if self.now - role.pending_scale[1] >= delay:
                self.meter.gangs_changed(role, self.now)
                role.num_gangs, role.pending_scale = want, None
        self.push(self.now + self.opts.autoscale_tick_s, "autoscale", None)

    def jump(self, dt: float) -> None:
        """Moves every pending event and in-flight timestamp `dt` later (the skipped part of an hour when only a
        window of it is simulated), and re-reports loads so the trackers' views start fresh."""
        self.events = [(t + dt, s, k, d) for t, s, k, d in self.events]
        heapq.heapify(self.events)
        for st in self.reqs.values():
            for k in ("arrival", "first", "dstart"):
                if st.get(k) is not None:
                    st[k] += dt
        if self.disk is not None:
            self.disk.pending = [(due + dt, f, g) for due, f, g in self.disk.pending]
        self.now += dt
        for role in self.roles.values():
            role.ongoing = [(t + dt, v) for t, v in role.ongoing]
            role.pending_scale = None
            for rank in role.ranks:
                role.tracker.report(rank.id, role.load(rank), self.now)
