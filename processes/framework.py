"""The one loop every process manager runs in: written once, shared by all.

A process manager is a view and a policy over it (``ProcessManager``): it folds the
events it is interested in, decides with pure code, and appends what it decided with
its tracking position in the same transaction (exactly-once effects). What surrounds it
is here, in ``ProcessRunner``:

- **leadership**: a lease ``pm-<name>`` (eventstore/leases.py). Any number of
  instances run; only the holder acts, the others wait to take over when the lease
  expires. Losing the lease (a renewal refused or late) stops the manager at once. A
  stale leader that wakes up cannot do harm either: its tracking position is behind the
  new leader's, so its appends fail with TrackingConflict and write nothing.
- **restore**: the view from the manager's own snapshot (``process-<name>``, saved with
  the position it holds), then the log from that position only; events up to the
  tracked position are folded, never acted upon again. The name is stable (never
  random), so a restart resumes where the last instance stopped and replays nothing.
- **subscribe**: the store's own subscription (catch-up then live, by position, only
  the types the manager wants); what arrived while a run was decided is the next run.
- **ticks**: a manager that watches time as well as the log (the failure detector)
  gets ``tick()`` calls between runs, on the same task, so its view is never touched
  by two coroutines at once.
- **metrics**: events read and handled, errors, position, lag behind the head,
  leadership and take-overs, snapshot saves and failures (``stats()``).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import msgspec

from ucloud.eventstore.errors import DataError, EventStoreError
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.leases import Leases, acquire_when_free, hold
from ucloud.eventstore.records import EventRecord, Snapshot
from ucloud.projections.runner import no_cyclic_gc

log = logging.getLogger(__name__)


class ProcessManager(abc.ABC):
    """A view of the log and a policy over it."""

    name: str  # stable: the tracking key, the snapshot stream and the lease; never random
    interested_in: frozenset[str] | None = None  # event types; None: all
    snapshot_schema: int = 1
    tick_interval: float | None = None  # seconds between tick() calls; None: no ticks
    tracked: int = 0  # the manager's recorded position: events up to it are folded, not acted on

    @abc.abstractmethod
    async def handle_run(self, records: list[EventRecord]) -> None:
        """Fold a run of events into the view and act on those after ``self.tracked``,
        appending with Tracking(self.name, position) (and moving ``self.tracked``)."""

    def on_lead(self) -> None:  # noqa: B027 - optional hook
        """Called when this instance starts acting (at start, after each take-over)."""

    async def tick(self) -> None:  # noqa: B027 - optional hook
        """Called every ``tick_interval`` seconds while leading."""

    @abc.abstractmethod
    def dump(self) -> Any:
        """The view, msgspec-encodable, for snapshots."""

    @abc.abstractmethod
    def load(self, data: Any) -> None:
        """Replace the view with one from a snapshot."""


@dataclass
class RunnerStats:
    name: str
    leader: bool
    position: int
    tracked: int
    lag: int
    read: int
    handled: int
    errors: int
    takeovers: int
    snapshots_saved: int
    snapshot_failures: int


class ProcessRunner:
    def __init__(
        self,
        manager: ProcessManager,
        store: EventStore,
        leases: Leases | None = None,
        *,
        instance: str = "",
        lease_ttl: float = 3.0,
        snapshot_interval: float = 30.0,
        max_run: int = 1000,
    ) -> None:
        """``leases`` None: no election, this instance always acts (tests, one process)."""
        self.manager = manager
        self.store = store
        self.leases = leases
        self.instance = instance or "instance"
        self.lease_ttl = lease_ttl
        self.snapshot_interval = snapshot_interval
        self.max_run = max_run
        self.position = 0  # the last event folded into the view
        self.leader = False
        self.read = 0
        self.handled = 0
        self.errors = 0
        self.takeovers = 0
        self.snapshots_saved = 0
        self.snapshot_failures = 0
        self._snapshot_position = 0
        self._last_snapshot = time.monotonic()
        self._head = 0

    @property
    def lease_name(self) -> str:
        return f"pm-{self.manager.name}"

    @property
    def snapshot_stream(self) -> str:
        return f"process-{self.manager.name}"

    @property
    def snapshot_type(self) -> str:
        return f"process:{self.manager.name}/{self.manager.snapshot_schema}"

    def stats(self) -> RunnerStats:
        return RunnerStats(self.manager.name, self.leader, self.position, self.manager.tracked,
                           max(0, self._head - self.position), self.read, self.handled, self.errors,
                           self.takeovers, self.snapshots_saved, self.snapshot_failures)

    # -- leading ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Wait for the lease, act while holding it, wait again when it is lost. Forever."""
        while True:
            if self.leases is None:
                await self._lead_logged()
                continue
            grant = await acquire_when_free(self.leases, self.lease_name, self.instance, self.lease_ttl)
            self.takeovers += 1
            log.info("%s: %s leads", self.manager.name, self.instance)
            async with hold(self.leases, grant) as held:
                leading = asyncio.create_task(self._lead_logged(), name=f"{self.manager.name}-lead")
                lost = asyncio.create_task(held.lost.wait())
                try:
                    await asyncio.wait((leading, lost), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in (leading, lost):
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                    self.leader = False
            log.warning("%s: %s no longer leads", self.manager.name, self.instance)

    async def _lead_logged(self) -> None:
        try:
            await self.lead()
        except asyncio.CancelledError:
            raise
        except Exception:
            self.errors += 1
            log.exception("%s failed; it resumes from its tracked position", self.manager.name)
            await asyncio.sleep(0.5)

    async def restore(self) -> None:
        """The newest snapshot, unless the view is already at or beyond it."""
        try:
            snapshot = await self.store.load_snapshot(self.snapshot_stream)
        except DataError as error:
            self.snapshot_failures += 1
            log.error("%s: cannot read its snapshot (%s); folding the log instead", self.manager.name, error)
            return
        if snapshot is None or snapshot.type != self.snapshot_type or snapshot.version <= self.position:
            return
        with no_cyclic_gc():
            self.manager.load(msgspec.msgpack.decode(snapshot.state))
        self.position = self._snapshot_position = snapshot.version
        log.info("%s: restored its view at position %d", self.manager.name, self.position)

    async def lead(self) -> None:
        """Restore, then follow the log and act, until cancelled."""
        await self.restore()
        self.manager.on_lead()
        self.manager.tracked = max(self.manager.tracked, await self.store.tracked_position(self.manager.name))
        self.leader = True
        queue: asyncio.Queue[EventRecord] = asyncio.Queue(maxsize=10 * self.max_run)
        reader = asyncio.create_task(self._read(queue), name=f"{self.manager.name}-reader")
        interval = self.manager.tick_interval
        next_tick = time.monotonic()
        get: asyncio.Future[EventRecord] | None = None
        try:
            while True:
                run: list[EventRecord] = []
                if queue.empty():
                    get = asyncio.ensure_future(queue.get())
                    timeout = None if interval is None else max(0.0, next_tick - time.monotonic())
                    await asyncio.wait((get, reader), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                    if get.done():
                        run.append(get.result())
                    else:
                        get.cancel()
                        if reader.done():
                            reader.result()  # the subscription failed: raise its error
                            raise RuntimeError("the log subscription ended")
                    get = None
                while not queue.empty() and len(run) < self.max_run:
                    run.append(queue.get_nowait())
                if run:
                    await self.manager.handle_run(run)
                    self.position = run[-1].position
                    self.handled += len(run)
                if interval is not None and time.monotonic() >= next_tick:
                    await self.manager.tick()
                    next_tick = time.monotonic() + interval
                if time.monotonic() - self._last_snapshot > self.snapshot_interval:
                    await self.save_snapshot()
        finally:
            self.leader = False
            for task in (get, reader):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _read(self, queue: asyncio.Queue[EventRecord]) -> None:
        async for record in self.store.subscribe(self.position, types=self.manager.interested_in):
            self.read += 1
            self._head = max(self._head, record.position)
            await queue.put(record)

    async def save_snapshot(self) -> None:
        """Save the view with the position it holds; a failure is counted and logged,
        and following goes on (the next restart then reads a longer tail)."""
        self._last_snapshot = time.monotonic()
        if self.position == self._snapshot_position:
            return
        position = self.position
        try:
            state = msgspec.msgpack.encode(self.manager.dump())
            await self.store.save_snapshot(Snapshot(stream=self.snapshot_stream, version=position,
                                                    type=self.snapshot_type, state=state))
        except (EventStoreError, OSError, ValueError) as error:
            self.snapshot_failures += 1
            log.error("%s: snapshot at %d failed: %s", self.manager.name, position, error)
            return
        self._snapshot_position = position
        self.snapshots_saved += 1

    async def lag(self) -> int:
        self._head = await self.store.head()
        return max(0, self._head - self.position)


async def lead_while_holding(leases: Leases | None, name: str, instance: str, ttl: float,
                             work: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``work`` only while holding the lease ``pm-<name>``, for a process that keeps
    its own loop (the file scanner, which watches directories rather than the log):
    cancelled when the lease is lost, started again after the next take-over."""
    while True:
        if leases is None:
            await work()
            continue
        grant = await acquire_when_free(leases, f"pm-{name}", instance, ttl)
        async with hold(leases, grant) as held:
            running = asyncio.create_task(work(), name=f"{name}-lead")
            lost = asyncio.create_task(held.lost.wait())
            try:
                await asyncio.wait((running, lost), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (running, lost):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if running.done() and not running.cancelled() and running.exception() is not None:
                log.error("%s failed: %s", name, running.exception())
                await asyncio.sleep(0.5)
