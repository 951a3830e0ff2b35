"""What our eventsourcing recorders do beyond the library's own test cases: the name and
version mapping, the places where our store is stricter, error translation, the
snapshot recorder, the factory's configuration, and whole eventsourcing applications
(and a process application in a System) running on etcd and SQLite."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.application import Application, ProcessingEvent
from eventsourcing.domain import Aggregate, DomainEventProtocol, event
from eventsourcing.persistence import (
    DataError,
    InfrastructureFactory,
    InfrastructureFactoryError,
    IntegrityError,
    NotSupportedError,
    OperationalError,
    ProgrammingError,
    StoredEvent,
    Tracking,
)
from eventsourcing.system import ProcessApplication, SingleThreadedRunner, System
from eventsourcing.utils import get_topic
from hypothesis import given
from hypothesis import strategies as st

from tests.support.etcd import MAX_TXN_OPS, EtcdCluster, free_port
from ucloud.eventstore.etcd import EtcdEventStore
from ucloud.eventstore.eventsourcing_recorders import (
    BlockingEventStore,
    UcloudAggregateRecorder,
    UcloudApplicationRecorder,
    UcloudFactory,
    UcloudProcessRecorder,
    UcloudSnapshotRecorder,
    UcloudTrackingRecorder,
    originator_of,
    stream_for,
)
from ucloud.eventstore.memory import MemoryEventStore
from ucloud.eventstore.records import _STREAM_NAME, NewEvent, StreamAppend
from ucloud.eventstore.sqlite import SqliteEventStore

MODULE = "ucloud.eventstore.eventsourcing_recorders"


def stored(originator_id: UUID | str, version: int, topic: str = "topic", state: bytes = b"{}") -> StoredEvent:
    return StoredEvent(originator_id=originator_id, originator_version=version, topic=topic, state=state)


# -- names: pure ----------------------------------------------------------------------


# Up to 16 characters always fit: escaped, a character takes at most 12 ("=F0=9F=90=88").
@given(st.uuids() | st.text(max_size=16))
def test_every_originator_id_has_a_valid_stream_of_its_own(originator_id: UUID | str) -> None:
    stream = stream_for(originator_id)
    assert _STREAM_NAME.match(stream)
    back = originator_of(stream)
    assert back == originator_id and type(back) is type(originator_id)


@given(st.text(max_size=16), st.text(max_size=16))
def test_distinct_text_ids_never_share_a_stream(a: str, b: str) -> None:
    assert (stream_for(a) == stream_for(b)) == (a == b)


def test_text_ids_that_are_stream_names_are_those_streams() -> None:
    assert stream_for("vm-1") == "vm-1" and originator_of("vm-1") == "vm-1"
    some = uuid.uuid4()
    assert stream_for(some) == f"es-{some}"
    # A str that looks like one of our own names is escaped, so it cannot alias a UUID.
    assert stream_for(f"es-{some}") != f"es-{some}"
    assert stream_for("a b/c") == "es=-a=20b=2Fc"


def test_ids_that_do_not_fit_a_stream_name_are_refused_clearly() -> None:
    with pytest.raises(DataError, match="too long: escaped it takes 244 of at most 200"):
        stream_for("x " * 60)
    assert originator_of(stream_for("\U0001f408" * 16)) == "\U0001f408" * 16
    with pytest.raises(ProgrammingError, match="UUID or a str"):
        stream_for(42)


# -- the blocking bridge -------------------------------------------------------------------


def test_a_call_that_outlives_the_timeout_is_an_operational_error() -> None:
    bridge = BlockingEventStore(MemoryEventStore, timeout=0.2)
    try:
        with pytest.raises(OperationalError, match="did not answer within 0.2s"):
            bridge.run(asyncio.sleep, 30)
        assert bridge.run(bridge.store.head) == 0  # the bridge still works
    finally:
        bridge.close()


def test_a_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive number of seconds"):
        BlockingEventStore(MemoryEventStore, timeout=0)


def test_calls_after_close_are_refused_and_close_is_idempotent() -> None:
    bridge = BlockingEventStore(MemoryEventStore)
    bridge.close()
    bridge.close()
    with pytest.raises(ProgrammingError, match="closed"):
        bridge.run(bridge.store.head)


def test_a_blocking_call_from_the_store_loop_is_refused_instead_of_deadlocking() -> None:
    bridge = BlockingEventStore(MemoryEventStore)
    try:
        async def reenter() -> int:
            return bridge.run(bridge.store.head)

        with pytest.raises(ProgrammingError, match="deadlock"):
            bridge.submit(reenter).result(5)
    finally:
        bridge.close()


def test_a_store_that_fails_to_open_leaves_no_thread_behind() -> None:
    before = threading.active_count()

    def broken() -> MemoryEventStore:
        raise ValueError("no such store")

    with pytest.raises(ValueError, match="no such store"):
        BlockingEventStore(broken)
    assert threading.active_count() == before


def test_a_recorder_needs_a_blocking_store() -> None:
    with pytest.raises(ProgrammingError, match="BlockingEventStore"):
        UcloudApplicationRecorder(MemoryEventStore())


# -- recorders on etcd and SQLite -------------------------------------------------------


class Backend:
    """Fresh stores of one kind; every store opened is closed at the end of the test."""

    def __init__(self, kind: str, tmp_path: Path, etcd: EtcdCluster | None) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.etcd = etcd
        self.opened: list[BlockingEventStore] = []

    def new_location(self) -> str:
        if self.etcd is not None:
            return f"/es-{uuid.uuid4().hex[:12]}/v1"
        return str(self.tmp_path / f"{uuid.uuid4().hex}.sqlite")

    def open(self, location: str | None = None, cls: type[BlockingEventStore] = BlockingEventStore) -> BlockingEventStore:
        """A store; the same ``location`` gives another handle on the same log."""
        where = location or self.new_location()
        if self.etcd is not None:
            endpoints = self.etcd.endpoints
            bridge = cls(lambda: EtcdEventStore(endpoints, prefix=where, max_txn_ops=MAX_TXN_OPS))
        else:
            bridge = cls(lambda: SqliteEventStore(where))
        self.opened.append(bridge)
        return bridge

    def url(self) -> str:
        if self.etcd is not None:
            return f"etcd://{','.join(self.etcd.endpoints)}{self.new_location()}?max_txn_ops={MAX_TXN_OPS}"
        return f"sqlite://{self.new_location()}"


@pytest.fixture(params=["sqlite", pytest.param("etcd", marks=pytest.mark.etcd)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    etcd = request.getfixturevalue("etcd") if request.param == "etcd" else None
    backend = Backend(request.param, tmp_path, etcd)
    yield backend
    for bridge in backend.opened:
        bridge.close()


def test_streams_may_start_at_version_0_or_1_and_read_back_in_library_versions(backend: Backend) -> None:
    recorder = UcloudApplicationRecorder(backend.open())
    from_one, from_zero = uuid.uuid4(), "account-7"
    assert recorder.insert_events([stored(from_one, 1), stored(from_one, 2), stored(from_one, 3)]) == [1, 2, 3]
    assert recorder.insert_events([stored(from_zero, 0), stored(from_zero, 1)]) == [4, 5]
    assert recorder.insert_events([stored(from_zero, 2)]) == [6]
    assert [e.originator_version for e in recorder.select_events(from_zero)] == [0, 1, 2]
    assert [e.originator_version for e in recorder.select_events(from_zero, gt=0, lte=1)] == [1]
    assert [e.originator_version for e in recorder.select_events(from_zero, desc=True, limit=2)] == [2, 1]
    assert [e.originator_version for e in recorder.select_events(from_one, gt=1)] == [2, 3]
    assert recorder.select_events(from_one, gt=3) == [] and recorder.select_events(from_one, limit=0) == []
    assert recorder.select_events(uuid.uuid4(), gt=1) == []
    notifications = recorder.select_notifications(None, 10)
    assert [(n.originator_id, n.originator_version) for n in notifications[3:]] == [
        (from_zero, 0), (from_zero, 1), (from_zero, 2)
    ]
    # A second handle, with nothing cached, reads the same versions.
    other = UcloudAggregateRecorder(backend.open(_location_of(backend)))
    assert [e.originator_version for e in other.select_events(from_zero, gt=0)] == [1, 2]


def _location_of(backend: Backend) -> str:
    store = backend.opened[0].store
    if isinstance(store, EtcdEventStore):
        return store.prefix.decode()
    assert isinstance(store, SqliteEventStore)
    return store.path


def test_an_insert_that_would_leave_a_gap_is_refused_and_writes_nothing(backend: Backend) -> None:
    recorder = UcloudApplicationRecorder(backend.open())
    account = uuid.uuid4()
    with pytest.raises(NotSupportedError, match="contiguous: 1 is followed by 3"):
        recorder.insert_events([stored(account, 1), stored(account, 3)])
    recorder.insert_events([stored(account, 1), stored(account, 2)])
    with pytest.raises(NotSupportedError, match="last version is 2"):
        recorder.insert_events([stored(account, 4)])
    with pytest.raises(NotSupportedError, match="starts at version 1"):
        recorder.insert_events([stored(account, 0)])
    assert recorder.max_notification_id() == 2


def test_versions_already_recorded_are_integrity_errors_naming_the_originator(backend: Backend) -> None:
    recorder = UcloudApplicationRecorder(backend.open())
    account = uuid.uuid4()
    recorder.insert_events([stored(account, 1), stored(account, 2)])
    with pytest.raises(IntegrityError, match=re.escape(f"of {account!r}: version 2 is already recorded")):
        recorder.insert_events([stored(account, 2), stored(account, 3)])
    with pytest.raises(IntegrityError, match="appears twice"):
        recorder.insert_events([stored(account, 3), stored(account, 3)])


@pytest.mark.parametrize(
    ("first_writer", "ours", "expected"),
    [
        ([0], [1], "ok"),  # the other writer started the stream at 0: ours follows it
        ([1], [0], NotSupportedError),  # it started at 1: ours would come before it
        ([0], [0], IntegrityError),  # it took the very version
    ],
)
def test_a_stream_started_by_another_writer_meanwhile_is_judged_by_its_start(
    backend: Backend, first_writer: list[int], ours: list[int], expected: object
) -> None:
    """Our insert plans a new stream, then another writer starts it before our append
    lands: the insert is planned again from the stream's real first version."""
    location = backend.new_location()
    other = UcloudApplicationRecorder(backend.open(location))
    account = uuid.uuid4()

    class InterleavedStore(BlockingEventStore):
        """Lets the other writer in between our plan and our append, once."""

        interleaved = False

        def run_raw(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            store = getattr(self, "store", None)  # None while the store is being opened
            if store is not None and fn == store.append and not InterleavedStore.interleaved:
                InterleavedStore.interleaved = True
                other.insert_events([stored(account, v) for v in first_writer])
            return super().run_raw(fn, *args, **kwargs)

    recorder = UcloudApplicationRecorder(backend.open(location, cls=InterleavedStore))
    if expected == "ok":
        assert recorder.insert_events([stored(account, v) for v in ours]) == [2]
        assert [e.originator_version for e in recorder.select_events(account)] == first_writer + ours
    else:
        with pytest.raises(expected):  # type: ignore[call-overload]
            recorder.insert_events([stored(account, v) for v in ours])
        assert [e.originator_version for e in recorder.select_events(account)] == first_writer
    assert InterleavedStore.interleaved


@pytest.mark.parametrize(
    ("events", "message"),
    [
        (["not a stored event"], "takes StoredEvent objects"),
        ([StoredEvent(originator_id="a", originator_version="1", topic="t", state=b"")], "must be an int"),  # type: ignore[arg-type]
        ([StoredEvent(originator_id="a", originator_version=True, topic="t", state=b"")], "must be an int"),
        ([StoredEvent(originator_id="a", originator_version=1, topic="t", state="{}")], "state must be bytes"),  # type: ignore[arg-type]
        ([StoredEvent(originator_id="a", originator_version=1, topic="", state=b"")], "topic must be"),
        ([StoredEvent(originator_id=7, originator_version=1, topic="t", state=b"")], "UUID or a str"),  # type: ignore[arg-type]
    ],
)
def test_malformed_stored_events_are_programming_errors(backend: Backend, events: list[Any], message: str) -> None:
    recorder = UcloudApplicationRecorder(backend.open())
    with pytest.raises(ProgrammingError, match=message):
        recorder.insert_events(events)
    with pytest.raises(ProgrammingError, match="application_name must be a non-empty str"):
        UcloudTrackingRecorder(recorder.store).max_tracking_id("")
    assert recorder.max_notification_id() is None


def test_one_insert_over_many_originators_is_atomic_and_ids_follow_the_input(backend: Backend) -> None:
    recorder = UcloudApplicationRecorder(backend.open())
    a, b = uuid.uuid4(), uuid.uuid4()
    # Versions of one originator may come in any order and between other originators'.
    ids = recorder.insert_events([stored(a, 2, "a2"), stored(b, 1, "b1"), stored(a, 1, "a1")])
    assert ids is not None
    by_id = {n.id: n.topic for n in recorder.select_notifications(None, 10)}
    assert [by_id[i] for i in ids] == ["a2", "b1", "a1"]
    with pytest.raises(IntegrityError):
        recorder.insert_events([stored(a, 3), stored(b, 1)])  # b1 exists: nothing is written
    assert recorder.select_events(a, gt=2) == [] and recorder.max_notification_id() == 3


def test_events_written_by_ucloud_itself_read_as_their_stream(backend: Backend) -> None:
    bridge = backend.open()
    bridge.run(bridge.store.append, StreamAppend("vm-1", 0, [NewEvent(type="vm.requested", data=b"{}")] * 2))
    recorder = UcloudApplicationRecorder(bridge)
    notifications = recorder.select_notifications(None, 10, topics=["vm.requested"])
    assert [(n.id, n.originator_id, n.originator_version) for n in notifications] == [(1, "vm-1", 1), (2, "vm-1", 2)]
    assert [e.originator_version for e in recorder.select_events("vm-1", gt=1)] == [2]
    # The library may append to it, from the next version on.
    assert recorder.insert_events([stored("vm-1", 3)]) == [3]


def test_notification_windows_respect_start_stop_and_topics(backend: Backend) -> None:
    recorder = UcloudApplicationRecorder(backend.open())
    account = uuid.uuid4()
    recorder.insert_events([stored(account, v, topic="even" if v % 2 == 0 else "odd") for v in range(1, 11)])
    assert [n.id for n in recorder.select_notifications(4, 3)] == [4, 5, 6]
    assert [n.id for n in recorder.select_notifications(4, 3, inclusive_of_start=False)] == [5, 6, 7]
    assert [n.id for n in recorder.select_notifications(0, 100, stop=3)] == [1, 2, 3]
    assert [n.id for n in recorder.select_notifications(2, 3, topics=["even"])] == [2, 4, 6]
    assert [n.id for n in recorder.select_notifications(None, 100, stop=7, topics=["odd"])] == [1, 3, 5, 7]
    assert recorder.select_notifications(5, 10, stop=4) == [] and recorder.select_notifications(1, 0) == []


def test_tracking_is_only_recorded_by_a_process_recorder(backend: Backend) -> None:
    recorder = UcloudApplicationRecorder(backend.open())
    with pytest.raises(ProgrammingError, match="process recorder"):
        recorder.insert_events([stored(uuid.uuid4(), 1)], tracking=Tracking("upstream", 1))
    assert recorder.max_notification_id() is None


def test_a_process_recorder_records_events_and_tracking_together(backend: Backend) -> None:
    recorder = UcloudProcessRecorder(backend.open())
    account = uuid.uuid4()
    assert recorder.insert_events([stored(account, 1)], tracking=Tracking("upstream app", 5)) == [1]
    with pytest.raises(IntegrityError, match="position 5 is stale"):
        recorder.insert_events([stored(account, 2)], tracking=Tracking("upstream app", 5))
    assert recorder.select_events(account, gt=1) == []
    assert recorder.max_tracking_id("upstream app") == 5 and recorder.max_tracking_id("other") is None


def test_a_tracking_id_below_one_is_a_programming_error(backend: Backend) -> None:
    recorder = UcloudTrackingRecorder(backend.open())
    with pytest.raises(ProgrammingError, match="tracking position must be >= 1"):
        recorder.insert_tracking(Tracking("upstream", 0))


def test_a_subscription_wakes_for_events_written_through_another_handle(backend: Backend) -> None:
    reader = UcloudApplicationRecorder(backend.open())
    writer = UcloudApplicationRecorder(backend.open(_location_of(backend)))
    writer.insert_events([stored(uuid.uuid4(), 1, "old")])
    received: list[tuple[int, str]] = []
    with reader.subscribe(gt=1) as subscription:
        done = threading.Event()

        def consume() -> None:
            for notification in subscription:
                received.append((notification.id, notification.topic))
                if len(received) == 2:
                    done.set()
                    return

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        writer.insert_events([stored(uuid.uuid4(), 1, "new1")])
        writer.insert_events([stored(uuid.uuid4(), 1, "new2")])
        assert done.wait(20), f"subscription saw only {received}"
        subscription.stop()
        thread.join(20)
    assert received == [(2, "new1"), (3, "new2")]


def test_stopping_a_subscription_ends_an_iteration_that_waits(backend: Backend) -> None:
    recorder = UcloudApplicationRecorder(backend.open())
    seen: list[int] = []
    with recorder.subscribe() as subscription:
        thread = threading.Thread(target=lambda: seen.extend(n.id for n in subscription), daemon=True)
        thread.start()
        subscription.stop()
        thread.join(20)
        assert not thread.is_alive()
    assert seen == []


def test_snapshots_keep_the_newest_and_answer_in_library_versions(backend: Backend) -> None:
    bridge = backend.open()
    events, snapshots = UcloudApplicationRecorder(bridge), UcloudSnapshotRecorder(bridge)
    account = uuid.uuid4()
    with pytest.raises(ProgrammingError, match="has no events"):
        snapshots.insert_events([stored(account, 0, "snap", b"0")])
    with pytest.raises(ProgrammingError, match="not recorded with tracking"):
        snapshots.insert_events([stored(account, 0, "snap", b"0")], tracking=Tracking("upstream", 1))
    events.insert_events([stored(account, v) for v in range(0, 6)])  # starts at 0
    snapshots.insert_events([stored(account, 2, "snap", b"two")])
    snapshots.insert_events([stored(account, 5, "snap", b"five")])
    snapshots.insert_events([stored(account, 3, "snap", b"three")])  # older: ignored
    (newest,) = snapshots.select_events(account, desc=True, limit=1)
    assert (newest.originator_version, newest.state) == (5, b"five")
    assert snapshots.select_events(account, lte=4, desc=True, limit=1) == []  # only the newest is kept
    assert snapshots.select_events(account, gt=5) == []
    # Stored as our stream version: the 6th event of the stream.
    snapshot = bridge.run(bridge.store.load_snapshot, stream_for(account))
    assert snapshot is not None and snapshot.version == 6


def test_undecodable_events_are_data_errors(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    bridge = BlockingEventStore(lambda: SqliteEventStore(path))
    try:
        recorder = UcloudApplicationRecorder(bridge)
        recorder.insert_events([stored(uuid.uuid4(), 1)])
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE events SET record = x'c1'")
        with pytest.raises(DataError, match="does not decode"):
            recorder.select_notifications(None, 10)
    finally:
        bridge.close()


@pytest.mark.etcd
def test_an_unreachable_etcd_is_an_operational_error() -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    bridge = BlockingEventStore(lambda: EtcdEventStore([endpoint], timeout=0.3, append_timeout=0.5))
    try:
        recorder = UcloudProcessRecorder(bridge)
        with pytest.raises(OperationalError):
            recorder.max_notification_id()
        with pytest.raises(OperationalError):
            recorder.insert_tracking(Tracking("upstream", 1))
    finally:
        bridge.close()


# -- the factory ----------------------------------------------------------------------


def construct(env: dict[str, str]) -> InfrastructureFactory[Any]:
    return InfrastructureFactory.construct({"PERSISTENCE_MODULE": MODULE, **env})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "UCLOUD_STORE_URL"),
        ({"UCLOUD_STORE_URL": "etcd://nohost/v1"}, "has no port"),
        ({"UCLOUD_STORE_URL": "memory://", "UCLOUD_STORE_TIMEOUT": "soon"}, "positive number"),
        ({"UCLOUD_STORE_URL": "memory://", "UCLOUD_STORE_TIMEOUT": "-1"}, "positive number"),
    ],
)
def test_factory_configuration_errors_name_what_is_wrong(env: dict[str, str], message: str) -> None:
    with pytest.raises(OSError, match=message):
        construct(env)


def test_factory_refuses_what_it_cannot_build(tmp_path: Path) -> None:
    factory = construct({"UCLOUD_STORE_URL": f"sqlite://{tmp_path / 'log.sqlite'}"})
    try:
        with pytest.raises(InfrastructureFactoryError, match="purpose 'audit'"):
            factory.aggregate_recorder(purpose="audit")
        factory.env["PROCESS_RECORDER_TOPIC"] = get_topic(UcloudTrackingRecorder)
        with pytest.raises(InfrastructureFactoryError, match="not a subclass of UcloudProcessRecorder"):
            factory.process_recorder()
        with pytest.raises(InfrastructureFactoryError, match="not a UcloudTrackingRecorder"):
            factory.tracking_recorder(UcloudAggregateRecorder)
    finally:
        factory.close()


def test_factory_opens_its_store_on_first_use_and_shares_it(tmp_path: Path) -> None:
    path = tmp_path / "app.sqlite"
    factory = construct({"UCLOUD_STORE_URL": f"sqlite://{path}"})
    assert isinstance(factory, UcloudFactory)
    factory.mapper()
    assert not path.exists()  # a factory built only for a mapper (as Follower.follow does) opens nothing
    events = factory.application_recorder()
    snapshots = factory.aggregate_recorder(purpose="snapshots")
    assert isinstance(snapshots, UcloudSnapshotRecorder)
    assert isinstance(events, UcloudApplicationRecorder) and events.store is snapshots.store
    factory.close()
    factory.close()


# -- whole eventsourcing applications -------------------------------------------------


class Account(Aggregate):
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.balance = Decimal(0)

    @event("Deposited")
    def deposit(self, amount: Decimal) -> None:
        self.balance += amount


class Accounts(Application[UUID]):
    def open(self, owner: str) -> UUID:
        account = Account(owner)
        self.save(account)
        return account.id

    def deposit(self, account_id: UUID, amount: Decimal) -> None:
        account: Account = self.repository.get(account_id)
        account.deposit(amount)
        self.save(account)

    def balance(self, account_id: UUID, version: int | None = None) -> Decimal:
        account: Account = self.repository.get(account_id, version=version)
        return account.balance


class Tally(Aggregate):
    def __init__(self) -> None:
        self.deposits = 0

    @event("Counted")
    def count(self) -> None:
        self.deposits += 1


class DepositCounter(ProcessApplication[UUID]):
    tally_id = uuid.UUID("00000000-0000-4000-8000-000000000001")

    @staticmethod
    def create_id() -> UUID:
        return DepositCounter.tally_id

    def policy(self, domain_event: DomainEventProtocol[UUID], processing_event: ProcessingEvent[UUID]) -> None:
        if isinstance(domain_event, Account.Deposited):  # type: ignore[attr-defined]
            try:
                tally: Tally = self.repository.get(self.tally_id)
            except Exception:  # the first deposit starts the tally
                tally = Tally._create(Tally.Created, id=self.tally_id)
            tally.count()
            processing_event.collect_events(tally)

    def deposits(self) -> int:
        tally: Tally = self.repository.get(self.tally_id)
        return tally.deposits


def test_an_application_keeps_its_events_and_snapshots_in_our_store(backend: Backend) -> None:
    env = {"PERSISTENCE_MODULE": MODULE, "UCLOUD_STORE_URL": backend.url(), "IS_SNAPSHOTTING_ENABLED": "y"}
    app = Accounts(env=env)
    try:
        account_id = app.open("alice")
        for amount in ("10", "20", "30"):
            app.deposit(account_id, Decimal(amount))
        app.take_snapshot(account_id)
        app.deposit(account_id, Decimal("40"))
        assert app.balance(account_id) == Decimal(100)
        assert app.balance(account_id, version=2) == Decimal(10)  # replayed: the snapshot is newer
        assert app.recorder.max_notification_id() == 5
    finally:
        app.close()
    again = Accounts(env=env)  # a new process: everything comes from the store
    try:
        assert again.balance(account_id) == Decimal(100)
        assert [n.originator_version for n in again.notification_log.select(start=1, limit=10)] == [1, 2, 3, 4, 5]
    finally:
        again.close()


def test_a_process_application_follows_exactly_once_across_restarts(backend: Backend) -> None:
    env = {
        "PERSISTENCE_MODULE": MODULE,
        "ACCOUNTS_UCLOUD_STORE_URL": backend.url(),
        "DEPOSITCOUNTER_UCLOUD_STORE_URL": backend.url(),
    }
    system = System(pipes=[[Accounts, DepositCounter]])

    def run(body: Callable[[SingleThreadedRunner[UUID]], None]) -> None:
        runner = SingleThreadedRunner[UUID](system, env=env)
        runner.start()
        try:
            body(runner)
        finally:
            runner.stop()

    account_ids: list[UUID] = []

    def first(runner: SingleThreadedRunner[UUID]) -> None:
        accounts = runner.get(Accounts)
        account_ids.append(accounts.open("bob"))
        accounts.deposit(account_ids[0], Decimal(1))
        accounts.deposit(account_ids[0], Decimal(2))
        assert runner.get(DepositCounter).deposits() == 2

    def second(runner: SingleThreadedRunner[UUID]) -> None:
        counter = runner.get(DepositCounter)
        counter.pull_and_process("Accounts")  # nothing new: tracking says all is done
        assert counter.deposits() == 2
        assert counter.recorder.max_tracking_id("Accounts") == 3
        runner.get(Accounts).deposit(account_ids[0], Decimal(3))
        assert counter.deposits() == 3
        # Processing an event again is refused atomically: no double count.
        with pytest.raises(IntegrityError):
            counter.pull_and_process("Accounts", start=2)
        assert counter.deposits() == 3

    run(first)
    run(second)
