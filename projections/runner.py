"""Projections: read models folded from the log, restartable from a snapshot.

A ProjectionRunner feeds the events it subscribes to into its projections, keeps the
position it has reached, lets callers wait until a position is reached (read your
own writes), and periodically saves a snapshot of every projection together with
that position, so a restart replays only the tail of the log.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from ucloud.domain.events import Event, EventCodec
from ucloud.eventstore.errors import DataError, EventStoreError
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.notify import Notifier
from ucloud.eventstore.records import EventRecord, Snapshot

log = logging.getLogger(__name__)


@contextlib.contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """The cyclic garbage collector paused, around a snapshot's restore: decoding one makes
    a million objects at once, and the collections they set off scan everything loaded so
    far again and again (more than half of a restore at 100,000 VMs; docs/performance.md,
    "Start-up over 100,000 VMs"). Only around code that does not await, so nothing else
    runs meanwhile; reference counting frees as usual."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Projection(abc.ABC):
    """One read model. ``apply`` must be deterministic and never raise for a recorded event."""

    name: str
    snapshot_schema: int = 1
    # The event types this projection folds; None: every type. The runner decodes an
    # event only if some projection wants it, and calls only those that do.
    handles: frozenset[str] | None = None

    @abc.abstractmethod
    def apply(self, record: EventRecord, event: Event) -> None: ...

    @abc.abstractmethod
    def dump(self) -> Any:
        """A msgspec-encodable picture of the state, for snapshots."""

    @abc.abstractmethod
    def load(self, data: Any) -> None: ...


class ProjectionRunner:
    def __init__(
        self,
        store: EventStore,
        codec: EventCodec,
        projections: list[Projection],
        *,
        name: str = "read-models",
        snapshot_interval: float = 30.0,
    ) -> None:
        self.store = store
        self.codec = codec
        self.projections = projections
        self.name = name
        self.snapshot_interval = snapshot_interval
        self.position = 0
        self._reached = Notifier()
        self._last_snapshot = time.monotonic()
        self._snapshot_position = 0
        self._routes: dict[str, tuple[int, Callable[[bytes], Event], list[Projection]] | None] = {}
        # A snapshot that cannot be saved or read is an error an operator must see
        # (metrics, log), never a reason to stop following or to go back in the log.
        self.snapshot_failures = 0
        self.last_snapshot_error = ""

    @property
    def snapshot_stream(self) -> str:
        return f"projection-{self.name}"

    @property
    def snapshot_type(self) -> str:
        return "projections:" + ",".join(f"{p.name}/{p.snapshot_schema}" for p in self.projections)

    async def restore(self) -> None:
        """Load the newest snapshot, unless the views are already at or beyond it (a
        restart of ``run`` after an outage keeps what it has: it never goes back)."""
        try:
            snapshot = await self.store.load_snapshot(self.snapshot_stream)
        except DataError as error:
            self._snapshot_failed("read", error)
            return  # fold from where we are (the start, on a first run): slower, never wrong
        if snapshot is None or snapshot.type != self.snapshot_type or snapshot.version <= self.position:
            return
        with no_cyclic_gc():
            states = msgspec.msgpack.decode(snapshot.state)
            for projection in self.projections:
                projection.load(states[projection.name])
            del states
        self.position = self._snapshot_position = snapshot.version
        self._reached.notify()  # a wait_for up to here is over (no event may follow for a while)
        log.info("projections %s restored at position %d", self.name, self.position)

    async def save_snapshot(self) -> None:
        """Save every view with the position reached. Raises what the store raises;
        ``run`` records a failure and carries on following."""
        if self.position == self._snapshot_position:
            return
        position = self.position
        state = msgspec.msgpack.encode({p.name: p.dump() for p in self.projections})
        self._last_snapshot = time.monotonic()  # a failed save is tried again an interval later
        await self.store.save_snapshot(Snapshot(
            stream=self.snapshot_stream, version=position, type=self.snapshot_type, state=state))
        self._snapshot_position = position

    async def _save_snapshot_or_record(self) -> None:
        try:
            await self.save_snapshot()
        except (EventStoreError, OSError, ValueError) as error:
            self._snapshot_failed("save", error)

    async def snapshot_if_due(self) -> None:
        """Save a snapshot when the interval has passed (a caller with its own follow loop)."""
        if time.monotonic() - self._last_snapshot > self.snapshot_interval:
            await self._save_snapshot_or_record()

    def _snapshot_failed(self, what: str, error: BaseException) -> None:
        self.snapshot_failures += 1
        self.last_snapshot_error = f"{what}: {error}"
        log.error("projections %s: snapshot %s failed at position %d (%d failures so far): %s",
                  self.name, what, self.position, self.snapshot_failures, error)

    def apply(self, record: EventRecord) -> None:
        route = self._routes.get(record.type)
        if route is None:
            route = self._routes[record.type] = self._route(record.type)
        if route is not None:
            schema, decode, targets = route
            event = decode(record.data) if record.schema == schema else self.codec.decode(
                record.type, record.schema, record.data)
            for projection in targets:
                projection.apply(record, event)
        self.position = record.position

    def _route(self, tag: str) -> tuple[int, Callable[[bytes], Event], list[Projection]] | None:
        """Who folds events of this type, and how to decode them; None: nobody."""
        decoder = self.codec.fast_decoder(tag)
        targets = [p for p in self.projections if p.handles is None or tag in p.handles]
        if decoder is None or not targets:
            return None
        return decoder[0], decoder[1], targets

    async def catch_up(self) -> None:
        """Apply everything up to the current head, then return."""
        head = await self.store.head()
        while self.position < head:
            for record in await self.store.read_all(self.position, up_to=min(head, self.position + 5000)):
                self.apply(record)
        await self.notify()

    async def run(self) -> None:
        """Restore, then follow the log forever (cancel to stop)."""
        await self.restore()
        try:
            async for record in self.store.subscribe(self.position):
                self.apply(record)
                await self.notify()
                if time.monotonic() - self._last_snapshot > self.snapshot_interval:
                    await self._save_snapshot_or_record()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._save_snapshot_or_record())

    async def notify(self) -> None:
        self._reached.notify()

    async def wait_for(self, position: int, timeout: float = 10.0) -> bool:
        """True once the projections include ``position``; False after ``timeout``."""
        return await self._reached.wait_until(lambda: self.position >= position, timeout)

    async def lag(self) -> int:
        """How many events the projections are behind the log."""
        return max(0, await self.store.head() - self.position)
