"""Decode steps replayed from captured graphs, one per padded batch-size bucket (see decode_buckets).

Owns the static step buffers and one graph per bucket. The buffers are sized for the largest bucket
and a bucket uses their first rows, so every replay reads the same addresses: token ids, positions,
cache slots, context lengths [B] and block tables [B, pages of max_model_len] (a fixed width, so no
shape changes between steps), plus each bucket's output, the final hidden states [b, H] before the
last norm. A step's inputs are written into host staging buffers (pinned on CUDA), copied with
non-blocking copies, then the graph replays; the caller reads the output rows of its real sequences
before the next step. Crosses: a decode-only step's items (padded with dummies) in, hidden rows out.

The capture mechanism is injected. `CudaGraphCapture` warms the forward up on a side stream and
captures it with `torch.cuda.graph` into one memory pool shared by every bucket. `TapeCapture`
(CPU) records the aten ops the forward dispatches and replays exactly those ops on the same tensors:
like a CUDA graph, a replay runs no Python model code, so any per-step state the forward kept on the
host instead of in the static buffers is frozen at capture, which the tests observe; and like a
capture, it refuses host reads and tensors made from Python data.

Per-step kernel metadata (FlashMLA's schedule) is built outside the graph before each replay, into
tensors the graph reads (`kernels.mla.refresh_step_cache`). Who captures: `graphs_blocker` says why
an engine stays eager (a gang, FP8 experts, a kernel path that reads the host).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rayinfer.kernels.mla import PAGE_SIZE, decode_backend, refresh_step_cache
from rayinfer.model import DeepseekV3, ForwardBatch

Replay = Callable[[], None]


def graphs_blocker(model: DeepseekV3, ctx) -> str | None:
    """Why decode steps of this engine cannot replay from graphs, or None when they can."""
    if ctx is not None:
        # All-to-all splits are data-dependent counts read on the host, and a gang steps in lockstep
        # with ranks of other batch sizes: gang decode stays eager.
        return "an expert-parallel gang runs eagerly"
    if any(m.experts.w13_scale is not None for m in model.moe_layers):
        return "FP8 expert weights read per-expert row counts on the host (not capturable)"
    return None


class CudaGraphCapture:
    """Captures with `torch.cuda.graph` after a warm-up run on a side stream; one pool for every bucket."""

    def __init__(self):
        self.pool = None

    @staticmethod
    def blocker(model: DeepseekV3, kv_cache: torch.Tensor) -> str | None:
        from rayinfer.kernels.moe import ffn_backend

        for m in model.moe_layers:
            x = kv_cache.new_empty(0, m.experts.w13.shape[2])
            if ffn_backend(x, m.experts.w13, m.experts.w2, False) != "grouped_mm":
                return "the expert FFN reads row counts on the host here (torch._grouped_mm needs bf16 on sm90+)"
        q = kv_cache.new_empty(1, 1, model.cfg.num_attention_heads, kv_cache.shape[-1])
        if decode_backend(q, kv_cache, model.cfg.kv_lora_rank) == "reference":
            # It gathers every row of the block table, which a graph holds at the width of max_model_len.
            return "no FlashMLA or Triton MLA decode kernel here (the reference would read max_model_len per row)"
        return None

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazy weights, probes, autotuning, per-step metadata
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Thread-local: another thread of the process (a KV export, the disk tier) may use CUDA meanwhile.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn()
        if self.pool is None:
            self.pool = graph.pool()
        return graph.replay, out


aten = torch.ops.aten
# Ops that make the host wait for the device (a scalar read, or an output shape that depends on values).
HOST_SYNCING = frozenset({aten._local_scalar_dense, aten.item, aten.nonzero, aten.masked_select,
                          aten.unique_consecutive, aten._unique2, aten.unique_dim, aten.bincount,
                          aten.repeat_interleave, aten.is_nonzero, aten.equal, aten.allclose, aten.histc})
# Ops that turn host data (a Python list) into a tensor: an H2D copy from pageable memory.
HOST_INPUT = frozenset({aten.lift_fresh, aten.lift_fresh_copy})
# What fails a CUDA capture (and what the tape refuses): both of the above.
NOT_CAPTURABLE = HOST_SYNCING | HOST_INPUT


class _Tape(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        masks = func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))  # a hidden nonzero
        if func.overloadpacket in NOT_CAPTURABLE or masks:
            raise RuntimeError(f"{func} inside a captured forward: a CUDA graph cannot hold it")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class TapeCapture:
    """CPU stand-in for a CUDA graph: replays the recorded aten ops on the recorded tensors."""

    @staticmethod
    def blocker(model, kv_cache) -> None:
        return None

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
        fn()  # the warm-up the CUDA capture runs: what is built once (absorbed weights) stays off the tape
        tape = _Tape()
        with tape:
            out = fn()

        def replay() -> None:
            for func, args, kwargs, recorded in tape.ops:
                if func._schema.name in ("aten::empty", "aten::new_empty", "aten::empty_like"):
                    continue  # the recorded tensor is the allocation; its contents are undefined anyway
                result = func(*args, **kwargs)
                for dst, src in zip(tree_leaves(recorded), tree_leaves(result)):
                    # Fresh results land in the recorded tensors; views and in-place results already alias them.
                    if isinstance(dst, torch.Tensor) and not _same_memory(dst, src):
                        dst.copy_(src)
        return replay, out


class DecodeGraphs:
    """Static decode buffers and one captured forward per bucket, filled and replayed step by step."""

    def __init__(self, model: DeepseekV3, kv_caches: list[torch.Tensor], buckets: list[int], max_model_len: int,
                 device: torch.device, capture):
        self.model, self.kv_caches, self.buckets, self.device = model, kv_caches, buckets, device
        self.capturer = capture
        self.max_model_len = max_model_len
        n, self.width = buckets[-1], -(-max_model_len // PAGE_SIZE)
        pin = device.type == "cuda"
        # Host staging [ids, positions, slots, lens] and tables; device copies are what the graphs read.
        self.host = torch.zeros(4, n, dtype=torch.long, pin_memory=pin)
        self.host_tables = torch.zeros(n, self.width, dtype=torch.long, pin_memory=pin)
        self.static = torch.zeros(4, n, dtype=torch.long, device=device)
        self.tables = torch.zeros(n, self.width, dtype=torch.long, device=device)  # [B, max_model_len pages]
        self.graphs: dict[int, tuple[Replay, torch.Tensor, ForwardBatch]] = {}
        model.rotary.reserve(max_model_len, device)  # no step, eager or replayed, grows the tables afterwards
        self.replays = 0
        self._copied = torch.cuda.Event() if pin else None  # the last step's host-to-device copies
        self._used = 0  # host table columns that may hold pages

    def _batch(self, b: int) -> ForwardBatch:
        """The bucket's ForwardBatch over the static buffers: nothing in it depends on a step's content."""
        _ids, pos, slots, lens = self.static[:, :b]
        batch = ForwardBatch(pos, [1] * b, [1] * b, self.tables[:b], slots, self.kv_caches)
        # Every row is a decode row (rows 0..b-1); what __post_init__ derived from the host lengths
        # above is replaced by the static buffers, and rope tables are sized for any position.
        batch.decode_lens, batch.decode_tables = lens, self.tables[:b]
        batch.num_positions = self.max_model_len
        return batch

    def _fill(self, items: list[tuple]) -> None:
        """Writes a padded decode step's (sequence, position, 1) items into the static buffers."""
        b = len(items)
        ids, pos, slots, lens, counts, flat = [], [], [], [], [], []
        for seq, start, _ in items:
            pages = seq.block_ids
            ids.append(seq.token_ids[start])
            pos.append(start)
            slots.append(pages[start // PAGE_SIZE] * PAGE_SIZE + start % PAGE_SIZE)
            lens.append(start + 1)
            counts.append(len(pages))
            flat.extend(pages)
        assert max(counts) <= self.width, f"{max(counts)} pages exceed max_model_len's {self.width}"
        if self._copied is not None:  # the engine's sampler waited for them already; a benchmark loop may not have
            self._copied.synchronize()
        # Only the columns written since the last step need clearing; one scatter writes every row's pages.
        self.host_tables[:b, : self._used].zero_()
        self._used = max(self._used, max(counts))
        row = torch.repeat_interleave(torch.arange(b), torch.tensor(counts))  # [P] table row of each page
        starts = torch.tensor(counts).cumsum(0) - torch.tensor(counts)
        self.host_tables[row, torch.arange(len(flat)) - starts[row]] = torch.tensor(flat)
        self.host[:, :b] = torch.tensor([ids, pos, slots, lens])
        # Non-blocking from pinned memory: the next step rewrites it only once `_copied` says these are done.
        for row in range(4):  # contiguous slices: a strided host-to-device copy would stage through pageable memory
            self.static[row, :b].copy_(self.host[row, :b], non_blocking=True)
        self.tables[:b].copy_(self.host_tables[:b], non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def run(self, items: list[tuple]) -> torch.Tensor:
        """A decode step padded to a bucket -> final hidden states [b, H] (static: read before the next step)."""
        b = len(items)
        assert b in self.buckets, f"{b} items are not padded to a bucket of {self.buckets}"
        self._fill(items)
        if b not in self.graphs:
            batch = self._batch(b)
            ids = self.static[0, :b]
            def forward() -> torch.Tensor:
                batch.derived.clear()  # the warm-up's; the capture records their computation from the buffers
                return self.model.hidden_states(ids, batch)

            replay, out = self.capturer.capture(forward)
            self.graphs[b] = (replay, out, batch)
        replay, out, batch = self.graphs[b]
        refresh_step_cache(batch.step_cache)
        replay()
        self.replays += 1
        return out
