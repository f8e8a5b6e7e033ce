"""A model runner that samples without running the model: what the serving path costs on its own.

`EngineConfig(null_runner=True)` (`ServeConfig.null_runner`) builds the rank as usual (its KV cache, scheduler,
tokenizer) but each step "samples" at once a fixed, non-EOS token pattern for every sequence due one, so a served
benchmark measures the ingress, the channels, Ray and the HTTP proxy with the engine's step cost near zero
(benchmarks/serve_path.py --null-runner). Single-rank engines only: a gang's ranks must run their collectives.
"""
from __future__ import annotations

from rayinfer.engine.model_runner import ModelRunner


PRINTABLE = 37  # the presets' byte-level vocabulary puts byte b at id b + 5: ids 37..131 are printable ASCII


class NullRunner(ModelRunner):
    def execute(self, sched) -> dict[str, tuple[int, None]]:
        out = {}
        for s in sched.scheduled:
            if s.samples:
                seq = s.seq
                token = PRINTABLE + (seq.token_ids[-1] * 7 + seq.num_tokens) % 95
                if token in self.eos_token_ids:
                    token += 1
                out[seq.request_id] = (token, None)
        return out
