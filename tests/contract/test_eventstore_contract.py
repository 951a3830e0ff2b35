"""The contract every event store backend honours: memory, SQLite and etcd alike."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from tests.conftest import forget
from ucloud.eventstore.errors import InvalidAppend, StreamConflict, TrackingConflict
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.records import NewEvent, Snapshot, StreamAppend, Tracking


def ev(kind: str = "thing.happened", n: int = 0, **kw: object) -> NewEvent:
    return NewEvent(type=kind, data=b'{"n":%d}' % n, **kw)  # type: ignore[arg-type]


async def test_append_assigns_versions_and_gap_free_positions(store: EventStore) -> None:
    assert await store.head() == 0
    assert await store.append(StreamAppend("vm-a", 0, [ev(n=1), ev(n=2)])) == [1, 2]
    assert await store.append(StreamAppend("vm-b", 0, [ev(n=3)])) == [3]
    assert await store.append(StreamAppend("vm-a", 2, [ev(n=4)])) == [4]
    records = await store.read_all()
    assert [r.position for r in records] == [1, 2, 3, 4]
    assert [(r.stream, r.version) for r in records] == [("vm-a", 1), ("vm-a", 2), ("vm-b", 1), ("vm-a", 3)]
    assert await store.head() == 4
    assert await store.stream_version("vm-a") == 3
    assert await store.stream_version("vm-none") == 0


async def test_envelope_carries_every_field(store: EventStore) -> None:
    cause, correlation = uuid.uuid4(), uuid.uuid4()
    event = NewEvent(type="vm.created", data=b"{}", schema=2, actor="alice/user",
                     causation_id=cause, correlation_id=correlation)
    await store.append(StreamAppend("vm-x", 0, [event]))
    (record,) = await store.read_stream("vm-x")
    assert record.id == event.id
    assert record.type == "vm.created"
    assert (record.stream, record.version, record.position) == ("vm-x", 1, 1)
    assert record.schema == 2 and record.actor == "alice/user"
    assert record.causation_id == cause and record.correlation_id == correlation
    assert record.time.tzinfo is not None and record.data == b"{}"


async def test_metadata_is_kept_beside_the_event_and_defaults_to_empty(store: EventStore) -> None:
    await store.append(StreamAppend("es-m", 0, [NewEvent(type="x", data=b"{}", metadata=b'{"v":0}'), ev()]))
    first, second = await store.read_stream("es-m")
    assert (first.metadata, first.data) == (b'{"v":0}', b"{}")
    assert second.metadata == b""
    assert [r.metadata for r in await store.read_all()] == [b'{"v":0}', b""]


async def test_wrong_expected_version_raises_conflict_and_writes_nothing(store: EventStore) -> None:
    await store.append(StreamAppend("vm-a", 0, [ev()]))
    with pytest.raises(StreamConflict) as error:
        await store.append(StreamAppend("vm-a", 0, [ev()]))
    assert error.value.stream == "vm-a"
    with pytest.raises(StreamConflict):
        await store.append(StreamAppend("vm-a", 5, [ev()]))  # ahead of the stream
    assert await store.head() == 1
    assert await store.stream_version("vm-a") == 1


async def test_multi_stream_append_is_atomic(store: EventStore) -> None:
    await store.append(StreamAppend("host-1", 0, [ev()]))
    with pytest.raises(StreamConflict):
        await store.append(
            StreamAppend("vm-new", 0, [ev()]),
            StreamAppend("host-1", 0, [ev()]),  # stale: host-1 is at 1
        )
    assert await store.stream_version("vm-new") == 0
    assert await store.head() == 1
    positions = await store.append(StreamAppend("vm-new", 0, [ev()]), StreamAppend("host-1", 1, [ev(), ev()]))
    assert positions == [2, 3, 4]


async def test_read_stream_windows(store: EventStore) -> None:
    await store.append(StreamAppend("s-1", 0, [ev(n=i) for i in range(1, 6)]))
    await store.append(StreamAppend("s-2", 0, [ev()]))
    assert [r.version for r in await store.read_stream("s-1", after_version=2)] == [3, 4, 5]
    assert [r.version for r in await store.read_stream("s-1", up_to_version=2)] == [1, 2]
    assert [r.version for r in await store.read_stream("s-1", limit=2)] == [1, 2]
    assert [r.version for r in await store.read_stream("s-1", backwards=True, limit=2)] == [5, 4]
    assert await store.read_stream("s-missing") == []


async def test_read_all_windows_and_type_filter(store: EventStore) -> None:
    await store.append(StreamAppend("s-1", 0, [ev("a.x"), ev("b.y"), ev("a.x")]))
    assert [r.position for r in await store.read_all(1)] == [2, 3]
    assert [r.position for r in await store.read_all(0, up_to=2)] == [1, 2]
    assert [r.position for r in await store.read_all(0, limit=1)] == [1]
    assert [r.position for r in await store.read_all(0, types={"a.x"})] == [1, 3]
    assert await store.read_all(3) == []


@pytest.mark.parametrize(
    ("appends", "message"),
    [
        ((), "at least one stream"),
        ((StreamAppend("bad/name", 0, [NewEvent(type="x", data=b"")]),), "bad/name"),
        ((StreamAppend("", 0, [NewEvent(type="x", data=b"")]),), "stream name"),
        ((StreamAppend("s-1", -1, [NewEvent(type="x", data=b"")]),), "expected_version"),
        ((StreamAppend("s-1", 0, []),), "no events"),
        ((StreamAppend("s-1", 0, [NewEvent(type="", data=b"")]),), "no type"),
        (
            (StreamAppend("s-1", 0, [NewEvent(type="x", data=b"")]), StreamAppend("s-1", 0, [NewEvent(type="x", data=b"")])),
            "twice",
        ),
    ],
)
async def test_invalid_appends_are_refused_with_a_clear_message(
    store: EventStore, appends: tuple[StreamAppend, ...], message: str
) -> None:
    with pytest.raises(InvalidAppend, match=message):
        await store.append(*appends)
    assert await store.head() == 0


async def test_tracking_is_atomic_with_emitted_events(store: EventStore) -> None:
    assert await store.tracked_position("scheduler") == 0
    await store.append(StreamAppend("vm-a", 0, [ev()]), tracking=Tracking("scheduler", 7))
    assert await store.tracked_position("scheduler") == 7
    # A stale consumer (same or lower position) is rejected and emits nothing.
    for stale in (7, 3):
        with pytest.raises(TrackingConflict) as error:
            await store.append(StreamAppend("vm-b", 0, [ev()]), tracking=Tracking("scheduler", stale))
        assert error.value.recorded == 7
    assert await store.stream_version("vm-b") == 0
    # A stream conflict rolls the tracking back too.
    with pytest.raises(StreamConflict):
        await store.append(StreamAppend("vm-a", 0, [ev()]), tracking=Tracking("scheduler", 8))
    assert await store.tracked_position("scheduler") == 7
    # Tracking alone (a consumer that emits nothing for an event) is allowed.
    await store.append(tracking=Tracking("scheduler", 9))
    assert await store.tracked_position("scheduler") == 9
    assert await store.head() == 1


async def test_tracking_alone_on_an_empty_log_leaves_later_appends_working(store: EventStore) -> None:
    # Found by the eventsourcing library's TrackingRecorderTestCase: on etcd, a
    # tracking-only append to an empty log used to wedge every later append.
    assert await store.append(tracking=Tracking("projector", 3)) == []
    assert await store.head() == 0
    assert await store.append(tracking=Tracking("projector", 4)) == []
    assert await store.append(StreamAppend("vm-a", 0, [ev()])) == [1]
    assert await store.tracked_position("projector") == 4
    assert await store.head() == 1


async def test_concurrent_appends_to_one_stream_exactly_one_wins(store: EventStore) -> None:
    results = await asyncio.gather(
        *(store.append(StreamAppend("vm-race", 0, [ev(n=i)])) for i in range(10)), return_exceptions=True
    )
    wins = [r for r in results if isinstance(r, list)]
    assert len(wins) == 1
    assert all(isinstance(r, StreamConflict) for r in results if not isinstance(r, list))
    assert await store.head() == 1


async def test_concurrent_appends_to_many_streams_all_land_in_one_order(store: EventStore) -> None:
    results = await asyncio.gather(*(store.append(StreamAppend(f"vm-{i}", 0, [ev(n=i), ev(n=i)])) for i in range(50)))
    flat = sorted(p for r in results for p in r)
    assert flat == list(range(1, 101))
    records = await store.read_all()
    assert [r.position for r in records] == list(range(1, 101))
    for result in results:  # each request's two events are adjacent
        assert result[1] == result[0] + 1


async def test_subscription_catches_up_then_follows_live_without_gaps_or_repeats(store: EventStore) -> None:
    await store.append(StreamAppend("s-1", 0, [ev(n=i) for i in range(5)]))
    seen: list[int] = []

    async def consume() -> None:
        async for record in store.subscribe(2, batch=3, idle_timeout=0.2):
            seen.append(record.position)
            if record.position == 25:
                return

    task = asyncio.create_task(consume())
    for i in range(20):
        await store.append(StreamAppend(f"live-{i}", 0, [ev(n=i)]))
        if i % 5 == 0:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(task, 20)
    assert seen == list(range(3, 26))


async def test_subscription_filters_types(store: EventStore) -> None:
    await store.append(StreamAppend("s-1", 0, [ev("a.x"), ev("b.y"), ev("a.x"), ev("b.y")]))
    got = []
    async for record in store.subscribe(types={"b.y"}, idle_timeout=0.1):
        got.append(record.position)
        if len(got) == 2:
            break
    assert got == [2, 4]


async def test_wait_for_events_times_out_on_a_quiet_log(store: EventStore) -> None:
    assert await store.wait_for_events(0, 0.1) == 0


async def test_snapshots_keep_the_newest(store: EventStore) -> None:
    assert await store.load_snapshot("vm-a") is None
    await store.save_snapshot(Snapshot(stream="vm-a", version=5, type="vm", state=b"five"))
    await store.save_snapshot(Snapshot(stream="vm-a", version=3, type="vm", state=b"three"))
    snapshot = await store.load_snapshot("vm-a")
    assert snapshot is not None and (snapshot.version, snapshot.state) == (5, b"five")
    await store.save_snapshot(Snapshot(stream="vm-a", version=9, type="vm", state=b"nine"))
    snapshot = await store.load_snapshot("vm-a")
    assert snapshot is not None and snapshot.version == 9


async def test_a_snapshot_of_tens_of_megabytes_saves_and_loads_whole(store: EventStore) -> None:
    """Read models of 100,000 VMs are tens of MiB: far over etcd's request limit."""
    big = random.Random(7).randbytes(24 * 1024 * 1024 + 123)
    await store.save_snapshot(Snapshot(stream="projection-big", version=10, type="views", state=big))
    loaded = await store.load_snapshot("projection-big")
    assert loaded is not None and (loaded.version, loaded.type, len(loaded.state)) == (10, "views", len(big))
    assert loaded.state == big
    assert (loaded.chunks, loaded.generation, loaded.digest) == (0, "", "")  # storage details stay inside
    smaller = big[: 3 * 1024 * 1024]
    await store.save_snapshot(Snapshot(stream="projection-big", version=11, type="views", state=smaller))
    await store.save_snapshot(Snapshot(stream="projection-big", version=9, type="views", state=b"old"))
    loaded = await store.load_snapshot("projection-big")
    assert loaded is not None and (loaded.version, loaded.state) == (11, smaller)
    await forget(store)


def sliced(n: int, *slices: str) -> NewEvent:
    return NewEvent(type="thing.happened", data=b'{"n":%d}' % n, slices=slices)


async def test_a_slice_holds_exactly_its_events_in_log_order(store: EventStore) -> None:
    assert await store.slices_from() is None
    await store.append(StreamAppend("vm-a", 0, [sliced(1, "host-1"), sliced(2)]))
    await store.append(StreamAppend("vm-b", 0, [sliced(3, "host-2")]),
                       StreamAppend("host-1", 0, [sliced(4, "host-1", "host-2")]))
    await store.append(StreamAppend("vm-a", 2, [sliced(5, "host-1")]))
    assert await store.slices_from() == 0
    assert [r.position for r in await store.read_slice("host-1")] == [1, 4, 5]
    assert [r.position for r in await store.read_slice("host-2")] == [3, 4]
    assert [r.position for r in await store.read_slice("host-1", 1, up_to=4)] == [4]
    assert [r.position for r in await store.read_slice("host-1", 0, limit=2)] == [1, 4]
    assert await store.read_slice("host-3") == []
    (record,) = await store.read_slice("host-2", 3)
    assert (record.stream, record.version, record.data) == ("host-1", 1, b'{"n":4}')


async def test_slices_begin_where_the_first_sliced_append_found_the_log(store: EventStore) -> None:
    await store.append(StreamAppend("vm-a", 0, [ev(n=1), ev(n=2)]))  # written before slices existed
    await store.append(StreamAppend("vm-a", 2, [sliced(3, "host-1")]))
    await store.append(StreamAppend("vm-b", 0, [sliced(4, "host-1")]))
    assert await store.slices_from() == 2


async def test_a_conflicting_append_leaves_no_slice_entry(store: EventStore) -> None:
    await store.append(StreamAppend("vm-a", 0, [sliced(1, "host-1")]))
    with pytest.raises(StreamConflict):
        await store.append(StreamAppend("vm-b", 0, [sliced(2, "host-1")]),
                           StreamAppend("vm-a", 0, [sliced(3, "host-1")]))
    assert [r.position for r in await store.read_slice("host-1")] == [1]
    await store.append(StreamAppend("vm-b", 0, [sliced(2, "host-1")]))
    assert [r.position for r in await store.read_slice("host-1")] == [1, 2]


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 201, "héllo", "host-1\n"])
async def test_a_bad_slice_name_is_refused_before_anything_is_written(store: EventStore, bad: str) -> None:
    with pytest.raises(InvalidAppend, match="slice name"):
        await store.append(StreamAppend("vm-a", 0, [sliced(1, bad)]))
    assert await store.head() == 0


async def test_subscribing_to_a_slice_catches_up_then_follows_it_live(store: EventStore) -> None:
    await store.append(StreamAppend("vm-a", 0, [sliced(1, "host-1"), sliced(2, "host-2")]))
    seen: list[int] = []

    async def follow() -> None:
        async for record in store.subscribe(0, slice="host-1", idle_timeout=0.1):
            seen.append(record.position)
            if len(seen) == 3:
                return

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.2)
    await store.append(StreamAppend("vm-b", 0, [sliced(3, "host-2"), sliced(4, "host-1")]))
    await store.append(StreamAppend("vm-c", 0, [sliced(5, "host-1")]))
    await asyncio.wait_for(follower, 10)
    assert seen == [1, 4, 5]


async def test_a_stream_name_with_a_trailing_newline_is_refused(store: EventStore) -> None:
    with pytest.raises(InvalidAppend, match="stream name"):
        await store.append(StreamAppend("vm-a\n", 0, [ev(n=1)]))
