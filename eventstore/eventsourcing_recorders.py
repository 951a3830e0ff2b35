"""The ``eventsourcing`` (9.5) library's recorders on ucloud's own event store.

With these, an ``eventsourcing`` Application, ProcessApplication or System keeps its
events in our log (etcd, SQLite or memory) instead of the library's own tables::

    PERSISTENCE_MODULE=ucloud.eventstore.eventsourcing_recorders
    UCLOUD_STORE_URL=etcd://10.0.0.1:2379,10.0.0.2:2379/apps/bank?max_txn_ops=4096
    UCLOUD_STORE_TIMEOUT=60        # optional: seconds a blocking call waits (default 60)

Like every eventsourcing setting, the keys may carry the application's name
(``BANKACCOUNTS_UCLOUD_STORE_URL``); as with the library's own modules, give each
application of a System its own log (etcd prefix or SQLite file).

The library is synchronous and our store is asyncio: ``BlockingEventStore`` runs the
store on its own event loop in a background thread and hands each call over with
``asyncio.run_coroutine_threadsafe``, so any number of the library's threads share one
store, one connection and one group committer.

How the library's records map onto ours:

    StoredEvent.originator_id   stream: a UUID is ``es-<uuid>``; a str that is a valid
                                stream name of another kind is the stream name itself
                                (so "vm-1" reads our domain stream "vm-1"); any other str
                                is escaped into ``es=-<escaped>``. Reading maps back.
    originator_version          our stream version, shifted by the stream's first
                                version: the library writes streams from 1 (aggregates)
                                or from 0 (its own tests, INITIAL_VERSION = 0). The
                                library's version is also kept in each event's
                                ``metadata``, so records read back without a lookup.
    topic, state                NewEvent.type, NewEvent.data (the store never looks inside)
    notification id             our global position (gap-free, so ids are contiguous)
    Tracking(app, id)           our Tracking(consumer=app, position=id), atomic with events
    snapshots                   our snapshot store (the newest snapshot per stream only)

Where our store is stricter than the library's SQL recorders: the versions written to
one stream must be contiguous (the library only demands uniqueness), so a gap is
refused with NotSupportedError. Versions already recorded give IntegrityError, as in
the library. Errors: StreamConflict/TrackingConflict -> IntegrityError,
UnavailableError -> OperationalError, InvalidAppend -> ProgrammingError, other
DataError -> DataError.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import string
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, ParamSpec, TypeVar
from uuid import UUID

import msgspec
from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    DatabaseError,
    DataError,
    InfrastructureFactory,
    InfrastructureFactoryError,
    IntegrityError,
    ListenNotifySubscription,
    Notification,
    NotSupportedError,
    OperationalError,
    ProcessRecorder,
    ProgrammingError,
    Recorder,
    StoredEvent,
    Subscription,
    Tracking,
    TrackingRecorder,
)
from eventsourcing.utils import Environment, EnvType, resolve_topic

from . import errors as store_errors
from .interface import EventStore
from .records import _STREAM_NAME, EventRecord, NewEvent, Snapshot, StreamAppend, stream_kind
from .records import Tracking as StoreTracking
from .url import InvalidStoreUrl, StoreLocation, open_store, parse_store_url

T = TypeVar("T")
P = ParamSpec("P")

DEFAULT_TIMEOUT = 60.0

# -- the blocking bridge ------------------------------------------------------------


@contextlib.contextmanager
def translated_errors() -> Iterator[None]:
    """Re-raise our store's errors as the library's (PEP 249 style) persistence errors."""
    try:
        yield
    except store_errors.ConflictError as error:
        raise IntegrityError(str(error)) from error
    except store_errors.UnavailableError as error:
        raise OperationalError(str(error)) from error
    except store_errors.InvalidAppend as error:
        raise ProgrammingError(str(error)) from error
    except store_errors.DataError as error:
        raise DataError(str(error)) from error
    except store_errors.EventStoreError as error:
        raise DatabaseError(str(error)) from error


class BlockingEventStore:
    """An async EventStore on its own event loop thread, with blocking calls.

    ``open_store`` is called on that thread, so a backend that binds to the running
    loop (grpc channels, asyncio conditions) is bound to the right one.
    """

    def __init__(self, open_store: Callable[[], EventStore], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="ucloud-eventstore-loop", daemon=True)
        self._lock = threading.Lock()
        self._closed = False
        self._thread.start()

        async def construct() -> EventStore:
            return open_store()

        try:
            self.store: EventStore = self.run_raw(construct)
        except BaseException:
            self._stop_loop()
            raise

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def submit(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Start ``fn(*args, **kwargs)`` on the store's loop; return its future."""
        with self._lock:
            if self._closed:
                raise ProgrammingError("the event store is closed")
            return asyncio.run_coroutine_threadsafe(_awaited(fn, *args, **kwargs), self._loop)

    def run_raw(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on the store's loop and wait; our store's own errors pass through."""
        if threading.get_ident() == self._thread.ident:
            raise ProgrammingError("a blocking event store call from the store's own loop would deadlock")
        future = self.submit(fn, *args, **kwargs)
        try:
            return future.result(self.timeout)
        except TimeoutError:
            future.cancel()
            raise store_errors.UnavailableError(
                f"the event store did not answer within {self.timeout}s (an append may or may not have been written)"
            ) from None

    def run(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on the store's loop and wait; errors become the library's."""
        with translated_errors():
            return self.run_raw(fn, *args, **kwargs)

    def close(self) -> None:
        """Close the store and stop its loop. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if hasattr(self, "store"):
                future = asyncio.run_coroutine_threadsafe(self.store.close(), self._loop)
                with contextlib.suppress(Exception):
                    future.result(self.timeout)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._closed = True

        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(cancel_the_rest(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()


async def _awaited(fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
    # The awaitable is created on the loop thread, never in the caller's.
    return await fn(*args, **kwargs)


# -- names ----------------------------------------------------------------------------

UUID_KIND = "es"
TEXT_KIND = "es="
_RESERVED_KINDS = frozenset({UUID_KIND, TEXT_KIND})
_SAFE = frozenset(string.ascii_letters + string.digits + "_.:@+-")
_ESCAPED = re.compile(rb"=([0-9A-F]{2})")
_MAX_NAME = 200


def _escape(text: str) -> str:
    return "".join(c if c in _SAFE else "".join(f"={b:02X}" for b in c.encode("utf-8", "surrogatepass")) for c in text)


def _unescape(text: str) -> str:
    return _ESCAPED.sub(lambda m: bytes([int(m.group(1), 16)]), text.encode()).decode("utf-8", "surrogatepass")


def _text_name(text: str, what: str) -> str:
    if _STREAM_NAME.fullmatch(text) and stream_kind(text) not in _RESERVED_KINDS:
        return text
    name = f"{TEXT_KIND}-{_escape(text)}"
    if len(name) > _MAX_NAME:
        raise DataError(
            f"{what} {text[:60]!r}... is too long: escaped it takes {len(name)} of at most "
            f"{_MAX_NAME} characters of a stream or consumer name"
        )
    return name


def stream_for(originator_id: UUID | str) -> str:
    """The stream that holds the events of ``originator_id`` (an injective mapping)."""
    if isinstance(originator_id, UUID):
        return f"{UUID_KIND}-{originator_id}"
    if isinstance(originator_id, str):
        return _text_name(originator_id, "originator_id")
    raise ProgrammingError(f"originator_id must be a UUID or a str, got {type(originator_id).__name__}")


def originator_of(stream: str) -> UUID | str:
    """The originator_id of a stream; a stream not written here reads as its own name."""
    kind, _, rest = stream.partition("-")
    if kind == UUID_KIND:
        with contextlib.suppress(ValueError):
            uuid = UUID(rest)
            if str(uuid) == rest:
                return uuid
    elif kind == TEXT_KIND:
        return _unescape(rest)
    return stream


def consumer_for(application_name: str) -> str:
    if not isinstance(application_name, str) or not application_name:
        raise ProgrammingError(f"application_name must be a non-empty str, got {application_name!r}")
    return _text_name(application_name, "application_name")


# -- versions -------------------------------------------------------------------------


class _Meta(msgspec.Struct, frozen=True):
    originator_version: int


_META_ENCODER = msgspec.json.Encoder()
_META_DECODER = msgspec.json.Decoder(_Meta)


def _metadata(originator_version: int) -> bytes:
    return _META_ENCODER.encode(_Meta(originator_version))


def originator_version_of(record: EventRecord) -> int:
    """The library's version of a record: kept in metadata; else (a stream not written
    through these recorders) our own version."""
    if record.metadata:
        with contextlib.suppress(msgspec.DecodeError):
            return _META_DECODER.decode(record.metadata).originator_version
    return record.version


class _Group:
    """The events of one originator in one insert, in version order."""

    __slots__ = ("originator_id", "stream", "items")

    def __init__(self, originator_id: UUID | str, stream: str) -> None:
        self.originator_id = originator_id
        self.stream = stream
        self.items: list[tuple[int, StoredEvent]] = []  # (index in the insert, event)

    @property
    def first(self) -> int:
        return self.items[0][1].originator_version

    @property
    def last(self) -> int:
        return self.items[-1][1].originator_version


def _group(stored_events: Sequence[StoredEvent]) -> list[_Group]:
    groups: dict[str, _Group] = {}
    for index, event in enumerate(stored_events):
        if not isinstance(event, StoredEvent):
            raise ProgrammingError(f"insert_events takes StoredEvent objects, got {type(event).__name__}")
        version = event.originator_version
        if not isinstance(version, int) or isinstance(version, bool):
            raise ProgrammingError(f"originator_version must be an int, got {version!r}")
        if not isinstance(event.state, bytes):
            raise ProgrammingError(f"state must be bytes, got {type(event.state).__name__}")
        if not isinstance(event.topic, str) or not event.topic:
            raise ProgrammingError(f"topic must be a non-empty str, got {event.topic!r}")
        stream = stream_for(event.originator_id)
        group = groups.get(stream)
        if group is None:
            group = groups[stream] = _Group(event.originator_id, stream)
        group.items.append((index, event))
    for group in groups.values():
        group.items.sort(key=lambda item: item[1].originator_version)
        versions = [event.originator_version for _, event in group.items]
        if len(set(versions)) < len(versions):
            duplicate = next(v for v, w in zip(versions, versions[1:], strict=False) if v == w)
            raise IntegrityError(f"version {duplicate} of {group.originator_id!r} appears twice in one insert")
        for previous, version in zip(versions, versions[1:], strict=False):
            if version != previous + 1:
                raise NotSupportedError(
                    f"versions of {group.originator_id!r} in one insert must be contiguous: "
                    f"{previous} is followed by {version} (this store keeps gap-free streams)"
                )
    return list(groups.values())


# -- recorders --------------------------------------------------------------------------


class UcloudRecorder(Recorder):
    """What every recorder here shares: the store and each stream's version offset.

    A stream's offset (library version minus our version) is fixed by its first event
    and never changes, so it is cached once seen.
    """

    def __init__(self, store: BlockingEventStore) -> None:
        if not isinstance(store, BlockingEventStore):
            raise ProgrammingError(f"a recorder needs a BlockingEventStore, got {type(store).__name__}")
        self.store = store
        self._offsets: dict[str, int] = {}
        self._offsets_lock = threading.Lock()

    def _offset(self, stream: str) -> int | None:
        """Library version minus our version for ``stream``; None while it has no events."""
        with self._offsets_lock:
            offset = self._offsets.get(stream)
        if offset is not None:
            return offset
        first = self.store.run(self.store.store.read_stream, stream, limit=1)
        if not first:
            return None
        offset = originator_version_of(first[0]) - first[0].version
        self._remember_offset(stream, offset)
        return offset

    def _remember_offset(self, stream: str, offset: int) -> None:
        with self._offsets_lock:
            if len(self._offsets) >= 100_000:  # bound the cache; it refills on demand
                self._offsets.clear()
            self._offsets[stream] = offset


class UcloudAggregateRecorder(UcloudRecorder, AggregateRecorder):
    """Stored events in per-originator streams of our log."""

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        self._refuse_tracking(kwargs)
        self._insert(stored_events, None)
        return None

    def _refuse_tracking(self, kwargs: dict[str, Any]) -> None:
        if kwargs.get("tracking") is not None:
            raise ProgrammingError(
                f"{type(self).__name__} cannot record tracking; use a process recorder, which "
                "records it atomically with the events"
            )

    def _insert(self, stored_events: Sequence[StoredEvent], tracking: Tracking | None) -> list[int]:
        groups = _group(stored_events)
        our_tracking = None
        if tracking is not None:
            our_tracking = StoreTracking(consumer_for(tracking.application_name), tracking.notification_id)
        if not groups and our_tracking is None:
            return []
        while True:
            appends, new_streams = self._plan(groups)
            try:
                positions = self.store.run_raw(self.store.store.append, *appends, tracking=our_tracking)
            except store_errors.StreamConflict as conflict:
                if conflict.stream in new_streams:
                    # Another writer started the stream meanwhile: plan again with its
                    # offset, which is known now (so this repeats at most once a stream).
                    continue
                raise self._explain(conflict, groups) from conflict
            except store_errors.EventStoreError:
                with translated_errors():
                    raise
            break
        for group in groups:
            if group.stream in new_streams:
                self._remember_offset(group.stream, group.first - 1)
        ids = [0] * len(stored_events)
        flat = iter(positions)
        for group in groups:
            for index, _ in group.items:
                ids[index] = next(flat)
        return ids

    def _plan(self, groups: list[_Group]) -> tuple[list[StreamAppend], set[str]]:
        """One StreamAppend per originator; also the streams that were empty."""
        appends = []
        new_streams = set()
        for group in groups:
            offset = self._offset(group.stream)
            if offset is None:
                expected = 0
                new_streams.add(group.stream)
            else:
                expected = group.first - offset - 1
                if expected < 0:
                    raise NotSupportedError(
                        f"the stream of {group.originator_id!r} starts at version {offset + 1}; "
                        f"version {group.first} cannot be inserted before it"
                    )
            events = [
                NewEvent(type=event.topic, data=event.state, metadata=_metadata(event.originator_version))
                for _, event in group.items
            ]
            appends.append(StreamAppend(group.stream, expected, events))
        return appends, new_streams

    def _explain(self, conflict: store_errors.StreamConflict, groups: list[_Group]) -> Exception:
        """Turn our stream conflict into IntegrityError (a version is taken) or
        NotSupportedError (the insert would leave a gap), in the library's versions."""
        group = next((g for g in groups if g.stream == conflict.stream), None)
        if group is None:  # cannot happen: every stream of the append came from a group
            return IntegrityError(str(conflict))
        actual = conflict.actual
        if actual is None:
            actual = self.store.run(self.store.store.stream_version, group.stream)
        offset = self._offset(group.stream)
        if actual > conflict.expected or offset is None:
            last = "none" if offset is None else actual + offset
            return IntegrityError(
                f"cannot record versions {group.first}..{group.last} of {group.originator_id!r}: "
                f"version {group.first} is already recorded (last recorded version: {last})"
            )
        return NotSupportedError(
            f"cannot record versions {group.first}..{group.last} of {group.originator_id!r}: its last "
            f"version is {actual + offset}, and this store keeps gap-free streams"
        )

    def select_events(
        self,
        originator_id: UUID | str,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Sequence[StoredEvent]:
        stream = stream_for(originator_id)
        if limit is not None and limit <= 0:
            return []
        after, up_to = 0, None
        if gt is not None or lte is not None:
            offset = self._offset(stream)
            if offset is None:
                return []
            after = 0 if gt is None else max(0, gt - offset)
            up_to = None if lte is None else lte - offset
            if up_to is not None and up_to <= after:
                return []
        records = self.store.run(
            self.store.store.read_stream, stream, after_version=after, up_to_version=up_to, limit=limit, backwards=desc
        )
        return [
            StoredEvent(
                originator_id=originator_id,
                originator_version=originator_version_of(record),
                topic=record.type,
                state=record.data,
            )
            for record in records
        ]


class UcloudApplicationRecorder(UcloudAggregateRecorder, ApplicationRecorder):
    """Stored events plus the application sequence: our global log order."""

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        self._refuse_tracking(kwargs)
        return self._insert(stored_events, None)

    def select_notifications(
        self,
        start: int | None,
        limit: int,
        stop: int | None = None,
        topics: Sequence[str] = (),
        *,
        inclusive_of_start: bool = True,
    ) -> Sequence[Notification]:
        if limit <= 0:
            return []
        if start is None:
            after = 0
        else:
            after = max(0, start - 1 if inclusive_of_start else start)
        up_to = stop
        if not topics:
            # Positions are gap-free: the next ``limit`` events are the next ``limit``
            # positions, so the store need not read further than that.
            up_to = after + limit if stop is None else min(stop, after + limit)
        if up_to is not None and up_to <= after:
            return []
        records = self.store.run(
            self.store.store.read_all, after, up_to=up_to, limit=limit, types=set(topics) if topics else None
        )
        return [
            Notification(
                id=record.position,
                originator_id=originator_of(record.stream),
                originator_version=originator_version_of(record),
                topic=record.type,
                state=record.data,
            )
            for record in records
        ]

    def max_notification_id(self) -> int | None:
        return self.store.run(self.store.store.head) or None

    def subscribe(self, gt: int | None = None, topics: Sequence[str] = ()) -> Subscription[ApplicationRecorder]:
        return UcloudSubscription(self, gt=gt, topics=topics)


class UcloudSubscription(ListenNotifySubscription[UcloudApplicationRecorder]):
    """The library's pull thread reads by notification id; a task on the store's loop
    waits for the head to move (etcd watch, SQLite poll/notify) and wakes it."""

    def __init__(
        self, recorder: UcloudApplicationRecorder, gt: int | None = None, topics: Sequence[str] = ()
    ) -> None:
        self._follower: Future[None] | None = None
        self._follower_lock = threading.Lock()
        super().__init__(recorder=recorder, gt=gt, topics=topics)
        with self._follower_lock:
            if not self._has_been_stopped:
                self._follower = recorder.store.submit(self._follow, gt or 0)

    async def _follow(self, after: int) -> None:
        store = self._recorder.store.store
        known = after
        delay = 0.05
        while True:
            try:
                head = await store.wait_for_events(known, 5.0)
            except store_errors.EventStoreError:
                # Let the pull thread meet the error (it surfaces from __next__); retry.
                self._has_been_notified.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            delay = 0.05
            if head > known:
                known = head
                self._has_been_notified.set()

    def stop(self) -> None:
        super().stop()
        with self._follower_lock:
            if self._follower is not None:
                self._follower.cancel()


class UcloudTrackingRecorder(UcloudRecorder, TrackingRecorder):
    """Tracking records: a consumer's position, only ever moving forward."""

    def insert_tracking(self, tracking: Tracking) -> None:
        position = StoreTracking(consumer_for(tracking.application_name), tracking.notification_id)
        self.store.run(self.store.store.append, tracking=position)

    def max_tracking_id(self, application_name: str) -> int | None:
        return self.store.run(self.store.store.tracked_position, consumer_for(application_name)) or None


class UcloudProcessRecorder(UcloudTrackingRecorder, UcloudApplicationRecorder, ProcessRecorder):
    """Events and tracking in one atomic append: exactly-once process applications."""

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        return self._insert(stored_events, kwargs.get("tracking"))


class UcloudSnapshotRecorder(UcloudRecorder, AggregateRecorder):
    """Snapshots in our snapshot store, which keeps the newest snapshot of a stream.

    So ``select_events(lte=v)`` finds a snapshot only when the newest is at or before
    ``v``; the library then replays from the events, which is correct, only slower.
    Our snapshot's version is our stream version, like every snapshot in the store.
    """

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        if kwargs.get("tracking") is not None:
            raise ProgrammingError("snapshots are not recorded with tracking")
        for group in _group(stored_events):
            offset = self._offset(group.stream)
            if offset is None:
                raise ProgrammingError(f"cannot snapshot {group.originator_id!r}: it has no events")
            _, event = group.items[-1]  # the newest wins anyway
            snapshot = Snapshot(
                stream=group.stream, version=event.originator_version - offset, type=event.topic, state=event.state
            )
            self.store.run(self.store.store.save_snapshot, snapshot)
        return None

    def select_events(
        self,
        originator_id: UUID | str,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Sequence[StoredEvent]:
        stream = stream_for(originator_id)
        if limit is not None and limit <= 0:
            return []
        snapshot = self.store.run(self.store.store.load_snapshot, stream)
        if snapshot is None:
            return []
        offset = self._offset(stream) or 0
        version = snapshot.version + offset
        if (gt is not None and version <= gt) or (lte is not None and version > lte):
            return []
        return [StoredEvent(originator_id=originator_id, originator_version=version, topic=snapshot.type,
                            state=snapshot.state)]


# -- the factory ------------------------------------------------------------------------


class UcloudFactory(InfrastructureFactory[UcloudTrackingRecorder]):
    """Found by ``InfrastructureFactory.construct`` through PERSISTENCE_MODULE."""

    STORE_URL = "UCLOUD_STORE_URL"
    STORE_TIMEOUT = "UCLOUD_STORE_TIMEOUT"

    aggregate_recorder_class: type[UcloudAggregateRecorder] = UcloudAggregateRecorder
    snapshot_recorder_class: type[UcloudSnapshotRecorder] = UcloudSnapshotRecorder
    application_recorder_class: type[UcloudApplicationRecorder] = UcloudApplicationRecorder
    tracking_recorder_class: type[UcloudTrackingRecorder] = UcloudTrackingRecorder
    process_recorder_class: type[UcloudProcessRecorder] = UcloudProcessRecorder

    def __init__(self, env: Environment | EnvType | None) -> None:
        super().__init__(env)
        url = (self.env.get(self.STORE_URL) or "").strip()
        if not url:
            raise OSError(
                "ucloud store URL not found in the environment: set one of "
                f"{', '.join(self.env.create_keys(self.STORE_URL))} "
                "(e.g. sqlite:///var/lib/app.sqlite or etcd://127.0.0.1:2379/app)"
            )
        try:
            self.location: StoreLocation = parse_store_url(url)
        except InvalidStoreUrl as error:
            raise OSError(f"{self.STORE_URL}: {error}") from None
        timeout_text = (self.env.get(self.STORE_TIMEOUT) or "").strip()
        try:
            self.timeout = float(timeout_text) if timeout_text else DEFAULT_TIMEOUT
            if not self.timeout > 0:
                raise ValueError
        except ValueError:
            raise OSError(
                f"{self.STORE_TIMEOUT} must be a positive number of seconds, got {timeout_text!r}"
            ) from None
        self._store: BlockingEventStore | None = None
        self._store_lock = threading.Lock()

    def event_store_bridge(self) -> BlockingEventStore:
        """The one store every recorder of this factory shares, opened on first use."""
        with self._store_lock:
            if self._store is None:
                location = self.location
                self._store = BlockingEventStore(lambda: open_store(location), timeout=self.timeout)
            return self._store

    def aggregate_recorder(self, purpose: str = "events") -> AggregateRecorder:
        if purpose == "events":
            return self.aggregate_recorder_class(self.event_store_bridge())
        if purpose == "snapshots":
            return self.snapshot_recorder_class(self.event_store_bridge())
        raise InfrastructureFactoryError(
            f"no aggregate recorder for purpose {purpose!r}: expected 'events' or 'snapshots'"
        )

    def application_recorder(self) -> ApplicationRecorder:
        cls = self._recorder_class(self.APPLICATION_RECORDER_TOPIC, self.application_recorder_class)
        return cls(self.event_store_bridge())

    def tracking_recorder(
        self, tracking_recorder_class: type[UcloudTrackingRecorder] | None = None
    ) -> UcloudTrackingRecorder:
        if tracking_recorder_class is None:
            tracking_recorder_class = self._recorder_class(self.TRACKING_RECORDER_TOPIC, self.tracking_recorder_class)
        elif not (isinstance(tracking_recorder_class, type) and issubclass(tracking_recorder_class, UcloudTrackingRecorder)):
            raise InfrastructureFactoryError(
                f"tracking recorder class {tracking_recorder_class!r} is not a UcloudTrackingRecorder"
            )
        return tracking_recorder_class(self.event_store_bridge())

    def process_recorder(self) -> ProcessRecorder:
        cls = self._recorder_class(self.PROCESS_RECORDER_TOPIC, self.process_recorder_class)
        return cls(self.event_store_bridge())

    def _recorder_class(self, key: str, default: type[T]) -> type[T]:
        topic = self.env.get(key)
        if not topic:
            return default
        cls = resolve_topic(topic)
        if not (isinstance(cls, type) and issubclass(cls, default)):
            raise InfrastructureFactoryError(f"{key}={topic!r} is not a subclass of {default.__name__}")
        return cls

    def close(self) -> None:
        with self._store_lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()


Factory = UcloudFactory
