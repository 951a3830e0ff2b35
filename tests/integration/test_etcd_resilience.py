"""The etcd backend under real disturbances: a killed leader, compaction, restarts,
dead endpoints, a cluster that is down, and group commit under concurrency.

Every test runs real etcd members (tests/support/etcd.py) and proves an outcome on
the log itself: each acknowledged append present exactly once, positions gap-free,
every member serving the same log, subscribers seeing each event once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from tests.support.etcd import MAX_TXN_OPS, EtcdCluster, etcd_cluster, free_port
from ucloud.eventstore.errors import DataError, StreamConflict, UnavailableError
from ucloud.eventstore.etcd import EtcdEventStore
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.records import EventRecord, NewEvent, Snapshot, StreamAppend, Tracking

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(120)]


def prefix() -> str:
    return f"/resilience-{uuid.uuid4().hex[:10]}/v1"


def events(count: int, kind: str = "vm.heartbeat") -> list[NewEvent]:
    return [NewEvent(type=kind, data=b'{"n":%d}' % i) for i in range(count)]


def open_store(endpoints: list[str], name: str, **options: float) -> EtcdEventStore:
    return EtcdEventStore(endpoints, prefix=name, max_txn_ops=MAX_TXN_OPS, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cluster3() -> Iterator[EtcdCluster]:
    with etcd_cluster(3) as cluster:
        yield cluster


@pytest.fixture
def lone_etcd() -> Iterator[EtcdCluster]:
    """A single member this test may kill, restart and compact."""
    with etcd_cluster(1) as cluster:
        yield cluster


class Ledger:
    """What the writers were told: every acknowledged event with its stream, version
    and position, and each writer's retries after an unknown outcome."""

    def __init__(self) -> None:
        self.acked: dict[uuid.UUID, tuple[str, int, int]] = {}
        self.unconfirmed = 0

    def record(self, append: StreamAppend, positions: list[int]) -> None:
        assert len(positions) == len(append.events)
        for offset, (event, position) in enumerate(zip(append.events, positions, strict=True), start=1):
            assert event.id not in self.acked, "one event acknowledged twice"
            self.acked[event.id] = (append.stream, append.expected_version + offset, position)


async def append_until_acknowledged(store: EventStore, append: StreamAppend, ledger: Ledger) -> list[int]:
    """Retry the SAME request (same event ids, same expected version) while the outcome
    is unknown. A StreamConflict here would mean our own earlier write was mistaken
    for someone else's: every stream in these tests has exactly one writer."""
    while True:
        try:
            positions = await store.append(append)
        except UnavailableError:
            ledger.unconfirmed += 1
            await asyncio.sleep(0.05)
            continue
        ledger.record(append, positions)
        return positions


async def writer(store: EventStore, name: str, ledger: Ledger, stop: asyncio.Event) -> None:
    """Many small appends to the writer's own streams, some of several events, some to
    two streams at once."""
    versions: dict[str, int] = defaultdict(int)
    i = 0
    while not stop.is_set():
        stream = f"{name}-s{i % 7}"
        count = 1 + i % 3
        appends = [StreamAppend(stream, versions[stream], events(count))]
        if i % 5 == 4:
            other = f"{name}-pair{i % 2}"
            appends.append(StreamAppend(other, versions[other], events(1, "vm.paired")))
        if len(appends) == 1:
            await append_until_acknowledged(store, appends[0], ledger)
        else:
            await append_pair(store, appends, ledger)
        for append in appends:
            versions[append.stream] += len(append.events)
        i += 1


async def append_pair(store: EventStore, appends: list[StreamAppend], ledger: Ledger) -> None:
    while True:
        try:
            positions = await store.append(*appends)
        except UnavailableError:
            ledger.unconfirmed += 1
            await asyncio.sleep(0.05)
            continue
        offset = 0
        for append in appends:
            ledger.record(append, positions[offset : offset + len(append.events)])
            offset += len(append.events)
        return


def assert_log_is_exactly(records: list[EventRecord], ledger: Ledger) -> None:
    """Positions 1..head without gaps, versions contiguous per stream, and exactly the
    acknowledged events (a writer stopped mid-request may add nothing unacknowledged,
    since every writer retries until acknowledged)."""
    assert [r.position for r in records] == list(range(1, len(records) + 1))
    ids = [r.id for r in records]
    assert len(ids) == len(set(ids)), "an event id appears twice in the log"
    assert set(ids) == set(ledger.acked), "the log and the acknowledgements differ"
    for record in records:
        assert ledger.acked[record.id] == (record.stream, record.version, record.position)
    versions: dict[str, list[int]] = defaultdict(list)
    for record in records:
        versions[record.stream].append(record.version)
    for stream, seen in versions.items():
        assert seen == list(range(1, len(seen) + 1)), f"stream {stream} has versions {seen}"


async def wait_for_acks(ledger: Ledger, count: int, timeout: float = 30) -> None:
    await asyncio.wait_for(_until(lambda: len(ledger.acked) >= count), timeout)


async def _until(condition: Callable[[], bool]) -> None:
    """Poll a condition the writers' progress changes (they signal nothing)."""
    while not condition():  # noqa: ASYNC110 - polling a plain counter on purpose
        await asyncio.sleep(0.01)


# -- d: a dead first endpoint ---------------------------------------------------------


async def test_store_works_when_its_first_endpoint_is_dead_from_the_start(cluster3: EtcdCluster) -> None:
    dead = f"127.0.0.1:{free_port()}"
    store = open_store([dead, *cluster3.endpoints[1:]], prefix())
    try:
        assert await store.head() == 0
        assert await store.append(StreamAppend("vm-1", 0, events(2))) == [1, 2]
        assert [r.version for r in await store.read_stream("vm-1")] == [1, 2]
        got = []
        async for record in store.subscribe(0, idle_timeout=0.2):
            got.append(record.position)
            if record.position == 2:
                break
        assert got == [1, 2]
        assert store.client.endpoint != dead
    finally:
        await store.close()


# -- a: SIGKILL the leader under concurrent writers -----------------------------------


async def test_acknowledged_appends_survive_a_killed_leader_exactly_once(cluster3: EtcdCluster) -> None:
    name = prefix()
    leader = await asyncio.to_thread(cluster3.leader)
    followers = [m for m in cluster3.members if m is not leader]
    # One store talks to the leader (its connection dies), one to a follower (its
    # leader dies under it); both share the log, so they also race on the head.
    on_leader = open_store([leader.endpoint, *(m.endpoint for m in followers)], name,
                           append_timeout=15, timeout=3)
    on_follower = open_store([followers[0].endpoint, followers[1].endpoint, leader.endpoint], name,
                             append_timeout=15, timeout=3)
    ledger = Ledger()
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(writer(store, f"w{i}", ledger, stop))
        for i, store in enumerate([on_leader, on_leader, on_follower, on_follower])
    ]
    try:
        await wait_for_acks(ledger, 300)
        await asyncio.to_thread(leader.kill)
        killed_at = len(ledger.acked)
        await wait_for_acks(ledger, killed_at + 400)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await on_leader.close()
        await on_follower.close()

    logs = []
    for member in followers:
        store = open_store([member.endpoint], name)
        try:
            logs.append(await store.read_all())
        finally:
            await store.close()
    assert logs[0] == logs[1], "the surviving members serve different logs"
    assert_log_is_exactly(logs[0], ledger)

    # The killed member comes back on its data dir and catches up to the same log.
    await asyncio.to_thread(cluster3.restart, leader)
    store = open_store([leader.endpoint], name)
    try:
        assert await store.read_all() == logs[0]
    finally:
        await store.close()


# -- b: compaction while a subscription follows live ----------------------------------


async def test_subscription_survives_physical_compaction_while_following_live(lone_etcd: EtcdCluster) -> None:
    member = lone_etcd.members[0]
    store = open_store(lone_etcd.endpoints, prefix())
    total = 240
    seen: list[int] = []

    async def follow() -> None:
        async for record in store.subscribe(0, batch=7, idle_timeout=0.2):
            seen.append(record.position)
            if record.position == total:
                return

    follower = asyncio.create_task(follow())
    ledger = Ledger()
    try:
        for i in range(total // 2):
            await append_until_acknowledged(store, StreamAppend(f"vm-{i % 9}", 2 * (i // 9), events(2)), ledger)
            if i % 30 == 29:
                # Compact everything up to now, physically, while the watch is open.
                revision = (await store.client.range(b"/")).revision
                await asyncio.to_thread(member.etcdctl, "compact", str(revision), "--physical")
        await asyncio.wait_for(follower, 30)
        assert seen == list(range(1, total + 1))
        # A new subscription catching up after compaction also sees everything once.
        again = []
        async for record in store.subscribe(0, batch=50, idle_timeout=0.2):
            again.append(record.position)
            if record.position == total:
                break
        assert again == seen
        assert_log_is_exactly(await store.read_all(), ledger)
    finally:
        follower.cancel()
        await store.close()


# -- c: restart of the only member, and a client reconnect -----------------------------


async def test_subscription_and_appends_survive_an_etcd_restart_and_a_reconnect(lone_etcd: EtcdCluster) -> None:
    member = lone_etcd.members[0]
    name = prefix()
    # append_timeout is shorter than the outage: writers see UnavailableError and
    # retry the same requests, which must be recognised if they were written.
    store = open_store(lone_etcd.endpoints, name, append_timeout=0.5, timeout=1)
    resumed = open_store(lone_etcd.endpoints, name)
    ledger = Ledger()
    stop = asyncio.Event()
    live: list[int] = []
    before_reconnect: list[int] = []

    async def follow(into: list[int], subscriber: EventStore, after: int, until: int | None) -> None:
        async for record in subscriber.subscribe(after, batch=13, idle_timeout=0.2):
            into.append(record.position)
            if until is not None and record.position >= until:
                return

    live_task = asyncio.create_task(follow(live, store, 0, None))
    # A second consumer on its own connection stops half-way; it resumes later from
    # the position it reached, through a brand-new client.
    early_task = asyncio.create_task(follow(before_reconnect, resumed, 0, 100))
    writers = [asyncio.create_task(writer(store, f"w{i}", ledger, stop)) for i in range(2)]
    try:
        await wait_for_acks(ledger, 150)
        await asyncio.to_thread(member.kill)
        # While etcd is down the subscription only waits, the writers retry.
        await asyncio.sleep(0.8)
        assert not live_task.done()
        await asyncio.to_thread(lone_etcd.restart, member)
        restarted_at = len(ledger.acked)
        await wait_for_acks(ledger, restarted_at + 150)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*writers), 30)
        await asyncio.wait_for(early_task, 30)
        head = await store.head()
        await asyncio.wait_for(_until(lambda: bool(live) and live[-1] >= head), 30)
    finally:
        stop.set()
        for task in (*writers, live_task, early_task):
            task.cancel()
        await resumed.close()

    assert ledger.unconfirmed > 0, "the writers never noticed etcd was down"
    assert live == list(range(1, head + 1))
    assert_log_is_exactly(await store.read_all(), ledger)
    await store.close()

    reconnected = open_store(lone_etcd.endpoints, name)
    try:
        rest: list[int] = []
        await asyncio.wait_for(follow(rest, reconnected, before_reconnect[-1], head), 30)
        assert before_reconnect + rest == list(range(1, head + 1))
    finally:
        await reconnected.close()


# -- e: etcd down entirely ------------------------------------------------------------


@pytest.fixture
async def store_without_etcd() -> AsyncIterator[EtcdEventStore]:
    store = open_store([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"], prefix(),
                       append_timeout=1.0, timeout=0.5)
    yield store
    await store.close()


async def test_append_raises_unavailable_within_its_timeout_when_etcd_is_down(
    store_without_etcd: EtcdEventStore,
) -> None:
    # The outer bound only keeps a hanging append from hanging the suite; the append
    # itself must give up after append_timeout=1s with the store's own error.
    with pytest.raises(UnavailableError, match="append"):
        await asyncio.wait_for(store_without_etcd.append(StreamAppend("vm-1", 0, events(1))), 10)
    with pytest.raises(UnavailableError):
        await asyncio.wait_for(
            store_without_etcd.append(StreamAppend("vm-1", 0, events(1)), tracking=Tracking("c", 1)), 10
        )


@pytest.mark.parametrize(
    "read",
    [
        lambda s: s.read_all(),
        lambda s: s.head(),
        lambda s: s.read_stream("vm-1"),
        lambda s: s.stream_version("vm-1"),
        lambda s: s.tracked_position("c"),
        lambda s: s.load_snapshot("vm-1"),
        lambda s: s.save_snapshot(Snapshot(stream="vm-1", version=1, type="vm", state=b"")),
        lambda s: s.wait_for_events(0, 0.1),
    ],
    ids=["read_all", "head", "read_stream", "stream_version", "tracked_position", "load_snapshot",
         "save_snapshot", "wait_for_events"],
)
async def test_reads_raise_unavailable_when_etcd_is_down(store_without_etcd: EtcdEventStore, read: object) -> None:
    with pytest.raises(UnavailableError, match="etcd 127.0.0.1"):
        await asyncio.wait_for(read(store_without_etcd), 10)  # type: ignore[operator]


async def test_a_cluster_killed_under_a_connected_store_raises_unavailable_then_recovers(
    lone_etcd: EtcdCluster,
) -> None:
    store = open_store(lone_etcd.endpoints, prefix(), append_timeout=1.0, timeout=0.5)
    try:
        await store.append(StreamAppend("vm-1", 0, events(1)))
        await asyncio.to_thread(lone_etcd.members[0].kill)
        with pytest.raises(UnavailableError):
            await asyncio.wait_for(store.append(StreamAppend("vm-1", 1, events(1))), 10)
        with pytest.raises(UnavailableError):
            await asyncio.wait_for(store.read_all(), 10)
        await asyncio.to_thread(lone_etcd.restart, lone_etcd.members[0])
        # Same request again: written now, or recognised as written before the kill.
        retry = StreamAppend("vm-1", 1, events(1))
        assert await store.append(retry) == [2]
        assert [r.id for r in await store.read_stream("vm-1", after_version=1)] == [retry.events[0].id]
    finally:
        await store.close()


# -- f: group commit batches, and each request keeps its own check ----------------------


async def test_group_commit_batches_concurrent_appends_and_judges_each_alone(etcd: EtcdCluster) -> None:
    store = open_store(etcd.endpoints, prefix())
    try:
        await store.append(StreamAppend("host-taken", 0, events(1)))
        batches, transactions = store.committer.batches, store.transactions
        requests = [StreamAppend(f"vm-{i}", 0, events(1)) for i in range(31)]
        stale = StreamAppend("host-taken", 0, events(1))  # the stream is at version 1
        requests.insert(17, stale)
        results = await asyncio.gather(*(store.append(r) for r in requests), return_exceptions=True)
        used_batches = store.committer.batches - batches
        used_transactions = store.transactions - transactions
    finally:
        await store.close()
    assert isinstance(results[17], StreamConflict) and results[17].stream == "host-taken"
    won = [r for i, r in enumerate(results) if i != 17]
    assert all(isinstance(r, list) for r in won)
    assert sorted(p for r in won for p in r) == list(range(2, 33))  # type: ignore[union-attr]
    # 32 requests in far fewer transactions: the first fails on the stale request,
    # the rest go together in the next.
    assert used_batches <= 4, used_batches
    assert used_transactions <= 6, used_transactions


async def test_retrying_an_acknowledged_append_returns_its_positions_instead_of_a_conflict(
    etcd: EtcdCluster,
) -> None:
    store = open_store(etcd.endpoints, prefix())
    try:
        first = StreamAppend("vm-1", 0, events(3))
        assert await store.append(first) == [1, 2, 3]
        await store.append(StreamAppend("vm-2", 0, events(1)))
        # The caller never heard the answer and retries the very same request.
        assert await store.append(first) == [1, 2, 3]
        # Someone else's events at that version are a real conflict.
        with pytest.raises(StreamConflict):
            await store.append(StreamAppend("vm-1", 0, events(3)))
        assert await store.head() == 4
    finally:
        await store.close()


async def test_a_request_etcd_refuses_as_too_large_fails_alone_in_its_batch(etcd: EtcdCluster) -> None:
    # Our own size estimate is switched off (64 MiB) so that etcd itself refuses the
    # transaction (it allows 8 MiB here): only the oversized request may fail.
    store = EtcdEventStore(etcd.endpoints, prefix=prefix(), max_txn_ops=MAX_TXN_OPS,
                           max_txn_bytes=64 * 1024 * 1024)
    try:
        big = StreamAppend("image-big", 0, [NewEvent(type="image.blob", data=b"x" * (9 * 1024 * 1024))])
        small = [StreamAppend(f"vm-{i}", 0, events(1)) for i in range(5)]
        results = await asyncio.gather(store.append(big), *(store.append(s) for s in small),
                                       return_exceptions=True)
        assert isinstance(results[0], DataError), results[0]
        assert all(isinstance(r, list) for r in results[1:]), results[1:]
        assert [r.stream for r in await store.read_all()] == [s.stream for s in small]
    finally:
        await store.close()


async def test_an_append_cancelled_before_its_batch_is_taken_writes_nothing(etcd: EtcdCluster) -> None:
    store = open_store(etcd.endpoints, prefix())
    try:
        kept = asyncio.create_task(store.append(StreamAppend("vm-kept", 0, events(1))))
        dropped = asyncio.create_task(store.append(StreamAppend("vm-dropped", 0, events(1))))
        await asyncio.sleep(0)  # both are queued; the committer has not taken a batch yet
        dropped.cancel()
        assert await kept == [1]
        with pytest.raises(asyncio.CancelledError):
            await dropped
        assert [r.stream for r in await store.read_all()] == ["vm-kept"]
        # The committer goes on serving later appends.
        assert await store.append(StreamAppend("vm-dropped", 0, events(1))) == [2]
    finally:
        await store.close()
