"""The ingress end of the rank → ingress channels: one message per rank step for all of a replica's requests.

A choice's rank call (`RankReplica.run`) carries only its start (the id of the replica that took it), its end and
its error; its deltas come over the channel this ingress replica holds open to that rank replica, where one step's
deltas for every request of this replica travel as one packed list. `Channels.deltas` is what the resume path
iterates instead of a per-token stream: it keeps the guarantees of one (the call's cancellation aborts the request
on the rank; the call's error is the request's error; a rank that dies fails every choice it held, and each then
resumes elsewhere) while Ray carries a message per step instead of one per token per request.

A channel is opened on the first request a rank replica takes for this ingress and ends by itself once that
replica has had none of its requests for a while (a rank being stopped must see its calls end); it is opened
again for the next one. Deltas that arrive while a choice's consumer lags are merged into one (several tokens).

Serve counts an open channel as one ongoing request on its rank replica, and its autoscaling and routing read
that count. So a rank takes a request onto the channel only once it holds several of this replica's
(`RankReplica.run`); until then a step carries few of its deltas anyway, and the request streams them on its own
call, as before: the count stays exact where it is small enough for one call to matter (a handful of long
streams deciding a scale-down), and the channel serves where it pays. The call's first item says which it is.
"""
from __future__ import annotations

import asyncio
import logging
import uuid

from rayinfer.actors.choice import own_request_identity
from rayinfer.engine.async_engine import coalesce
from rayinfer.messages import Delta, unpack, unpack_list

log = logging.getLogger("rayinfer.ingress")
END_GRACE_S = 10.0  # how long a choice waits for its last delta after its call ended (it is on the channel)


class CallEnded(Exception):
    """Queued behind a choice's deltas when its rank call ended without an error."""


class Channels:
    def __init__(self):
        self.id = uuid.uuid4().hex  # names this ingress replica's outbox on every rank
        self.queues: dict[str, asyncio.Queue] = {}  # request id -> its choice's queue
        self.replica_of: dict[str, str] = {}  # request id -> the rank replica that holds it
        self.readers: dict[str, asyncio.Task] = {}  # rank replica id -> the task reading its channel
        self._background: set[asyncio.Task] = set()

    async def deltas(self, handle, call, request_id: str, first):
        """The deltas of the request that `call` (a streaming `run` call on `handle` naming this replica's
        channel) took, to its end: on the call itself, or on the channel when its first item is the rank
        replica's id. `first(awaitable)` awaits that item: the caller bounds how long it may take to be routed."""
        q = self.queues[request_id] = asyncio.Queue()  # before the call is taken: its deltas may come first
        calls = call.__aiter__()
        try:
            try:
                head = await first(calls.__anext__())
            except StopAsyncIteration:
                return
            if isinstance(head, bytes):  # the rank streams this one on the call
                del self.queues[request_id]
                yield unpack(head, Delta)
                async for raw in calls:
                    yield unpack(raw, Delta)
                return
            replica = head
            self.replica_of[request_id] = replica
            self._read(handle, replica)
            self._watch(calls, q)
            ended, pending = False, None
            while True:
                if pending is not None:
                    item, pending = pending, None
                elif ended:
                    try:
                        item = await asyncio.wait_for(q.get(), END_GRACE_S)
                    except asyncio.TimeoutError:
                        raise RuntimeError("the rank call ended but the request's last delta never came") from None
                else:
                    item = await q.get()
                if isinstance(item, CallEnded):
                    ended = True
                    continue
                if isinstance(item, BaseException):
                    raise item
                item, pending = coalesce(item, q)
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.queues.pop(request_id, None)
            self.replica_of.pop(request_id, None)

    def _watch(self, calls, q: asyncio.Queue) -> None:
        """Queues the call's end (or its error) behind the deltas."""
        async def watch():
            try:
                async for _ in calls:
                    pass
                q.put_nowait(CallEnded())
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - the request's own error: its consumer raises it
                q.put_nowait(e)

        self._keep(asyncio.create_task(watch()))

    def _read(self, handle, replica: str) -> None:
        task = self.readers.get(replica)
        if task is None or task.done():
            self.readers[replica] = self._keep(asyncio.create_task(self._reader(handle, replica)))

    def _keep(self, task: asyncio.Task) -> asyncio.Task:
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _reader(self, handle, replica: str) -> None:
        own_request_identity()  # not the HTTP request's: that one ending must not cancel the channel
        try:
            while True:
                stream = handle.options(stream=True).channel.remote(self.id, replica, cost={"replica": replica})
                async for raw in stream:
                    for d in unpack_list(raw, Delta):
                        q = self.queues.get(d.request_id)
                        # else the choice is gone (cancelled, failed); a resumed one takes no late delta from a
                        # rank it left (until its new call is taken, its rank is not known: then all go to it)
                        if q is not None and self.replica_of.get(d.request_id, replica) == replica:
                            q.put_nowait(d)
                if not any(r == replica for r in self.replica_of.values()):
                    return  # the rank closed an idle channel; the next request here opens it again
        except Exception as e:  # noqa: BLE001 - the rank is gone: every choice it held resumes elsewhere
            log.warning("channel from rank replica %s failed: %r", replica, e)
            for rid, r in list(self.replica_of.items()):
                if r == replica:
                    self.queues[rid].put_nowait(e)
        finally:
            if self.readers.get(replica) is asyncio.current_task():
                del self.readers[replica]
