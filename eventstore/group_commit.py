"""Group commit: concurrent appends share one backend transaction.

Each request keeps its own atomicity and concurrency check; the backend's
``commit_batch`` decides every request's outcome and commits all the successful
ones together. There is no artificial delay: while one transaction is in flight the
next requests queue up, and the next transaction takes them all (up to the limits).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from .errors import InvalidAppend, UnavailableError
from .records import StreamAppend, Tracking


class PendingAppend:
    """One caller's request. ``deadline`` (loop time) is when its caller stops waiting;
    a backend that retries an unconfirmed write gives up on the request then. ``token``
    (requests with tracking only) is unique to this request, for a backend to recognise
    its own earlier write. ``taken``: a batch has taken it, so it may be written."""

    __slots__ = ("appends", "tracking", "future", "cost", "size", "deadline", "token", "timer", "taken")

    def __init__(self, appends: Sequence[StreamAppend], tracking: Tracking | None, size: int, cost: int,
                 deadline: float | None = None):
        self.appends = appends
        self.tracking = tracking
        self.future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self.cost = cost
        self.size = size
        self.deadline = deadline
        self.token = _new_token() if tracking is not None else b""
        self.timer: asyncio.TimerHandle | None = None
        self.taken = False

    def resolve(self, outcome: list[int] | BaseException) -> None:
        if self.future.done():
            return
        if self.timer is not None:
            self.timer.cancel()
        if isinstance(outcome, BaseException):
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)


_TOKEN_PREFIX = os.urandom(8)
_token_counter = itertools.count()


def _new_token() -> bytes:
    """Unique across processes (random prefix) and cheap (a counter, not a uuid4)."""
    return _TOKEN_PREFIX + next(_token_counter).to_bytes(8, "big")


CommitBatch = Callable[[list[PendingAppend]], Awaitable[None]]


class GroupCommitter:
    def __init__(
        self,
        commit_batch: CommitBatch,
        *,
        max_cost: int,
        max_bytes: int,
        max_requests: int = 256,
        timeout: float | None = None,
    ) -> None:
        self._commit_batch = commit_batch
        self.timeout = timeout
        self.max_cost = max_cost
        self.max_bytes = max_bytes
        self.max_requests = max_requests
        self._queue: deque[PendingAppend] = deque()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self.batches = 0  # for benchmarks: how many transactions served how many requests
        self.requests = 0

    async def submit(self, appends: Sequence[StreamAppend], tracking: Tracking | None, cost: int) -> list[int]:
        """Queue a request; ``cost`` is its share of the backend's per-transaction limit
        (events for SQLite, operations for etcd)."""
        if self._closed:
            raise UnavailableError("the event store is closed")
        # Envelope, keys and index entry: ~200 bytes besides the payload and the stream
        # name, which the etcd backend writes twice per event.
        size = sum(len(e.data) + len(e.metadata) + 200 + 2 * len(a.stream) for a in appends for e in a.events)
        if cost > self.max_cost or size > self.max_bytes:
            events = sum(len(a.events) for a in appends)
            raise InvalidAppend(
                f"an append of {events} events (~{size} bytes) does not fit in one transaction "
                f"(at most {self.max_cost} operations and {self.max_bytes} bytes)"
            )
        loop = asyncio.get_running_loop()
        pending = PendingAppend(appends, tracking, size, cost)
        if self.timeout is not None:
            # One timer per request, not wait_for + shield: group commit exists for
            # throughput, and those cost two futures and a task wake-up per append.
            pending.deadline = loop.time() + self.timeout
            pending.timer = loop.call_at(pending.deadline, self._expire, pending)
        self._queue.append(pending)
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._drain())
        # A cancelled caller cancels only its own wait: a request no batch has taken yet
        # is then skipped; one in flight is written or not, consistently.
        return await pending.future

    def _expire(self, pending: PendingAppend) -> None:
        if pending.taken:
            pending.resolve(UnavailableError(
                f"append not confirmed within {self.timeout}s; it may or may not have been "
                "written (retry the same request: its event ids make the retry safe)"))
        else:
            # No batch took it, and none will (done requests are skipped).
            pending.resolve(UnavailableError(
                f"append not attempted: the backend did not take it within {self.timeout}s "
                "(nothing was written)"))

    def _next_batch(self) -> list[PendingAppend]:
        batch: list[PendingAppend] = []
        deferred: list[PendingAppend] = []
        streams: set[str] = set()
        consumers: set[str] = set()
        cost = size = 0
        while self._queue and len(batch) < self.max_requests:
            request = self._queue.popleft()
            if request.future.done():
                continue  # its caller gave up or was cancelled before any write
            names = {a.stream for a in request.appends}
            consumer = request.tracking.consumer if request.tracking else None
            if names & streams or (consumer is not None and consumer in consumers):
                # Same stream twice in one transaction: the later request must see the
                # earlier one's outcome first, so it waits for the next batch.
                deferred.append(request)
                continue
            if batch and (cost + request.cost > self.max_cost or size + request.size > self.max_bytes):
                deferred.append(request)
                break
            batch.append(request)
            request.taken = True
            streams |= names
            if consumer is not None:
                consumers.add(consumer)
            cost += request.cost
            size += request.size
        self._queue.extendleft(reversed(deferred))
        return batch

    async def _drain(self) -> None:
        while self._queue:
            batch = self._next_batch()
            if not batch:
                continue
            self.batches += 1
            self.requests += len(batch)
            try:
                await self._commit_batch(batch)
            except BaseException as error:
                for request in batch:
                    request.resolve(error if isinstance(error, Exception) else UnavailableError("append interrupted"))
                if not isinstance(error, Exception):
                    raise
            for request in batch:
                request.resolve(UnavailableError("append was not decided by the backend"))

    async def close(self) -> None:
        self._closed = True
        if self._writer is not None and not self._writer.done():
            try:
                async with asyncio.timeout(10):
                    await asyncio.shield(self._writer)
            except (TimeoutError, asyncio.CancelledError):
                self._writer.cancel()

