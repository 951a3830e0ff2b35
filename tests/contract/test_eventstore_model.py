"""A random model of the event store: memory, SQLite and etcd driven by the same steps.

A hypothesis state machine appends (one or more streams, right and wrong expected
versions, fresh and stale tracking, now and then a malformed request), races appends to
one stream, and reads (read_all and read_stream windows, stream_version, head,
tracked_position). After every step the three stores must agree exactly: positions,
versions, conflict versus success (and which conflict), and every field of every record
but the time of writing. A small model of stream versions, consumer positions and the
head predicts each append's outcome, so the three cannot agree on a wrong answer either.

Each example gets a fresh SQLite file and a fresh etcd key prefix. The machine is
synchronous; the async stores run on one event loop that each step drives to completion.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from tests.support.etcd import MAX_TXN_OPS, EtcdCluster
from ucloud.eventstore.errors import InvalidAppend, StreamConflict, TrackingConflict
from ucloud.eventstore.etcd import EtcdEventStore
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.memory import MemoryEventStore
from ucloud.eventstore.records import EventRecord, NewEvent, StreamAppend, Tracking
from ucloud.eventstore.sqlite import SqliteEventStore

T = TypeVar("T")

STREAMS = ["vm-0", "vm-1", "host-0", "net-0"]
NEVER_WRITTEN = "vm-never"
CONSUMERS = ["scheduler", "billing"]
TYPES = ["vm.requested", "vm.placed", "host.added"]
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

# An outcome both sides of a comparison can be checked with ==: ("ok", positions) or the
# kind of refusal with what it names.
Outcome = tuple[Any, ...]


class LoopDriver:
    """Runs coroutines to completion on one private event loop, for sync callers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def close(self) -> None:
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()

        async def settle() -> None:
            await asyncio.gather(*pending, return_exceptions=True)

        if pending:  # gather() of nothing looks for a loop of its own on Python 3.11
            self.loop.run_until_complete(settle())
        self.loop.close()


def outcome_of(result: list[int] | BaseException) -> Outcome:
    if isinstance(result, StreamConflict):
        return ("stream conflict", result.stream, result.expected)
    if isinstance(result, TrackingConflict):
        return ("tracking conflict", result.consumer, result.position, result.recorded)
    if isinstance(result, InvalidAppend):
        return ("invalid", str(result))
    if isinstance(result, BaseException):
        raise result
    return ("ok", result)


def timeless(records: list[EventRecord]) -> list[EventRecord]:
    """Records compared field by field, except when each store wrote them."""
    return [msgspec.structs.replace(record, time=EPOCH) for record in records]


new_events = st.lists(
    st.builds(
        NewEvent,
        type=st.sampled_from(TYPES),
        data=st.binary(max_size=24),
        actor=st.sampled_from(["", "alice", "scheduler"]),
        schema=st.integers(1, 3),
        causation_id=st.none() | st.uuids(),
        metadata=st.sampled_from([b"", b'{"originator_version":0}']),
    ),
    min_size=1,
    max_size=3,
)


def make_machine(etcd: EtcdCluster, tmp_path: Path) -> type[RuleBasedStateMachine]:
    class EventStoreModel(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.driver = LoopDriver()
            endpoints = etcd.endpoints
            prefix = f"/model-{uuid.uuid4().hex[:12]}/v1"
            self.stores: dict[str, EventStore] = {
                "memory": MemoryEventStore(),
                "sqlite": SqliteEventStore(tmp_path / f"{uuid.uuid4().hex}.sqlite"),
                "etcd": EtcdEventStore(endpoints, prefix=prefix, max_txn_ops=MAX_TXN_OPS),
            }
            # The model: what a correct store must report.
            self.versions: dict[str, int] = {}
            self.tracked: dict[str, int] = {}
            self.head = 0

        def teardown(self) -> None:
            try:
                for store in self.stores.values():
                    self.driver.run(store.close())
            finally:
                self.driver.close()

        def ask_all(self, question: Callable[[EventStore], Awaitable[T]]) -> T:
            """Ask every store; they must answer the same; return the answer."""

            async def ask(store: EventStore) -> T:
                return await question(store)

            answers = {name: self.driver.run(ask(store)) for name, store in self.stores.items()}
            reference = answers["memory"]
            for name, answer in answers.items():
                assert answer == reference, f"{name} answers {answer!r}, memory {reference!r}"
            return reference

        def append_all(self, appends: list[StreamAppend], tracking: Tracking | None) -> Outcome:
            async def append(store: EventStore) -> Outcome:
                try:
                    return outcome_of(await store.append(*appends, tracking=tracking))
                except (StreamConflict, TrackingConflict, InvalidAppend) as error:
                    return outcome_of(error)

            return self.ask_all(append)

        def predict(self, appends: list[StreamAppend], tracking: Tracking | None) -> str:
            if (not appends and tracking is None) or any(a.expected_version < 0 for a in appends):
                return "invalid"
            if tracking is not None and tracking.position < 1:
                return "invalid"
            if any(a.expected_version != self.versions.get(a.stream, 0) for a in appends):
                return "stream conflict"
            if tracking is not None and tracking.position <= self.tracked.get(tracking.consumer, 0):
                return "tracking conflict"
            return "ok"

        def applied(self, appends: list[StreamAppend], tracking: Tracking | None, positions: list[int]) -> None:
            count = sum(len(a.events) for a in appends)
            assert positions == list(range(self.head + 1, self.head + count + 1))
            self.head += count
            for append in appends:
                self.versions[append.stream] = append.expected_version + len(append.events)
            if tracking is not None:
                self.tracked[tracking.consumer] = tracking.position

        # -- writes ----------------------------------------------------------------

        @rule(data=st.data())
        def append(self, data: st.DataObject) -> None:
            # Mostly requests that should succeed; some conflict; a few are malformed.
            # (The common case comes first: hypothesis draws and shrinks towards it.)
            streams = data.draw(st.lists(st.sampled_from(STREAMS), min_size=1, max_size=3, unique=True), label="streams")
            if data.draw(st.sampled_from(["streams"] * 9 + ["tracking only"]), label="shape") == "tracking only":
                streams = []
            appends = []
            for stream in streams:
                current = self.versions.get(stream, 0)
                expectation = data.draw(st.sampled_from(["right"] * 7 + ["wrong"] * 2 + ["negative"]), label=stream)
                expected = current
                if expectation == "wrong":
                    wrong = [v for v in range(current + 3) if v != current]
                    expected = data.draw(st.sampled_from(wrong), label="wrong")
                elif expectation == "negative":
                    expected = -1
                appends.append(StreamAppend(stream, expected, data.draw(new_events, label=f"events {stream}")))
            tracking = None
            if not appends or data.draw(st.sampled_from([False, False, True]), label="with tracking"):
                consumer = data.draw(st.sampled_from(CONSUMERS), label="consumer")
                recorded = self.tracked.get(consumer, 0)
                position = data.draw(st.integers(recorded + 1, recorded + 5), label="fresh position")
                age = data.draw(st.sampled_from(["fresh"] * 6 + ["stale", "stale", "zero"]), label="age")
                if age == "stale" and recorded > 0:
                    position = data.draw(st.integers(1, recorded), label="stale position")
                elif age == "zero":
                    position = 0
                tracking = Tracking(consumer, position)
            outcome = self.append_all(appends, tracking)
            event(f"append: {outcome[0]}")
            assert outcome[0] == self.predict(appends, tracking), outcome
            if outcome[0] == "ok":
                self.applied(appends, tracking, outcome[1])

        @rule(consumer=st.sampled_from(CONSUMERS), with_events=st.booleans(), data=st.data())
        def track(self, consumer: str, with_events: bool, data: st.DataObject) -> None:
            """A consumer records a position around the one it has: fresh or stale."""
            recorded = self.tracked.get(consumer, 0)
            tracking = Tracking(consumer, data.draw(st.integers(max(1, recorded - 2), recorded + 2), label="position"))
            appends = []
            if with_events:
                stream = data.draw(st.sampled_from(STREAMS), label="stream")
                appends.append(StreamAppend(stream, self.versions.get(stream, 0), data.draw(new_events, label="events")))
            outcome = self.append_all(appends, tracking)
            event(f"track: {outcome[0]}")
            assert outcome[0] == self.predict(appends, tracking), outcome
            if outcome[0] == "ok":
                self.applied(appends, tracking, outcome[1])

        @rule(stream=st.sampled_from(STREAMS), racers=st.lists(new_events, min_size=2, max_size=3))
        def racing_appends(self, stream: str, racers: list[list[NewEvent]]) -> None:
            """Concurrent appends at one expected version: the first wins, the rest conflict."""
            expected = self.versions.get(stream, 0)

            async def race(store: EventStore) -> list[Outcome]:
                results = await asyncio.gather(
                    *(store.append(StreamAppend(stream, expected, events)) for events in racers),
                    return_exceptions=True,
                )
                return [outcome_of(result) for result in results]

            outcomes = self.ask_all(race)
            assert outcomes[0][0] == "ok"
            assert all(o == ("stream conflict", stream, expected) for o in outcomes[1:]), outcomes
            self.applied([StreamAppend(stream, expected, racers[0])], None, outcomes[0][1])

        # -- reads -----------------------------------------------------------------

        @rule(
            after=st.integers(0, 40),
            span=st.none() | st.integers(0, 12),
            limit=st.none() | st.integers(0, 6),
            types=st.none() | st.frozensets(st.sampled_from(TYPES)),
        )
        def read_all(self, after: int, span: int | None, limit: int | None, types: frozenset[str] | None) -> None:
            up_to = None if span is None else after + span

            async def read(store: EventStore) -> list[EventRecord]:
                return timeless(await store.read_all(after, up_to=up_to, limit=limit, types=types))

            records = self.ask_all(read)
            positions = [r.position for r in records]
            assert positions == sorted(positions) and all(after < p <= self.head for p in positions)
            if up_to is not None:
                assert all(p <= up_to for p in positions)
            if types is None and limit is None:
                end = self.head if up_to is None else min(self.head, up_to)  # up_to=0 reads nothing
                assert positions == list(range(after + 1, end + 1))

        @rule(
            stream=st.sampled_from([*STREAMS, NEVER_WRITTEN]),
            after_version=st.integers(0, 8),
            up_to_version=st.none() | st.integers(0, 8),
            limit=st.none() | st.integers(0, 4),
            backwards=st.booleans(),
        )
        def read_stream(
            self, stream: str, after_version: int, up_to_version: int | None, limit: int | None, backwards: bool
        ) -> None:
            async def read(store: EventStore) -> list[EventRecord]:
                return timeless(
                    await store.read_stream(
                        stream,
                        after_version=after_version,
                        up_to_version=up_to_version,
                        limit=limit,
                        backwards=backwards,
                    )
                )

            records = self.ask_all(read)
            versions = [r.version for r in records]
            top = self.versions.get(stream, 0) if up_to_version is None else min(up_to_version, self.versions.get(stream, 0))
            window = list(range(after_version + 1, top + 1))
            if backwards:
                window.reverse()
            assert versions == (window if limit is None else window[:limit])
            assert all(r.stream == stream for r in records)

        @rule(stream=st.sampled_from([*STREAMS, NEVER_WRITTEN]))
        def stream_version(self, stream: str) -> None:
            assert self.ask_all(lambda store: store.stream_version(stream)) == self.versions.get(stream, 0)

        @rule(consumer=st.sampled_from([*CONSUMERS, "never-tracked"]))
        def tracked_position(self, consumer: str) -> None:
            assert self.ask_all(lambda store: store.tracked_position(consumer)) == self.tracked.get(consumer, 0)

        @invariant()
        def heads_agree(self) -> None:
            event(f"head > 10: {self.head > 10}")
            assert self.ask_all(lambda store: store.head()) == self.head

    return EventStoreModel


@pytest.mark.etcd
@pytest.mark.timeout(900)  # passing takes ~10 s; shrinking a failure against etcd can take minutes
def test_memory_sqlite_and_etcd_behave_identically(etcd: EtcdCluster, tmp_path: Path) -> None:
    run_state_machine_as_test(
        make_machine(etcd, tmp_path),
        settings=settings(
            max_examples=40,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
