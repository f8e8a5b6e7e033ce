"""A deployment's topology and limits: `ServeConfig`, from a YAML file and/or command-line flags.

Owns what `rayinfer serve` deploys: the model, the HTTP listener, whether prefill and decode
are disaggregated, and for each role (prefill, decode, or mixed when colocated) how many gangs
of how many ranks, with the engine options of its ranks. `engine_config(role)` turns a role into
the `EngineConfig` its ranks run with. Unknown keys and bad values name themselves.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace

from rayinfer.config.engine import (CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig, SpeculativeConfig,
                                    parse_bytes)
from rayinfer.config.model import ConfigError, check_field

ROLES = ("prefill", "decode", "mixed")


@dataclass(frozen=True)
class AutoscalingConfig:
    """Whole gangs of one role added and removed with load (Ray Serve autoscaling, in gang-size steps).

    The load signal is Serve's: requests in flight per rank (queued at the handle or running), averaged
    over `look_back_s`; the role wants ceil(total / target_ongoing_requests) ranks, rounded up to whole
    gangs. A gang scaled down drains: it takes no new request and its ranks stop once the whole gang
    is idle, or after `drain_timeout_s`."""

    min_gangs: int = 1
    max_gangs: int = 2
    target_ongoing_requests: float = 16.0  # per rank (each rank is a DP rank with its own requests)
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_s: float = 30.0
    drain_timeout_s: float = 300.0

    def __post_init__(self):
        check_field(isinstance(self.min_gangs, int) and not isinstance(self.min_gangs, bool) and self.min_gangs >= 1,
                    "min_gangs", self.min_gangs, "must be an integer >= 1")
        check_field(isinstance(self.max_gangs, int) and not isinstance(self.max_gangs, bool)
                    and self.max_gangs >= self.min_gangs, "max_gangs", self.max_gangs,
                    f"must be an integer >= min_gangs ({self.min_gangs})")
        for name, low in (("target_ongoing_requests", None), ("look_back_s", None), ("upscale_delay_s", 0),
                          ("downscale_delay_s", 0), ("drain_timeout_s", 0)):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v > 0 if low is None else v >= low)
            check_field(ok, name, v, "must be a number > 0" if low is None else "must be a number >= 0")

    def replicas(self, ep_size: int, num_gangs: int) -> dict:
        """Ray Serve's `autoscaling_config` for a deployment of gangs of `ep_size` ranks, starting with
        `num_gangs` gangs (kept within min..max)."""
        start = min(max(num_gangs, self.min_gangs), self.max_gangs)
        return dict(min_replicas=self.min_gangs * ep_size, max_replicas=self.max_gangs * ep_size,
                    initial_replicas=start * ep_size, target_ongoing_requests=self.target_ongoing_requests,
                    upscale_delay_s=self.upscale_delay_s, downscale_delay_s=self.downscale_delay_s,
                    look_back_period_s=self.look_back_s)


# The engine options a role may set for its ranks: (engine config section, field). Their types, defaults and checks
# are the engine's own; a role only adds which ones it carries (kv_cache_memory may also be left to the deployment's).
ROLE_ENGINE_OPTIONS = ((SchedulerConfig, "max_num_seqs"), (SchedulerConfig, "max_num_batched_tokens"),
                       (CacheConfig, "kv_cache_memory"), (ParallelConfig, "num_redundant_experts"),
                       (ParallelConfig, "enable_overlap"), (ParallelConfig, "eplb_interval_s"),
                       (SpeculativeConfig, "num_speculative_tokens"))


@dataclass(frozen=True)
class RoleConfig:
    """One role's gangs: `num_gangs` units of `ep_size` ranks, and their ranks' engine options
    (`ROLE_ENGINE_OPTIONS`, with the engine's defaults and validation)."""

    ep_size: int = 2
    num_gangs: int = 1
    num_redundant_experts: int = ParallelConfig.num_redundant_experts
    max_num_seqs: int = SchedulerConfig.max_num_seqs
    max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens
    kv_cache_memory: int | None = None  # None: the deployment's kv_cache_memory
    enable_overlap: bool = ParallelConfig.enable_overlap
    eplb_interval_s: float = ParallelConfig.eplb_interval_s  # live rebalancing period; 0: off
    # MTP drafts per decode step (a prefill role never drafts); in single-rank gangs only so far
    num_speculative_tokens: int = SpeculativeConfig.num_speculative_tokens
    autoscaling: AutoscalingConfig | None = None  # None: `num_gangs` gangs, always

    def __post_init__(self):
        for name in ("ep_size", "num_gangs"):
            v = getattr(self, name)
            check_field(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, v, "must be a positive integer")
        for section in {s for s, _ in ROLE_ENGINE_OPTIONS}:  # the engine checks its own options
            section(**{n: v for s, n in ROLE_ENGINE_OPTIONS if s is section
                       and (v := getattr(self, n)) is not None})
        check_field(not self.num_speculative_tokens or self.ep_size == 1, "num_speculative_tokens",
                    self.num_speculative_tokens, f"needs ep_size 1 (got {self.ep_size}): speculative decoding does not "
                    "run in expert-parallel gangs yet")

    def engine_options(self) -> dict:
        """This role's engine options, as `EngineConfig.from_options` takes them (unset ones left out)."""
        return {n: v for _, n in ROLE_ENGINE_OPTIONS if (v := getattr(self, n)) is not None}


@dataclass(frozen=True)
class ServeConfig:
    model: str = "tiny"
    dtype: str = "float32"
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # default: the preset name or the checkpoint directory's name
    disaggregated: bool = True  # False: colocated mixed ranks, no prefill/decode split
    prefill: RoleConfig = field(default_factory=RoleConfig)
    decode: RoleConfig = field(default_factory=RoleConfig)
    mixed: RoleConfig = field(default_factory=RoleConfig)
    kv_cache_memory: int = 512 * 2**20  # per rank, unless a role sets its own
    max_queue: int = 256  # choices (n x prompts of every request) in flight at one ingress replica before 429s
    max_queue_tokens: int = 2**22  # prompt + max_tokens of those choices, before 429s
    max_prompts_per_request: int = 256  # a completions request's prompt list
    max_choices_per_request: int = 256  # n x prompts of one request (more: 400)
    max_stop_strings: int = 4
    max_stop_token_ids: int = 64
    max_tools: int = 128  # a chat request's tools (OpenAI's bound)
    max_prompt_logprob_tokens: int = 2**17  # prompt tokens x n a completions request returns logprobs for (echo)
    max_resumes: int = 8  # a choice continued elsewhere at most this often (drains and rank failures together)
    quarantine_after: int = 2  # rank failures while serving one choice before it is refused (500), not resumed
    reasoning_parser: str | None = None  # "deepseek_r1" | "none"; default: from the checkpoint's chat template
    max_request_bytes: int = 8 * 2**20  # larger request bodies get 413, refused while they arrive
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # any one of them, as a bearer token; none: open
    metrics_need_key: bool = False  # /metrics asks for an API key too (/health never does)
    kv_transfer_timeout_s: float = 10.0
    resume_deadline_s: float = 30.0  # after a rank fails, how long a request waits for a healthy gang before a 503
    stream_interval_s: float = 0.0  # a stream's chunks at most this often, tokens between merged (0: each step's)
    collective_timeout_s: float = 30.0
    cpus_per_rank: float | None = None  # default: 0.5 on CPU machines, 1 per GPU rank
    seed: int = 0
    enforce_eager: bool = False  # decode ranks never replay CUDA graphs
    null_runner: bool = False  # ranks sample at once without a model: the serving path's ceiling (benchmarks)
    disk_cache_dir: str | None = None  # the on-disk KV tier, shared by every rank (all nodes must mount it)
    disk_cache_bytes: int | None = None  # the tier's budget; default: the engine's

    def __post_init__(self):
        check_field(isinstance(self.port, int) and 0 < self.port < 65536, "port", self.port, "must be in 1..65535")
        for name in ("max_queue", "max_queue_tokens", "max_prompts_per_request", "max_choices_per_request",
                     "max_stop_strings", "max_stop_token_ids", "max_tools", "max_prompt_logprob_tokens", "max_resumes",
                     "quarantine_after"):
            v = getattr(self, name)
            check_field(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, v, "must be a positive integer")
        check_field(self.reasoning_parser in (None, "none", "deepseek_r1"), "reasoning_parser",
                    self.reasoning_parser, "must be 'deepseek_r1' or 'none'")
        check_field(isinstance(self.max_request_bytes, int) and self.max_request_bytes >= 1024,
                    "max_request_bytes", self.max_request_bytes, "must be at least 1024 bytes")
        keys = (self.api_keys,) if isinstance(self.api_keys, str) else tuple(self.api_keys or ())
        check_field(all(isinstance(k, str) and k.strip() == k and k for k in keys), "api_keys", "<hidden>",
                    "each key must be a non-empty string without surrounding spaces")
        object.__setattr__(self, "api_keys", keys)
        check_field(self.kv_transfer_timeout_s > 0, "kv_transfer_timeout_s", self.kv_transfer_timeout_s, "must be > 0")
        check_field(isinstance(self.resume_deadline_s, (int, float)) and self.resume_deadline_s > 0,
                    "resume_deadline_s", self.resume_deadline_s, "must be a number of seconds > 0")
        check_field(isinstance(self.stream_interval_s, (int, float)) and 0 <= self.stream_interval_s <= 1,
                    "stream_interval_s", self.stream_interval_s, "must be a number of seconds in [0, 1]")
        self.engine_config(self.roles[0])  # validates model/dtype and the role's engine options

    @property
    def roles(self) -> tuple[str, ...]:
        return ("prefill", "decode") if self.disaggregated else ("mixed",)

    @property
    def model_name(self) -> str:
        return self.served_model_name or os.path.basename(os.path.normpath(self.model))

    def role(self, name: str) -> RoleConfig:
        return getattr(self, name)

    def engine_config(self, role: str) -> EngineConfig:
        r = self.role(role)
        options = {"kv_cache_memory": self.kv_cache_memory, **r.engine_options()}
        return EngineConfig.from_options(
            self.model, dtype=self.dtype, device=self.device, seed=self.seed, enforce_eager=self.enforce_eager,
            null_runner=self.null_runner, ep_size=r.ep_size, scheduler_mode=role, **options, disk_cache_dir=self.disk_cache_dir,
            disk_cache_bytes=self.disk_cache_bytes, collective_timeout_s=self.collective_timeout_s)

    @property
    def num_ranks(self) -> int:
        return sum(self.role(r).ep_size * self.role(r).num_gangs for r in self.roles)

    @property
    def max_ranks(self) -> int:
        """Ranks when every autoscaled role runs its max gangs (what the cluster must be able to hold)."""
        return sum(self.role(r).ep_size * (a.max_gangs if (a := self.role(r).autoscaling) else self.role(r).num_gangs)
                   for r in self.roles)

    @staticmethod
    def from_dict(raw: dict, **overrides) -> "ServeConfig":
        """From a parsed YAML mapping, then flag overrides (None values are ignored)."""
        _only_known(raw, ServeConfig, "the serve config")
        kw = dict(raw)
        for role in ROLES:
            if role in kw:
                kw[role] = _role(role, kw[role])
        kw.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("kv_cache_memory", "max_request_bytes", "disk_cache_bytes"):
            if kw.get(key) is not None:
                kw[key] = parse_bytes(kw[key], key)
        return ServeConfig(**kw)

    @staticmethod
    def from_file(path: str, **overrides) -> "ServeConfig":
        import yaml

        if not os.path.exists(path):
            raise ConfigError(f"serve config file {path!r} does not exist")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML ({e})") from e
        return ServeConfig.from_dict(raw, **overrides)

    def with_ep(self, prefill: int | None = None, decode: int | None = None) -> "ServeConfig":
        """Flag overrides of the roles' gang sizes."""
        cfg = self
        if prefill:
            cfg = replace(cfg, prefill=replace(cfg.prefill, ep_size=prefill))
        if decode:
            cfg = replace(cfg, decode=replace(cfg.decode, ep_size=decode), mixed=replace(cfg.mixed, ep_size=decode))
        return cfg


    def with_speculation(self, k: int | None) -> "ServeConfig":
        """The flag override of the decoding roles' (decode, mixed) MTP drafts per step."""
        if k is None:
            return self
        return replace(self, decode=replace(self.decode, num_speculative_tokens=k),
                       mixed=replace(self.mixed, num_speculative_tokens=k))


def _only_known(raw, cls, where: str) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}; known: {', '.join(sorted(known))}")


def _role(name: str, raw) -> RoleConfig:
    _only_known(raw, RoleConfig, f"serve config section '{name}'")
    kw = dict(raw)
    if kw.get("kv_cache_memory") is not None:
        kw["kv_cache_memory"] = parse_bytes(kw["kv_cache_memory"], f"{name}.kv_cache_memory")
    try:
        if kw.get("autoscaling") is not None:
            _only_known(kw["autoscaling"], AutoscalingConfig, f"serve config section '{name}.autoscaling'")
            kw["autoscaling"] = AutoscalingConfig(**kw["autoscaling"])
        return RoleConfig(**kw)
    except ConfigError as e:
        raise ConfigError(f"under '{name}': {e}") from e
