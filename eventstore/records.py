"""What the log stores: the envelope around every event, and the shapes of requests.

The envelope travels beside the domain event, not inside it: the domain event is
``data`` (JSON bytes produced by the codec); the store knows nothing of its schema.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from uuid import UUID, uuid4

import msgspec

from .errors import InvalidAppend


def utcnow() -> datetime:
    return datetime.now(UTC)


class NewEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event about to be appended; the store assigns stream, version, position, time."""

    type: str
    data: bytes
    id: UUID = msgspec.field(default_factory=uuid4)
    schema: int = 1
    actor: str = ""
    causation_id: UUID | None = None
    correlation_id: UUID | None = None
    # Opaque bytes for an adapter's own bookkeeping beside the event (the eventsourcing
    # recorders keep the library's originator_version here); the store never reads it.
    metadata: bytes = b""
    # The read slices this event belongs to (e.g. "host-<uuid>"): the store indexes it
    # under each, atomically with the append, so a reader of a slice (a host agent) gets
    # exactly its events in log order without reading the rest of the log.
    slices: tuple[str, ...] = ()


class EventRecord(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """An event as recorded in the log. Immutable; never rewritten.

    ``gc=False``: its fields are atoms (no reference cycles are possible), and a replay
    creates millions of records; untracked, they cost the cyclic GC nothing (replay
    ~30% faster, docs/performance.md)."""

    id: UUID
    type: str
    stream: str
    version: int
    position: int
    time: datetime
    data: bytes
    schema: int = 1
    actor: str = ""
    causation_id: UUID | None = None
    correlation_id: UUID | None = None
    metadata: bytes = b""


class StreamAppend(msgspec.Struct, frozen=True):
    """Append ``events`` to ``stream``, which must be at ``expected_version`` (0: new)."""

    stream: str
    expected_version: int
    events: Sequence[NewEvent]


class Tracking(msgspec.Struct, frozen=True):
    """A consumer has processed the log up to and including ``position``."""

    consumer: str
    position: int


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """A stream's folded state at ``version``; derived, may be dropped at any time.

    The last three fields are the etcd backend's: a state larger than one etcd value is
    stored in ``chunks`` pieces beside the snapshot (which then holds no ``state``), found
    under ``generation`` and checked against ``digest`` (sha256 of the whole state).
    Callers always get the whole state back and never see them set."""

    stream: str
    version: int
    type: str
    state: bytes
    time: datetime = msgspec.field(default_factory=utcnow)
    chunks: int = 0
    generation: str = ""
    digest: str = ""


# Streams are named "<kind>-<id>" by convention. '/' is refused because the etcd
# backend keys stream versions under /v1/streams/<stream>/.
_STREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@=+-]{0,199}")  # always fullmatch: "$" lets "\n" through
_CONSUMER_NAME = _STREAM_NAME


def validate_append(appends: Sequence[StreamAppend], tracking: Tracking | None) -> int:
    """Check a request before anything touches storage; return its number of events."""
    if not appends and tracking is None:
        raise InvalidAppend("an append needs at least one stream or a tracking record")
    seen: set[str] = set()
    count = 0
    for append in appends:
        if not _STREAM_NAME.fullmatch(append.stream):
            raise InvalidAppend(
                f"stream name {append.stream!r} is invalid: use letters, digits and _.:@=+- "
                "(no '/'), at most 200 characters"
            )
        if append.stream in seen:
            raise InvalidAppend(f"stream {append.stream!r} appears twice in one append")
        seen.add(append.stream)
        if append.expected_version < 0:
            raise InvalidAppend(
                f"expected_version of stream {append.stream!r} must be >= 0, "
                f"got {append.expected_version}"
            )
        if not append.events:
            raise InvalidAppend(f"append to stream {append.stream!r} has no events")
        for event in append.events:
            if not event.type:
                raise InvalidAppend(f"an event for stream {append.stream!r} has no type")
            for name in event.slices:
                validate_slice(name)
            if len(set(event.slices)) != len(event.slices):
                raise InvalidAppend(f"an event for stream {append.stream!r} names a slice twice")
        count += len(append.events)
    if tracking is not None:
        if not _CONSUMER_NAME.fullmatch(tracking.consumer):
            raise InvalidAppend(f"consumer name {tracking.consumer!r} is invalid")
        if tracking.position < 1:
            raise InvalidAppend(f"tracking position must be >= 1, got {tracking.position}")
    return count


def validate_slice(name: str) -> None:
    if not _STREAM_NAME.fullmatch(name):
        raise InvalidAppend(
            f"slice name {name!r} is invalid: use letters, digits and _.:@=+- (no '/'), at most 200 characters")


def slice_entries(appends: Sequence[StreamAppend]) -> int:
    """How many slice index entries a request writes."""
    return sum(len(event.slices) for append in appends for event in append.events)


def stream_kind(stream: str) -> str:
    """'vm-1234' -> 'vm'."""
    return stream.split("-", 1)[0]


RECORD_ENCODER = msgspec.msgpack.Encoder()
RECORD_DECODER = msgspec.msgpack.Decoder(EventRecord)
SNAPSHOT_DECODER = msgspec.msgpack.Decoder(Snapshot)


def to_record(event: NewEvent, stream: str, version: int, position: int, time: datetime) -> EventRecord:
    return EventRecord(
        id=event.id,
        type=event.type,
        stream=stream,
        version=version,
        position=position,
        time=time,
        data=event.data,
        schema=event.schema,
        actor=event.actor,
        causation_id=event.causation_id,
        correlation_id=event.correlation_id,
        metadata=event.metadata,
    )
