"""The KV handoff state machines with fake futures: every way a transfer can end."""
from concurrent.futures import Future

import pytest
import torch

from rayinfer.engine.kv_transfer import KVReceiver, KVTransfer, TransferState

SHAPE = (3, 10, 48)


def test_done_when_the_payload_arrives_with_the_right_shape():
    f = Future()
    r = KVReceiver("a", f, SHAPE, timeout_s=5, now=0.0)
    assert r.poll(1.0) is TransferState.TRANSFERRING
    f.set_result(torch.zeros(SHAPE))
    assert r.poll(2.0) is TransferState.DONE and r.result.shape == SHAPE
    assert r.poll(99.0) is TransferState.DONE  # finished transfers stay finished


@pytest.mark.parametrize("outcome,reason", [(RuntimeError("owner died"), "owner died"),
                                            (torch.zeros(3, 9, 48), "expected (3, 10, 48)"),
                                            ("not a tensor", "payload of shape ()")])
def test_failed_on_error_or_wrong_payload(outcome, reason):
    f = Future()
    r = KVReceiver("b", f, SHAPE, timeout_s=5, now=0.0)
    f.set_exception(outcome) if isinstance(outcome, Exception) else f.set_result(outcome)
    assert r.poll(1.0) is TransferState.FAILED and reason in r.transfer.error and r.result is None


def test_failed_after_the_deadline_and_future_cancelled():
    f = Future()
    r = KVReceiver("c", f, SHAPE, timeout_s=2, now=0.0)
    assert r.poll(1.9) is TransferState.TRANSFERRING
    assert r.poll(2.1) is TransferState.FAILED and "2" in r.transfer.error and f.cancelled()


def test_illegal_transitions_are_caught():
    t = KVTransfer("d", 1.0)
    with pytest.raises(AssertionError):
        t.complete(0.0)
    t.start(0.0)
    t.fail(0.5, "x")
    with pytest.raises(AssertionError):
        t.complete(1.0)


def test_a_finished_or_abandoned_receiver_lets_go_of_the_future():
    """The transport may keep the payload alive while anyone holds its future: once done, nobody should."""
    done, failed, abandoned = Future(), Future(), Future()
    receivers = [KVReceiver(str(i), f, SHAPE, timeout_s=5, now=0.0) for i, f in enumerate((done, failed, abandoned))]
    done.set_result(torch.zeros(SHAPE))
    failed.set_exception(RuntimeError("lost"))
    assert [r.poll(1.0) for r in receivers] == [TransferState.DONE, TransferState.FAILED, TransferState.TRANSFERRING]
    receivers[2].close()
    assert all(r.future is None for r in receivers) and abandoned.cancelled()
    assert receivers[0].result is not None
