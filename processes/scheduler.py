"""The scheduler process manager: places requested VMs on hosts with room.

It follows the log, keeps its own view of hosts and of VMs waiting for a host, and
for each ``vm.requested`` appends ``vm.scheduled`` + ``host.capacity_claimed`` in one
append with its tracking position (exactly-once). Several schedulers may run: the
host stream's optimistic concurrency means a stale one loses and retries, and a VM
placed by one is a no-op for the others. It also releases a deleted VM's capacity
and retries unschedulable VMs when a host is added or capacity is freed.

Throughput (docs/performance.md, scheduler benchmark): the view knows every host's and
VM's stream version, so a decision is appended at those versions without reading the
streams first; and the events that arrived together are decided together and appended
in one transaction with the tracking position of the last one. If that transaction
conflicts (another scheduler, a deletion) or the domain refuses a decision, nothing is
written and the same events are handled again one at a time, each on fresh state where
its own append conflicts. The host stream's version stays the only guard against
overbooking.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast
from uuid import UUID

import msgspec

from ucloud.commands.aggregates import HOST
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor, Loaded, Outcome
from ucloud.domain import host as host_domain
from ucloud.domain import vm as vm_domain
from ucloud.domain.errors import DomainError, NotFound, Rejected
from ucloud.domain.events import Event, tag_of
from ucloud.eventstore.errors import ConflictError, InvalidAppend, TrackingConflict
from ucloud.eventstore.records import EventRecord, Tracking
from ucloud.projections.views import HostsView, VmsView

from .framework import ProcessManager, ProcessRunner
from .placement import Needs, NoRoom, Placed, Strategy, place

log = logging.getLogger(__name__)

# Every event of the VM and host streams: the scheduler's view then knows each stream's
# exact version, and places at those versions without reading the streams again.
_WATCHED = frozenset(tag_of(t) for t in (*vm_domain.VM_EVENT_TYPES, *host_domain.HOST_EVENT_TYPES))
# Events that may make room for VMs that found none.
_ROOM_MADE = (host_domain.HostRegistered, host_domain.HostCapacityChanged, host_domain.CapacityReleased,
              host_domain.HostStoresDeclared, host_domain.ClaimChanged, host_domain.HostUp,
              host_domain.HostMaintenanceChanged)
_ACTIONS = frozenset({"vm.requested", "vm.deleted", "vm.host_lost", "vm.start_requested",
                      "host.declared_dead", "host.evacuation_requested"})
# VMs are moved off a lost host in appends of at most this many (each VM: two streams).
_EVICT_BATCH = 16
_WAITING = (vm_domain.Status.REQUESTED, vm_domain.Status.UNSCHEDULABLE)


@dataclass
class _Plan:
    """Decisions over a run of events, and how to take them back from the view."""

    releases: list[tuple[UUID, UUID]] = field(default_factory=list)
    placements: list[tuple[UUID, UUID]] = field(default_factory=list)
    unschedulable: list[tuple[UUID, str]] = field(default_factory=list)
    known: dict[str, Loaded[Any]] = field(default_factory=dict)
    saved: dict[UUID, host_domain.Host] = field(default_factory=dict)  # hosts before the plan

    def __len__(self) -> int:
        return len(self.releases) + len(self.placements) + len(self.unschedulable)


_ENCODE = msgspec.msgpack.Encoder().encode
_VERSIONS = msgspec.msgpack.Decoder(dict[UUID, int])


class Scheduler(ProcessManager):
    name = "scheduler"  # stable: its tracking key and snapshot, whichever instance runs it
    interested_in = _WATCHED
    snapshot_schema = 3  # 2: its VMs view dumps its rows as one msgpack blob; 3: its hosts view too

    def __init__(
        self,
        commands: CommandService,
        *,
        instance: str | None = None,
        strategy: Strategy = Strategy.SPREAD,
        max_attempts: int = 20,
        max_batch: int = 64,
    ) -> None:
        """``max_batch``: at most this many decisions per transaction (halved when the
        backend finds a transaction too large)."""
        self.commands = commands
        self.store = commands.store
        self.codec = commands.codec
        self.overcommit = commands.overcommit
        self.strategy = strategy
        self.instance = instance or uuid.uuid4().hex[:8]
        self.consumer = self.name
        self.actor = Actor(f"scheduler-{self.instance}", "ucloud-system", is_admin=True)
        self.hosts = HostsView()
        self.vms = VmsView()
        self.vm_versions: dict[UUID, int] = {}
        self.max_attempts = max_attempts
        self.max_batch = max_batch
        self.position = 0
        self.tracked = 0
        self.placed = 0
        self.unschedulable = 0
        self.batches = 0  # transactions that carried a run of decisions
        self.fallbacks = 0  # runs handled again one event at a time

    async def run(self) -> None:
        """Follow the log forever on the process framework, without election (tests and
        single-process stacks; `ucloud processes` runs it under a leader lease)."""
        await ProcessRunner(self, self.store, instance=self.instance).run()

    def dump(self) -> Any:
        # The versions as one msgpack blob, read back by a typed decoder (see VmsView.dump).
        return {"hosts": self.hosts.dump(), "vms": self.vms.dump(),
                "vm_versions": _ENCODE(self.vm_versions), "position": self.position}

    def load(self, data: Any) -> None:
        self.hosts.load(data["hosts"])
        self.vms.load(data["vms"])
        versions = data["vm_versions"]  # a blob; a dict of str keys in schema 1
        self.vm_versions = (_VERSIONS.decode(versions) if isinstance(versions, bytes)
                            else {UUID(k): v for k, v in versions.items()})
        self.position = data["position"]

    def _take_run(self, records: list[EventRecord]) -> tuple[list[EventRecord], list[EventRecord]]:
        """The longest prefix with at most max_batch events that ask for a decision."""
        actions = 0
        for index, record in enumerate(records):
            if record.type in _ACTIONS and record.position > self.tracked:
                actions += 1
                if actions > self.max_batch:
                    return records[:index], records[index:]
        return records, []

    async def handle(self, record: EventRecord) -> None:
        """One event: fold it into the view and act on it (see handle_run)."""
        await self.handle_run([record])

    async def handle_run(self, records: list[EventRecord]) -> None:
        """Fold a run of events into the view, then act on those after the tracked
        position: all of them in one transaction if it succeeds, else one at a time;
        a long run in pieces of at most max_batch decisions."""
        while records:
            run, records = self._take_run(records)
            await self._handle_piece(run)

    async def _handle_piece(self, records: list[EventRecord]) -> None:
        fresh: list[tuple[EventRecord, Event]] = []
        for record in records:
            event = self.codec.decode(record.type, record.schema, record.data)
            self._fold(record, event)
            if record.position > self.tracked:
                fresh.append((record, event))
        if not fresh:
            return
        if len(fresh) > 1 and await self._decide_run(fresh):
            return
        for record, event in fresh:
            await self._handle_one(record, event)

    def _fold(self, record: EventRecord, event: Event) -> None:
        self.position = record.position
        if isinstance(event, host_domain.HOST_EVENT_TYPES):
            # Our own claims are in the view since they were appended: skip them by version.
            if record.version > self.hosts.versions.get(cast(host_domain.HostEvent, event).host_id, 0):
                self.hosts.apply(record, event)
        elif isinstance(event, vm_domain.VM_EVENT_TYPES):
            self.vms.apply(record, event)
            self.vm_versions[cast(vm_domain.VmEvent, event).vm_id] = record.version

    # -- a run of events in one transaction ---------------------------------------------

    async def _decide_run(self, fresh: list[tuple[EventRecord, Event]]) -> bool:
        """True if the run's decisions were appended (or there were none)."""
        plan = self._plan(event for _, event in fresh)
        last = fresh[-1][0].position
        if plan is None:
            return False
        if not plan:
            self.tracked = max(self.tracked, last)  # nothing to do: nothing to record
            return True
        try:
            outcome = await self.commands.schedule(
                self.actor, releases=plan.releases, placements=plan.placements, unschedulable=plan.unschedulable,
                tracking=Tracking(self.consumer, last), known=plan.known)
        except InvalidAppend:
            self._undo(plan)
            self.max_batch = max(1, self.max_batch // 2)
            log.info("a run of %d decisions is too large for one transaction; runs of %d from now",
                     len(plan), self.max_batch)
            return False
        except (ConflictError, DomainError):
            self._undo(plan)
            self.fallbacks += 1
            return False
        except BaseException:
            self._undo(plan)
            raise
        self.batches += 1
        self.placed += len(plan.placements)
        self.unschedulable += len(plan.unschedulable)
        self.tracked = max(self.tracked, last)
        for stream, version in outcome.versions.items():
            if stream.startswith("host-"):
                self.hosts.versions[UUID(stream[len("host-"):])] = version
        return True

    def _plan(self, events: Iterable[Event]) -> _Plan | None:
        """Decide on the view, writing each decision into it so the next one sees it;
        None if the run is not one for a single transaction (the caller goes one by one)."""
        plan = _Plan()
        to_place: list[UUID] = []
        recheck = False
        for event in events:
            match event:
                case vm_domain.VmRequested():
                    to_place.append(event.vm_id)
                case vm_domain.VmUnschedulable() | vm_domain.VmHostLost() | vm_domain.VmStartRequested():
                    to_place.append(event.vm_id)  # room may have appeared; or it lost its host
                case host_domain.HostDeclaredDead() | host_domain.HostEvacuationRequested():
                    self._undo(plan)
                    return None  # evictions go one event at a time (see _react)
                case vm_domain.VmDeleted() if event.host_id is not None:
                    host = self.hosts.by_id.get(event.host_id)
                    if host is not None and event.vm_id in host.claims:
                        self._remember(plan, event.host_id)
                        plan.releases.append((event.host_id, event.vm_id))
                        self._write(event.host_id, host_domain.CapacityReleased(host_id=event.host_id,
                                                                                vm_id=event.vm_id))
                case _ if isinstance(event, _ROOM_MADE):
                    recheck = True
        if recheck or plan.releases:
            to_place.extend(sorted((r.vm.id for r in self.vms.by_id.values()
                                    if r.vm.status is vm_domain.Status.UNSCHEDULABLE), key=str))
        seen: set[UUID] = set()
        for vm_id in to_place:
            vm = self.vms.get(vm_id)
            if vm_id in seen or vm is None or vm.status not in _WAITING:
                continue
            seen.add(vm_id)
            if len(plan) >= 2 * self.max_batch:
                self._undo(plan)
                return None
            decision = place(self._candidates(), Needs(vm.cores, vm.ram, vm.disk),
                             overcommit=self.overcommit, strategy=self.strategy, store=vm.image_store)
            if isinstance(decision, NoRoom):
                decision = self._explain(decision)
                if vm.status is vm_domain.Status.REQUESTED:
                    plan.known[vm_domain.stream_name(vm_id)] = Loaded(vm, self.vm_versions.get(vm_id, 0), 0)
                    plan.unschedulable.append((vm_id, decision.reason))
                continue
            assert isinstance(decision, Placed)
            host_id = decision.host_id
            self._remember(plan, host_id)
            plan.known[vm_domain.stream_name(vm_id)] = Loaded(vm, self.vm_versions.get(vm_id, 0), 0)
            plan.placements.append((vm_id, host_id))
            self._write(host_id, host_domain.CapacityClaimed(host_id=host_id, vm_id=vm_id, cores=vm.cores,
                                                            ram=vm.ram, disk=vm.disk))
        return plan

    def _remember(self, plan: _Plan, host_id: UUID) -> None:
        if host_id not in plan.saved:
            host = self.hosts.by_id[host_id]
            plan.saved[host_id] = host
            plan.known[host_domain.stream_name(host_id)] = Loaded(host, self.hosts.versions.get(host_id, 0), 0)

    def _write(self, host_id: UUID, event: Event) -> None:
        host = host_domain.evolve(self.hosts.by_id[host_id], event)
        assert host is not None
        self.hosts.by_id[host_id] = host

    def _undo(self, plan: _Plan) -> None:
        self.hosts.by_id.update(plan.saved)

    # -- one event at a time --------------------------------------------------------------

    async def _handle_one(self, record: EventRecord, event: Event) -> None:
        tracking = Tracking(self.consumer, record.position)
        try:
            await self._react(event, tracking)
        except TrackingConflict as conflict:
            # Another instance with our name got there: skip what it already did.
            self.tracked = conflict.recorded
            return
        self.tracked = max(self.tracked, record.position)

    async def _react(self, event: Event, tracking: Tracking) -> None:
        match event:
            case vm_domain.VmRequested():
                await self._place(event.vm_id, tracking)
            case vm_domain.VmUnschedulable():
                await self._place(event.vm_id, None)  # room may have appeared while it was decided
            case vm_domain.VmHostLost() | vm_domain.VmStartRequested():
                await self._place(event.vm_id, tracking)
            case host_domain.HostDeclaredDead():
                await self._evict(event.host_id, f"its host was declared dead: {event.evidence}", tracking)
            case host_domain.HostEvacuationRequested():
                host = self.hosts.by_id.get(event.host_id)
                if host is not None and host.status is host_domain.HostStatus.UP:
                    # Its agent stops the guests first, then moves the VMs (hostagent/agent.py):
                    # a live host's guests must be gone before they start elsewhere.
                    await self.store.append(tracking=tracking)
                else:
                    await self._evict(event.host_id, "its host was evacuated", tracking, evacuated=True)
            case vm_domain.VmDeleted() if event.host_id is not None:
                outcome = await self.commands.release_capacity(self.actor, event.host_id, event.vm_id,
                                                               tracking=tracking)
                if outcome.events:
                    await self._refresh_host(event.host_id)
            case _ if isinstance(event, _ROOM_MADE):
                waiting = [r.vm.id for r in self.vms.by_id.values() if r.vm.status is vm_domain.Status.UNSCHEDULABLE]
                for vm_id in sorted(waiting, key=str):
                    await self._place(vm_id, None)

    def _candidates(self) -> list[host_domain.Host]:
        """Hosts that take placements: their agent is up and they are not in maintenance."""
        return [host for host in self.hosts.by_id.values() if host.schedulable]

    def _explain(self, decision: NoRoom) -> NoRoom:
        """When no host takes placements at all, say which hosts there are and why."""
        if not self.hosts.by_id or any(host.schedulable for host in self.hosts.by_id.values()):
            return decision
        states: dict[str, list[str]] = {}
        for host in sorted(self.hosts.by_id.values(), key=lambda h: h.hostname):
            states.setdefault(host_domain.display_status(host), []).append(host.hostname)
        listed = "; ".join(f"{state}: {', '.join(names[:5])}{' …' if len(names) > 5 else ''}"
                           for state, names in sorted(states.items()))
        return NoRoom(f"no host takes placements (only hosts whose agent is up and that are not in "
                      f"maintenance do): {listed}")

    async def _evict(self, host_id: UUID, reason: str, tracking: Tracking, *, evacuated: bool = False) -> None:
        """Move every VM off a lost (or evacuated) host: vm.host_lost and the claim
        released, in appends of _EVICT_BATCH VMs; the last carries the tracking position,
        so a restart in between evicts the rest (an evicted VM is skipped)."""
        host = self.hosts.by_id.get(host_id)
        vm_ids = sorted(host.claims, key=str) if host is not None else []
        batches = [vm_ids[i:i + _EVICT_BATCH] for i in range(0, len(vm_ids), _EVICT_BATCH)] or [[]]
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1
            if not batch and not evacuated:
                await self.store.append(tracking=tracking)
                continue
            await self.commands.evict(self.actor, host_id, batch, reason, tracking=tracking if last else None,
                                      evacuated=evacuated and last)
        if vm_ids:
            log.warning("moved %d VM(s) off host %s: %s", len(vm_ids), host_id, reason)
            await self._refresh_host(host_id)

    async def _place(self, vm_id: UUID, tracking: Tracking | None) -> None:
        vm = self.vms.get(vm_id)
        if vm is None or vm.status not in _WAITING:
            return
        needs = Needs(vm.cores, vm.ram, vm.disk)
        vm_stream = vm_domain.stream_name(vm_id)
        known_vm = Loaded(vm, self.vm_versions.get(vm_id, 0), 0)
        for _ in range(self.max_attempts):
            decision = place(self._candidates(), needs, overcommit=self.overcommit, strategy=self.strategy,
                             store=vm.image_store)
            if isinstance(decision, NoRoom):
                decision = self._explain(decision)
                if vm.status is vm_domain.Status.REQUESTED:
                    await self.commands.mark_unschedulable(self.actor, vm_id, decision.reason, tracking=tracking,
                                                           known={vm_stream: known_vm})
                    self.unschedulable += 1
                elif tracking is not None:
                    await self.store.append(tracking=tracking)
                return
            assert isinstance(decision, Placed)
            host_id = decision.host_id
            host = self.hosts.by_id[host_id]
            host_stream = host_domain.stream_name(host_id)
            host_version = self.hosts.versions.get(host_id, 0)
            # Decide on our view at its versions, without reading the streams: if the view
            # is stale the append conflicts and place_vm decides again on fresh state; the
            # host stream's version stays the guard against overbooking.
            known: dict[str, Loaded[Any]] = {vm_stream: known_vm, host_stream: Loaded(host, host_version, 0)}
            try:
                outcome = await self.commands.place_vm(self.actor, vm_id, host_id, tracking=tracking, known=known)
            except (Rejected, NotFound):
                # Our view of that host was stale and it is full (or gone): refresh it and choose again.
                await self._refresh_host(host_id)
                continue
            if outcome.events:
                self.placed += 1
                if not self._claimed(host_id, host_version, outcome):
                    await self._refresh_host(host_id)
            return
        log.warning("gave up placing VM %s after %d attempts", vm_id, self.max_attempts)

    def _claimed(self, host_id: UUID, version: int, outcome: Outcome[None]) -> bool:
        """Put our own claim into the view at once (the log brings it back later and is
        then skipped by version), so the next placement sees this host as it is now.
        False if the view is behind (the claim was decided on fresh state after a
        conflict, on top of others' events): the caller refreshes the host instead."""
        new_version = outcome.versions.get(host_domain.stream_name(host_id))
        host = self.hosts.by_id.get(host_id)
        if host is None or new_version != version + 1 or self.hosts.versions.get(host_id) != version:
            return False
        for event in outcome.events:
            if isinstance(event, host_domain.CapacityClaimed):
                host = host_domain.evolve(host, event)
        assert host is not None
        self.hosts.by_id[host_id] = host
        self.hosts.versions[host_id] = new_version
        return True

    async def _refresh_host(self, host_id: UUID) -> None:
        loaded = await self.commands.repository.load(HOST, host_domain.stream_name(host_id))
        if loaded.state is None:
            self.hosts.by_id.pop(host_id, None)
            self.hosts.versions.pop(host_id, None)
        else:
            self.hosts.by_id[host_id] = loaded.state
            self.hosts.versions[host_id] = loaded.version
