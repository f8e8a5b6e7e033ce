"""How one engine runs: cache, scheduler, expert-parallel and speculative options, and their flat form.

`EngineConfig` nests `CacheConfig`, `SchedulerConfig`, `ParallelConfig` and `SpeculativeConfig`; `from_options`
builds it from the flat keyword options users pass to `LLM(...)`, naming any unknown or bad
option. Frozen and validated when built; values derived at run time (the number of cache
pages, the placement of experts) live with the objects that derive them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from rayinfer.config.model import ConfigError, check_field
from rayinfer.kernels import PAGE_SIZE

_DTYPES = ("float32", "bfloat16", "float16")
_MODES = ("mixed", "prefill", "decode")
_SIZE_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_bytes(value, name: str) -> int:
    """An int, or a string like "512MiB" / "2GB", as bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        s = value.strip().lower().replace(" ", "")
        num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = s[len(num):]
        if num and unit in _SIZE_UNITS:
            try:
                n = float(num) * _SIZE_UNITS[unit]
                if n >= 1:
                    return int(n)
            except ValueError:
                pass
    raise ConfigError(f"option '{name}'={value!r}: must be a positive byte count such as 536870912 or '512MiB'")


def _positive_int(name: str, v) -> None:
    check_field(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, v, "must be a positive integer")


@dataclass(frozen=True)
class CacheConfig:
    """The paged MLA latent cache: pages of 64 tokens (FlashMLA's page size)."""

    block_size: int = PAGE_SIZE
    kv_cache_tokens: int | None = None  # capacity in tokens; or derived from kv_cache_memory
    kv_cache_memory: int = 512 * 2**20  # bytes, used when kv_cache_tokens is not given
    enable_prefix_caching: bool = True
    disk_cache_dir: str | None = None  # the on-disk KV tier's directory (shared by ranks); None: no disk tier
    disk_cache_bytes: int = 64 * 2**30  # the tier's budget; least recently used pages go first

    def __post_init__(self):
        check_field(self.block_size == PAGE_SIZE, "block_size", self.block_size,
                    f"the MLA cache uses {PAGE_SIZE}-token pages")
        if self.kv_cache_tokens is not None:
            _positive_int("kv_cache_tokens", self.kv_cache_tokens)
        _positive_int("kv_cache_memory", self.kv_cache_memory)
        check_field(isinstance(self.enable_prefix_caching, bool), "enable_prefix_caching", self.enable_prefix_caching,
               "must be true or false")
        if self.disk_cache_dir is not None:
            check_field(isinstance(self.disk_cache_dir, str) and self.disk_cache_dir, "disk_cache_dir",
                        self.disk_cache_dir, "must be a directory path")
            check_field(self.enable_prefix_caching, "enable_prefix_caching", self.enable_prefix_caching,
                        "must be true when disk_cache_dir is set (the disk tier is keyed by prefix hashes)")
        _positive_int("disk_cache_bytes", self.disk_cache_bytes)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    mode: str = "mixed"  # "prefill" / "decode" for disaggregated ranks
    max_model_len: int | None = None  # default: the model's max_position_embeddings

    def __post_init__(self):
        _positive_int("max_num_seqs", self.max_num_seqs)
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        check_field(self.mode in _MODES, "scheduler_mode", self.mode, f"must be one of {', '.join(_MODES)}")
        if self.max_model_len is not None:
            _positive_int("max_model_len", self.max_model_len)


@dataclass(frozen=True)
class ParallelConfig:
    """Expert-parallel unit: `ep_size` ranks, each an attention DP rank holding a shard of expert slots."""

    ep_size: int = 1
    num_redundant_experts: int = 0
    enable_overlap: bool = True
    overlap_min_tokens: int = 32  # below this many tokens on every rank, one microbatch is faster
    eplb_interval_s: float = 0.0  # rebalance experts from measured load this often; 0: only on demand
    eplb_window_steps: int = 1000  # the sliding window of expert loads, in steps
    address: str | None = None  # a running Ray cluster to join; default: start one on 127.0.0.1
    collective_timeout_s: float = 30.0

    def __post_init__(self):
        _positive_int("ep_size", self.ep_size)
        check_field(isinstance(self.num_redundant_experts, int) and self.num_redundant_experts >= 0,
               "num_redundant_experts", self.num_redundant_experts, "must be an integer >= 0")
        check_field(isinstance(self.enable_overlap, bool), "enable_overlap", self.enable_overlap, "must be true or false")
        check_field(isinstance(self.overlap_min_tokens, int) and self.overlap_min_tokens >= 0, "overlap_min_tokens",
               self.overlap_min_tokens, "must be an integer >= 0")
        check_field(self.collective_timeout_s > 0, "collective_timeout_s", self.collective_timeout_s, "must be > 0")
        check_field(self.eplb_interval_s >= 0, "eplb_interval_s", self.eplb_interval_s, "must be >= 0 (0: on demand)")
        _positive_int("eplb_window_steps", self.eplb_window_steps)


_TOP_OPTIONS = ("dtype", "device", "seed", "enforce_eager", "null_runner")  # EngineConfig's own, not a section's


@dataclass(frozen=True)
class SpeculativeConfig:
    """MTP speculative decoding: `num_speculative_tokens` drafts per decode step from the checkpoint's MTP module
    (chained on its own outputs when more than one), verified by the target in the same forward; 0: off."""

    num_speculative_tokens: int = 0

    def __post_init__(self):
        k = self.num_speculative_tokens
        check_field(isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= MAX_SPECULATIVE_TOKENS,
                    "num_speculative_tokens", k, f"must be an integer in [0, {MAX_SPECULATIVE_TOKENS}] (0: off)")


MAX_SPECULATIVE_TOKENS = 8  # chained drafts past a few accept almost nothing; more is a typo, not a setting


@dataclass(frozen=True)
class EngineConfig:
    model: str
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    enforce_eager: bool = False  # never replay decode steps from CUDA graphs (vLLM's --enforce-eager)
    null_runner: bool = False  # steps sample at once, no forward: the serving path's own ceiling (benchmarks)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self):
        check_field(isinstance(self.model, str) and self.model, "model", self.model, "must name a preset or a directory")
        check_field(self.dtype in _DTYPES, "dtype", self.dtype, f"must be one of {', '.join(_DTYPES)}")
        check_field(isinstance(self.seed, int), "seed", self.seed, "must be an integer")
        check_field(isinstance(self.enforce_eager, bool), "enforce_eager", self.enforce_eager, "must be true or false")
        check_field(isinstance(self.null_runner, bool), "null_runner", self.null_runner, "must be true or false")
        check_field(not (self.null_runner and self.parallel.ep_size > 1), "null_runner", self.null_runner,
                    "runs single-rank engines only (a gang's ranks must run their collectives)")

    @staticmethod
    def from_options(model: str, **options) -> "EngineConfig":
        """Flat keyword options (the `LLM(...)` / CLI form) -> nested, validated config."""
        groups = {"cache": (CacheConfig, {}), "scheduler": (SchedulerConfig, {}), "parallel": (ParallelConfig, {}),
                  "speculative": (SpeculativeConfig, {})}
        top = {}
        renames = {"scheduler_mode": "mode"}
        for key, value in options.items():
            if value is None:
                continue
            if key in ("kv_cache_memory", "disk_cache_bytes"):
                value = parse_bytes(value, key)
            if key == "dtype" and not isinstance(value, str):
                value = str(value).replace("torch.", "")
            target = renames.get(key, key)
            for cls, kw in groups.values():
                if target in {f.name for f in fields(cls)}:
                    kw[target] = value
                    break
            else:
                if key in _TOP_OPTIONS:
                    top[key] = value
                else:
                    valid = sorted([*_TOP_OPTIONS, "scheduler_mode"] + [
                        f.name for cls, _ in groups.values() for f in fields(cls) if f.name != "mode"])
                    raise ConfigError(f"unknown engine option {key!r}; valid options: {', '.join(valid)}")
        return EngineConfig(model=model, **top, **{name: cls(**kw) for name, (cls, kw) in groups.items()})
