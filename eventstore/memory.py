"""In-memory backend: the reference semantics, for unit tests and the hypothesis model."""

from __future__ import annotations

import bisect
from collections.abc import Collection

from .errors import StreamConflict, TrackingConflict
from .interface import EventStore
from .notify import Notifier
from .records import (
    EventRecord,
    Snapshot,
    StreamAppend,
    Tracking,
    slice_entries,
    to_record,
    utcnow,
    validate_append,
)


class MemoryEventStore(EventStore):
    def __init__(self) -> None:
        self._log: list[EventRecord] = []
        self._streams: dict[str, list[EventRecord]] = {}
        self._tracking: dict[str, int] = {}
        self._snapshots: dict[str, Snapshot] = {}
        self._appended = Notifier()
        self._slices: dict[str, list[EventRecord]] = {}
        self._slices_from: int | None = None

    async def append(self, *appends: StreamAppend, tracking: Tracking | None = None) -> list[int]:
        validate_append(appends, tracking)
        # Check everything first: a request is all or nothing.
        for append in appends:
            actual = len(self._streams.get(append.stream, ()))
            if actual != append.expected_version:
                raise StreamConflict(append.stream, append.expected_version, actual)
        if tracking is not None:
            recorded = self._tracking.get(tracking.consumer, 0)
            if tracking.position <= recorded:
                raise TrackingConflict(tracking.consumer, tracking.position, recorded)
        now = utcnow()
        positions = []
        if self._slices_from is None and slice_entries(appends):
            self._slices_from = len(self._log)
        for append in appends:
            stream = self._streams.setdefault(append.stream, [])
            for event in append.events:
                record = to_record(event, append.stream, len(stream) + 1, len(self._log) + 1, now)
                stream.append(record)
                self._log.append(record)
                positions.append(record.position)
                for name in event.slices:
                    self._slices.setdefault(name, []).append(record)
        if tracking is not None:
            self._tracking[tracking.consumer] = tracking.position
        self._appended.notify()
        return positions

    async def read_stream(
        self,
        stream: str,
        *,
        after_version: int = 0,
        up_to_version: int | None = None,
        limit: int | None = None,
        backwards: bool = False,
    ) -> list[EventRecord]:
        records = self._streams.get(stream, [])
        upper = len(records) if up_to_version is None else min(up_to_version, len(records))
        selected = records[after_version:upper] if after_version < upper else []
        if backwards:
            selected = selected[::-1]
        return selected[:limit] if limit is not None else list(selected)

    async def stream_version(self, stream: str) -> int:
        return len(self._streams.get(stream, ()))

    async def read_all(
        self,
        after: int = 0,
        *,
        up_to: int | None = None,
        limit: int | None = None,
        types: Collection[str] | None = None,
    ) -> list[EventRecord]:
        upper = len(self._log) if up_to is None else min(up_to, len(self._log))
        selected = self._log[after:upper] if after < upper else []
        if types is not None:
            wanted = set(types)
            selected = [r for r in selected if r.type in wanted]
        return selected[:limit] if limit is not None else list(selected)

    async def read_slice(self, slice: str, after: int = 0, *, up_to: int | None = None,
                         limit: int | None = None) -> list[EventRecord]:
        records = self._slices.get(slice, [])
        start = bisect.bisect_right(records, after, key=lambda r: r.position)
        end = len(records) if up_to is None else bisect.bisect_right(records, up_to, key=lambda r: r.position)
        selected = records[start:end]
        return selected[:limit] if limit is not None else selected

    async def slices_from(self) -> int | None:
        return self._slices_from

    async def head(self) -> int:
        return len(self._log)

    async def wait_for_events(self, after: int, timeout: float) -> int:
        await self._appended.wait_until(lambda: len(self._log) > after, timeout)
        return len(self._log)

    async def tracked_position(self, consumer: str) -> int:
        return self._tracking.get(consumer, 0)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        current = self._snapshots.get(snapshot.stream)
        if current is None or current.version < snapshot.version:
            self._snapshots[snapshot.stream] = snapshot

    async def load_snapshot(self, stream: str) -> Snapshot | None:
        return self._snapshots.get(stream)

    async def close(self) -> None:
        pass
