"""Load aggregates, decide, append with optimistic concurrency; retry on conflict.

A command handler is a coroutine ``work(session)`` that loads what it needs through
the session and records the events it decided. ``transact`` appends everything the
work recorded in one atomic append, each stream at the version it was loaded at,
and reruns the work from fresh state when another writer got there first. Retries
live here and nowhere else.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from uuid import UUID

import msgspec

from ucloud.domain.errors import DomainError
from ucloud.domain.events import Event, EventCodec
from ucloud.eventstore.errors import ConflictError, StreamConflict
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.records import NewEvent, Snapshot, StreamAppend, Tracking

S = TypeVar("S")
T = TypeVar("T")

SNAPSHOT_EVERY = 50


@dataclass(frozen=True)
class AggregateType(Generic[S]):
    """How one kind of aggregate is named, folded and snapshotted."""

    kind: str
    state_type: type[S]
    evolve: Callable[[S | None, Event], S | None]
    stream_of: Callable[[Any], str]  # an id (a UUID; a claimed value's name for IPAM claims)
    snapshot_schema: int = 1
    # The read slices a state belongs to (domain/*.slices); an event is indexed under
    # those of the state before it and after it.
    slices: Callable[[S | None], tuple[str, ...]] | None = None


@dataclass(frozen=True)
class Actor:
    """Who acts: recorded on every event as ``name@realm``."""

    name: str
    realm: str = "ucloud"
    is_admin: bool = False

    def __str__(self) -> str:
        return f"{self.name}@{self.realm}"


SYSTEM = Actor("system", "ucloud-system", is_admin=True)


@dataclass
class Loaded(Generic[S]):
    state: S | None
    version: int
    position: int


@dataclass
class Outcome(Generic[T]):
    """What a transaction did: its result, the events it appended, the last position,
    and the version each stream it appended to is at now."""

    result: T
    events: list[Event]
    position: int
    versions: dict[str, int] = field(default_factory=dict)


@dataclass
class Session:
    repository: Repository
    loaded: dict[str, Loaded[Any]] = field(default_factory=dict)
    recorded: dict[str, list[Event]] = field(default_factory=dict)
    types: dict[str, AggregateType[Any]] = field(default_factory=dict)

    async def load(self, aggregate: AggregateType[S], aggregate_id: UUID | str) -> S | None:
        stream = aggregate.stream_of(aggregate_id)
        if stream not in self.loaded:
            self.loaded[stream] = await self.repository.load(aggregate, stream)
        return self.loaded[stream].state

    def record(self, aggregate: AggregateType[S], aggregate_id: UUID | str, events: list[Event]) -> None:
        stream = aggregate.stream_of(aggregate_id)
        if stream not in self.loaded:
            raise RuntimeError(f"record() on {stream} without load(): its version is unknown")
        self.recorded.setdefault(stream, []).extend(events)
        self.types[stream] = aggregate

    def slices_of(self, stream: str) -> list[tuple[str, ...]]:
        """For each event recorded on ``stream``, the slices it is indexed under."""
        aggregate = self.types[stream]
        events = self.recorded[stream]
        if aggregate.slices is None:
            return [()] * len(events)
        state = self.loaded[stream].state
        result = []
        for event in events:
            after = aggregate.evolve(state, event)
            before_slices, after_slices = aggregate.slices(state), aggregate.slices(after)
            result.append(before_slices + tuple(s for s in after_slices if s not in before_slices))
            state = after
        return result


class Repository:
    def __init__(self, store: EventStore, codec: EventCodec) -> None:
        self.store = store
        self.codec = codec

    async def load(self, aggregate: AggregateType[S], stream: str, *, save_snapshot: bool = True) -> Loaded[S]:
        """The stream's state from its newest snapshot and the tail; a long tail is saved as
        the next snapshot unless ``save_snapshot`` is False (a reader without write access
        to the store, such as a host agent)."""
        state: S | None = None
        version = 0
        snapshot = await self.store.load_snapshot(stream)
        snapshot_type = f"{aggregate.kind}/{aggregate.snapshot_schema}"
        if snapshot is not None and snapshot.type == snapshot_type:
            state = msgspec.msgpack.decode(snapshot.state, type=aggregate.state_type)
            version = snapshot.version
        records = await self.store.read_stream(stream, after_version=version)
        position = 0
        for record in records:
            state = aggregate.evolve(state, self.codec.decode(record.type, record.schema, record.data))
            version, position = record.version, record.position
        if save_snapshot and len(records) >= SNAPSHOT_EVERY and state is not None:
            await self.store.save_snapshot(Snapshot(
                stream=stream, version=version, type=snapshot_type, state=msgspec.msgpack.encode(state)
            ))
        return Loaded(state, version, position)

    async def transact(
        self,
        work: Callable[[Session], Awaitable[T]],
        actor: Actor,
        *,
        tracking: Tracking | None = None,
        causation_id: UUID | None = None,
        correlation_id: UUID | None = None,
        attempts: int = 10,
        known: Mapping[str, Loaded[Any]] | None = None,
    ) -> Outcome[T]:
        """``known``: states the caller already holds, by stream, with their versions (a
        process manager following the log). The first attempt decides on them instead of
        reading the streams; if one is stale its append conflicts and every later attempt
        loads fresh state; a refusal (DomainError) on them is checked on fresh state too. So a
        stale view costs a retry, never a wrong decision."""
        correlation_id = correlation_id or uuid.uuid4()
        for attempt in range(attempts):
            trusting = bool(known) and attempt == 0
            session = Session(self, loaded=dict(known) if trusting and known else {})
            try:
                result = await work(session)
            except DomainError:
                if trusting and attempt + 1 < attempts:
                    continue  # refused on what may be a stale view: decide again on fresh state
                raise
            appends = []
            events: list[Event] = []
            for stream, stream_events in session.recorded.items():
                if not stream_events:
                    continue
                new_events = [self._new_event(e, actor, causation_id, correlation_id, slices)
                              for e, slices in zip(stream_events, session.slices_of(stream), strict=True)]
                appends.append(StreamAppend(stream, session.loaded[stream].version, new_events))
                events.extend(stream_events)
            if not appends and tracking is None:
                position = max((loaded.position for loaded in session.loaded.values()), default=0)
                return Outcome(result, [], position)
            try:
                positions = await self.store.append(*appends, tracking=tracking)
            except StreamConflict:
                if attempt + 1 == attempts:
                    raise
                continue  # someone else wrote first: decide again on fresh state
            versions = {a.stream: a.expected_version + len(a.events) for a in appends}
            return Outcome(result, events, positions[-1] if positions else 0, versions)
        raise ConflictError("gave up after repeated conflicts")  # pragma: no cover - loop returns or raises

    def _new_event(self, event: Event, actor: Actor, causation_id: UUID | None, correlation_id: UUID,
                   slices: tuple[str, ...] = ()) -> NewEvent:
        tag, schema, data = self.codec.encode(event)
        return NewEvent(type=tag, schema=schema, data=data, actor=str(actor),
                        causation_id=causation_id, correlation_id=correlation_id, slices=slices)
