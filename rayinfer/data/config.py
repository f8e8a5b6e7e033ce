"""The batch processor's configuration, shaped like `ray.data.llm`'s processor configs.

Owns what one batch job asks of its engines: the model, the gang shape (`ep_size` ranks, redundant
expert slots), how many gangs (`concurrency`: the Ray Data actor pool, one gang per worker), rows per
batch, how many batches a worker keeps in flight at once, the remaining engine options and the sampling
defaults rows start from. Built once in the driver and validated there (an impossible option fails
before any worker starts); crossing to the workers as a plain dict (`to_dict`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from rayinfer.config import EngineConfig
from rayinfer.config.model import ConfigError, check_field
from rayinfer.messages import SamplingParams


@dataclass(frozen=True)
class ProcessorConfig:
    model: str = "tiny"  # preset name or checkpoint directory (ray.data.llm's `model_source`)
    ep_size: int = 1  # ranks per gang; 1 runs the engine inside the worker process
    num_redundant_experts: int = 0
    concurrency: int = 1  # gangs, one per Ray Data worker
    batch_size: int = 32  # rows per Ray Data batch
    max_concurrent_batches: int = 4  # batches one worker runs at once: rows of all of them share the engine
    engine_kwargs: dict = field(default_factory=dict)  # any other `LLM(...)` option (dtype, max_num_seqs, ...)
    sampling_params: dict = field(default_factory=dict)  # defaults a row's own `sampling_params` override
    max_attempts: int = 4  # tries per row when its gang fails under it (a rank died); then the row errors

    def __post_init__(self):
        for name in ("ep_size", "concurrency", "batch_size", "max_concurrent_batches", "max_attempts"):
            v = getattr(self, name)
            check_field(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, v, "must be an integer >= 1")
        for name in ("engine_kwargs", "sampling_params"):
            check_field(isinstance(getattr(self, name), dict), name, getattr(self, name), "must be a dict")
        for key in ("model", "ep_size", "num_redundant_experts"):
            if key in self.engine_kwargs:
                raise ConfigError(f"engine_kwargs[{key!r}]: set it on the processor config itself")
        self.engine_config()  # unknown or invalid engine options fail here, in the driver
        try:
            SamplingParams(**self.sampling_params)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"sampling_params={self.sampling_params!r}: {e}") from None

    def engine_config(self) -> EngineConfig:
        return EngineConfig.from_options(self.model, ep_size=self.ep_size,
                                         num_redundant_experts=self.num_redundant_experts, **self.engine_kwargs)

    def to_dict(self) -> dict:
        return asdict(self)
