"""Simulated traffic: a synthetic day (length distributions, a day/night arrival curve, shared prefixes) or
the replay of a JSONL trace.

Owns `Request` (what one arrival is: time, prompt and output lengths, the shared prefix it starts with)
and turning a spec into arrivals. What crosses it: a YAML/JSON spec or a JSONL path in, `Request`s out,
plus `prompt_tokens(req)`, the token ids the real block manager hashes (shared prefixes are the same
ids, so its prefix cache and the disk tier's hit logic see real sharing).

The synthetic rate is `rate * (1 + day_night * cos(2 pi (t/3600 - peak_hour) / 24))`: `rate` is the
day's mean requests/s. Lengths are lognormal around their means (sigma in log space), clipped to
[1, max]. A request draws a prefix from `num_prefixes` Zipf-popular prefixes with probability
`prefix_ratio`, covering `prefix_fraction` of its prompt; the prefixes of one id are nested (the same
token ids from the start), so two requests of that id share the shorter one's prefix.
"""
from __future__ import annotations

import bisect
import json
import math
import random
from dataclasses import dataclass, fields

PREFIX_STRIDE = 1 << 24  # token-id space of one prefix; unique tokens live above every prefix


@dataclass(frozen=True)
class Request:
    id: int
    arrival: float        # seconds
    prompt_tokens: int
    output_tokens: int
    prefix_id: int = -1   # -1: no shared prefix
    prefix_tokens: int = 0


def prompt_tokens(req: Request) -> list[int]:
    """The request's token ids: its prefix's ids (shared by every request of that prefix), then its own."""
    n = min(req.prefix_tokens, req.prompt_tokens) if req.prefix_id >= 0 else 0
    head = list(range((req.prefix_id + 1) * PREFIX_STRIDE, (req.prefix_id + 1) * PREFIX_STRIDE + n)) if n else []
    own = (1 << 40) + req.id * PREFIX_STRIDE
    return head + list(range(own, own + req.prompt_tokens - n))


@dataclass(frozen=True)
class Synthetic:
    rate: float = 1.0                 # mean requests/s over the day
    day_night: float = 0.0            # relative amplitude of the daily curve, 0..1
    peak_hour: float = 14.0           # hour of the day the rate peaks
    input_mean: float = 1024.0
    input_sigma: float = 0.5
    input_max: int = 32768
    output_mean: float = 256.0
    output_sigma: float = 0.5
    output_max: int = 8192
    max_tokens: int = 4096            # what requests ask for (the decode LB reserves it), >= output_max is exact
    prefix_ratio: float = 0.0         # share of requests that start with a shared prefix
    prefix_fraction: float = 0.5      # of such a request's prompt, the shared part
    num_prefixes: int = 100
    zipf: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.rate <= 0:
            raise ValueError(f"workload rate must be > 0 requests/s, got {self.rate}")
        if not 0 <= self.day_night <= 1:
            raise ValueError(f"workload day_night must be in [0, 1], got {self.day_night}")
        for k in ("prefix_ratio", "prefix_fraction"):
            if not 0 <= getattr(self, k) <= 1:
                raise ValueError(f"workload {k} must be in [0, 1], got {getattr(self, k)}")
        if self.input_mean < 1 or self.output_mean < 1 or self.num_prefixes < 1:
            raise ValueError("workload input_mean, output_mean and num_prefixes must be >= 1")

    def rate_at(self, t: float) -> float:
        return self.rate * (1 + self.day_night * math.cos(2 * math.pi * (t / 3600 - self.peak_hour) / 24))

    @property
    def peak_rate(self) -> float:
        return self.rate * (1 + self.day_night)


class Arrivals:
    """Draws the arrivals of a `Synthetic` spec one at a time, thinned by a factor the caller may change
    (the share of the cluster being simulated): a non-homogeneous Poisson process by thinning."""

    def __init__(self, spec: Synthetic):
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.next_id = 0
        weights = [1 / (i + 1) ** spec.zipf for i in range(spec.num_prefixes)]
        total = sum(weights)
        self.cum, acc = [], 0.0
        for w in weights:
            acc += w / total
            self.cum.append(acc)

    def _lognormal(self, mean: float, sigma: float, hi: int) -> int:
        mu = math.log(mean) - sigma * sigma / 2  # so that the mean is `mean`
        return max(1, min(hi, round(self.rng.lognormvariate(mu, sigma))))

    def next(self, t: float, scale: float) -> Request:
        """The next arrival after `t` at `scale` x the spec's rate."""
        s, rng = self.spec, self.rng
        lam = s.peak_rate * scale
        while True:
            t += rng.expovariate(lam)
            if rng.random() * s.peak_rate <= s.rate_at(t):
                break
        prompt = self._lognormal(s.input_mean, s.input_sigma, s.input_max)
        out = self._lognormal(s.output_mean, s.output_sigma, min(s.output_max, s.max_tokens))
        pid, ptok = -1, 0
        if rng.random() < s.prefix_ratio:
            u = rng.random()
            pid = min(bisect.bisect_left(self.cum, u), len(self.cum) - 1)
            ptok = int(prompt * s.prefix_fraction)
        self.next_id += 1
        return Request(self.next_id, t, prompt, out, pid, ptok)


def load_trace(path: str) -> list[Request]:
    """JSONL: one object per line with `arrival` (s), `prompt_tokens`, `output_tokens`, optional `prefix_id`
    and `prefix_tokens`. Sorted by arrival."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                r = Request(i, float(d["arrival"]), int(d["prompt_tokens"]), int(d["output_tokens"]),
                            int(d.get("prefix_id", -1)), int(d.get("prefix_tokens", 0)))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: not a trace record ({e!r}); need arrival, prompt_tokens, "
                                 f"output_tokens") from None
            if r.prompt_tokens < 1 or r.output_tokens < 1 or r.arrival < 0:
                raise ValueError(f"{path}:{i}: prompt_tokens and output_tokens must be >= 1, arrival >= 0")
            out.append(r)
    if not out:
        raise ValueError(f"trace {path!r} has no records")
    return sorted(out, key=lambda r: r.arrival)


def load_spec(path_or_inline: str) -> Synthetic | list[Request]:
    """A `.jsonl` trace, a YAML/JSON synthetic spec file, or inline `key=value,key=value`."""
    if path_or_inline.endswith(".jsonl"):
        return load_trace(path_or_inline)
    if "=" in path_or_inline and not path_or_inline.endswith((".yaml", ".yml", ".json")):
        raw = {}
        for part in path_or_inline.split(","):
            k, _, v = part.partition("=")
            raw[k.strip()] = float(v) if any(c in v for c in ".e") else int(v)
    else:
        import yaml
        try:
            with open(path_or_inline) as f:
                raw = yaml.safe_load(f) or {}
        except OSError as e:
            raise ValueError(f"--workload {path_or_inline!r}: {e.strerror}") from None
    known = {f.name for f in fields(Synthetic)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown workload key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return Synthetic(**raw)
