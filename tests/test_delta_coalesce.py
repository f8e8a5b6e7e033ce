"""AsyncEngine.stream folds deltas already queued behind one into a single message (a slow consumer gets
several tokens at once) without losing tokens, text, logprobs, the finish reason or an error behind them."""
import asyncio

import pytest

from rayinfer.engine.async_engine import coalesce
from rayinfer.messages import Delta


def _queue(*items) -> asyncio.Queue:
    q = asyncio.Queue()
    for it in items:
        q.put_nowait(it)
    return q


def test_queued_deltas_fold_into_one_up_to_the_finish():
    first = Delta("r", [1], "a", logprobs=[{1: -0.1}])
    q = _queue(Delta("r", [2], "b", logprobs=[{2: -0.2}]), Delta("r", [3], "c", logprobs=[{3: -0.3}],
                                                                   finish_reason="length"), Delta("r", [9], "z"))
    merged, pending = coalesce(first, q)
    assert (merged.token_ids, merged.text, merged.finish_reason, pending) == ([1, 2, 3], "abc", "length", None)
    assert merged.logprobs == [{1: -0.1}, {2: -0.2}, {3: -0.3}]
    assert first.token_ids == [1] and q.qsize() == 1  # the engine's delta untouched; nothing read past the finish


def test_an_error_behind_deltas_is_kept_for_next():
    err = RuntimeError("rank down")
    merged, pending = coalesce(Delta("r", [1], "a"), _queue(Delta("r", [2], "b"), err))
    assert merged.token_ids == [1, 2] and pending is err


@pytest.mark.parametrize("finish", [None, "stop"])
def test_nothing_queued_or_finished_passes_through(finish):
    d = Delta("r", [1], "a", finish_reason=finish)
    assert coalesce(d, _queue(Delta("r", [2], "b")) if finish else _queue()) == (d, None)
