"""The event store port. Every backend passes tests/contract/test_eventstore_contract.py."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Collection

from .records import EventRecord, Snapshot, StreamAppend, Tracking


class EventStore(abc.ABC):
    """One log: streams with optimistic concurrency, one gap-free global order.

    Positions start at 1 and have no gaps; stream versions start at 1 and have no gaps.
    """

    @abc.abstractmethod
    async def append(
        self, *appends: StreamAppend, tracking: Tracking | None = None
    ) -> list[int]:
        """Append atomically to one or more streams, optionally recording a consumer's
        position in the same transaction (exactly-once effects).

        Returns the global positions of the appended events, in order. Raises
        StreamConflict if a stream is not at its expected version, TrackingConflict if
        ``tracking`` is not ahead of the consumer's recorded position; in both cases
        nothing of the request was written.
        """

    @abc.abstractmethod
    async def read_stream(
        self,
        stream: str,
        *,
        after_version: int = 0,
        up_to_version: int | None = None,
        limit: int | None = None,
        backwards: bool = False,
    ) -> list[EventRecord]:
        """Events of one stream with after_version < version <= up_to_version."""

    @abc.abstractmethod
    async def stream_version(self, stream: str) -> int:
        """The stream's current version; 0 if it has no events."""

    @abc.abstractmethod
    async def read_all(
        self,
        after: int = 0,
        *,
        up_to: int | None = None,
        limit: int | None = None,
        types: Collection[str] | None = None,
    ) -> list[EventRecord]:
        """Events with after < position <= up_to, in order, optionally of some types."""

    @abc.abstractmethod
    async def read_slice(
        self,
        slice: str,
        after: int = 0,
        *,
        up_to: int | None = None,
        limit: int | None = None,
    ) -> list[EventRecord]:
        """The events indexed under ``slice`` (NewEvent.slices) with after < position <=
        up_to, in log order."""

    @abc.abstractmethod
    async def slices_from(self) -> int | None:
        """Slices are complete after this position: an event appended before the log's
        first sliced append (by code older than slices) is in no slice. None: no event
        was ever appended with slices, so slices say nothing yet. 0: a log sliced from
        its start."""

    @abc.abstractmethod
    async def head(self) -> int:
        """The position of the last event; 0 for an empty log."""

    @abc.abstractmethod
    async def wait_for_events(self, after: int, timeout: float) -> int:
        """Wait until the head is beyond ``after`` or the timeout passes; return the head."""

    @abc.abstractmethod
    async def tracked_position(self, consumer: str) -> int:
        """The last position a consumer recorded; 0 if none."""

    @abc.abstractmethod
    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Store a snapshot unless a newer one is already stored."""

    @abc.abstractmethod
    async def load_snapshot(self, stream: str) -> Snapshot | None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> EventStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def subscribe(
        self,
        after: int = 0,
        *,
        types: Collection[str] | None = None,
        slice: str | None = None,
        batch: int = 1000,
        idle_timeout: float = 5.0,
    ) -> AsyncIterator[EventRecord]:
        """Catch up from ``after``, then follow live; never misses nor repeats an event.

        Reading is by position, never by a backend's own revision, so the switch from
        catch-up to live cannot drop or duplicate anything, and it survives etcd
        compaction, restarts and reconnects: the worst a disturbance can do is delay.
        With ``slice`` only that slice's events are read (types then filter them).
        """
        position = after
        wanted = None if types is None else frozenset(types)
        while True:
            head = await self.head()
            while head <= position:
                head = await self.wait_for_events(position, idle_timeout)
            # Positions are gap-free, so a window of positions is a window of events.
            up_to = min(head, position + batch)
            if slice is None:
                records = await self.read_all(position, up_to=up_to, types=types)
            else:
                up_to = head  # a slice is sparse: read it up to the head at once
                records = await self.read_slice(slice, position, up_to=up_to)
                if wanted is not None:
                    records = [r for r in records if r.type in wanted]
            for record in records:
                yield record
            position = up_to
