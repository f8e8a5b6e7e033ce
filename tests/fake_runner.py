"""A model runner without a model, for scheduler and engine tests: deterministic tokens, recorded steps and imports."""
from __future__ import annotations


class FakeKV:
    """Stands in for handed-off latents [layers, tokens, D]: only the shape is looked at."""

    def __init__(self, num_tokens: int):
        self.shape = (1, num_tokens, 1)


class FakeRunner:
    """Samples token (last token * 7 + position) % 97 + 3: deterministic in the sequence's own tokens,
    so a request generates the same tokens whether its prompt was computed, cached or imported."""

    def __init__(self, num_blocks: int, max_model_len: int = 4096):
        self.num_blocks, self.max_model_len = num_blocks, max_model_len
        self.vocab_size, self.eos_token_ids, self.checkpoint_path = 100, {1}, None
        self.steps = []
        self.imported: list[tuple[str, int, list[int]]] = []  # (request id, tokens, pages written)

    def import_kv(self, seq, latents) -> None:
        n = latents.shape[1]
        assert len(seq.block_ids) * 64 >= n, f"{seq}: import of {n} tokens into too few pages"
        self.imported.append((seq.request_id, n, list(seq.block_ids)))

    def export_kv(self, seq) -> FakeKV:
        return FakeKV(seq.num_computed_tokens)

    def execute(self, sched):
        self.steps.append([(s.seq.request_id, s.start, s.num_new_tokens) for s in sched.scheduled])
        out = {}
        for s in sched.scheduled:
            if s.samples:
                seq = s.seq
                out[seq.request_id] = ((seq.token_ids[-1] * 7 + seq.num_tokens) % 97 + 3, None)
        return out
