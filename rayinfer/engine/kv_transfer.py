"""The KV handoff from a prefill rank to a decode rank, as explicit, pollable state machines.

A transfer is PENDING until the bytes start moving, TRANSFERRING until they arrive (DONE) or
something goes wrong (FAILED): the source is gone, the payload does not fit the request, or
the deadline passes. Neither side ever waits on it: the decode side polls `KVReceiver` from
its event loop, and a FAILED transfer only means the decode rank computes the prompt itself
(re-prefill), which yields the same tokens. The transport (Ray's object store here) is
injected as a future, so this module knows nothing about Ray. The sending side keeps nothing:
Ray's reference counting keeps a payload exactly as long as the ingress or a decode rank holds
its reference, and the decode rank lets go as soon as its transfer has finished either way.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass


class TransferState(str, enum.Enum):
    PENDING = "pending"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"


@dataclass
class KVTransfer:
    request_id: str
    timeout_s: float
    state: TransferState = TransferState.PENDING
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None

    def start(self, now: float) -> None:
        assert self.state is TransferState.PENDING, f"{self.request_id}: start from {self.state}"
        self.state, self.started_at = TransferState.TRANSFERRING, now

    def complete(self, now: float) -> None:
        assert self.state is TransferState.TRANSFERRING, f"{self.request_id}: complete from {self.state}"
        self.state, self.finished_at = TransferState.DONE, now

    def fail(self, now: float, why: str) -> None:
        assert self.state in (TransferState.PENDING, TransferState.TRANSFERRING), \
            f"{self.request_id}: fail from {self.state}"
        self.state, self.finished_at, self.error = TransferState.FAILED, now, why

    def overdue(self, now: float) -> bool:
        return self.state is TransferState.TRANSFERRING and now - self.started_at > self.timeout_s

    @property
    def finished(self) -> bool:
        return self.state in (TransferState.DONE, TransferState.FAILED)


class KVReceiver:
    """Decode side: drives one transfer given `future` (a concurrent.futures-style future of the payload)."""

    def __init__(self, request_id: str, future, expected_shape: tuple[int, int, int], timeout_s: float,
                 now: float | None = None):
        """`expected_shape`: (layers, prompt tokens, latent width) the decode rank can use."""
        self.transfer = KVTransfer(request_id, timeout_s)
        self.future, self.expected_shape = future, tuple(expected_shape)
        self.result = None
        self.transfer.start(time.monotonic() if now is None else now)

    def poll(self, now: float | None = None) -> TransferState:
        t = self.transfer
        if t.finished:
            return t.state
        now = time.monotonic() if now is None else now
        if self.future.done():
            try:
                payload = self.future.result()
            except Exception as e:  # the source rank died, the object was lost, ...
                t.fail(now, f"{type(e).__name__}: {e}")
                return self._let_go()
            if tuple(getattr(payload, "shape", ())) != self.expected_shape:
                t.fail(now, f"payload of shape {tuple(getattr(payload, 'shape', ()))}, "
                            f"expected {self.expected_shape}")
            else:
                self.result = payload
                t.complete(now)
            return self._let_go()
        if t.overdue(now):
            self.future.cancel()
            t.fail(now, f"no KV after {t.timeout_s}s")
            return self._let_go()
        return t.state

    def close(self) -> None:
        """Abandons an unfinished transfer (its caller was cancelled)."""
        if self.future is not None:
            self.future.cancel()
            self._let_go()

    def _let_go(self) -> TransferState:
        self.future = None  # the transport may hold the payload for as long as anyone holds its future
        return self.transfer.state
