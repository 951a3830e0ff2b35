"""The scheduler process manager: places requested VMs on hosts with room.

It follows the log, keeps its own view of hosts and of VMs waiting for a host, and
for each ``vm.requested`` appends ``vm.scheduled`` + ``host.capacity_claimed`` in one
append with its tracking position (exactly-once). Several schedulers may run: the
host stream's optimistic concurrency means a stale one loses and retries, and a VM
placed by one is a no-op for the others. It also releases a deleted VM's capacity
and retries unschedulable VMs when a host is added or capacity is freed.
"""

from __future__ import annotations

import logging
import uuid
from uuid import UUID

from ucloud.commands.aggregates import HOST
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.domain import host as host_domain
from ucloud.domain import vm as vm_domain
from ucloud.domain.errors import NotFound, Rejected
from ucloud.domain.events import Event
from ucloud.eventstore.errors import TrackingConflict
from ucloud.eventstore.records import EventRecord, Tracking
from ucloud.projections.views import HostsView, VmsView

from .placement import Needs, NoRoom, Placed, Strategy, place

log = logging.getLogger(__name__)

_WATCHED = frozenset({
    "vm.requested", "vm.scheduled", "vm.unschedulable", "vm.deleted",
    "host.registered", "host.capacity_changed", "host.capacity_claimed", "host.capacity_released",
})


class Scheduler:
    def __init__(
        self,
        commands: CommandService,
        *,
        instance: str | None = None,
        strategy: Strategy = Strategy.SPREAD,
        max_attempts: int = 20,
    ) -> None:
        self.commands = commands
        self.store = commands.store
        self.codec = commands.codec
        self.overcommit = commands.overcommit
        self.strategy = strategy
        self.instance = instance or uuid.uuid4().hex[:8]
        self.consumer = f"scheduler-{self.instance}"
        self.actor = Actor(self.consumer, "ucloud-system", is_admin=True)
        self.hosts = HostsView()
        self.vms = VmsView()
        self.max_attempts = max_attempts
        self.position = 0
        self.tracked = 0
        self.placed = 0
        self.unschedulable = 0

    async def run(self) -> None:
        """Follow the log forever. The view is rebuilt from the start of the log; only
        events after the tracked position are acted upon."""
        self.tracked = await self.store.tracked_position(self.consumer)
        async for record in self.store.subscribe(0, types=_WATCHED):
            await self.handle(record)

    async def handle(self, record: EventRecord) -> None:
        event = self.codec.decode(record.type, record.schema, record.data)
        self.hosts.apply(record, event)
        self.vms.apply(record, event)
        self.position = record.position
        if record.position <= self.tracked:
            return
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
            case vm_domain.VmDeleted() if event.host_id is not None:
                await self.commands.release_capacity(self.actor, event.host_id, event.vm_id, tracking=tracking)
            case host_domain.HostRegistered() | host_domain.HostCapacityChanged() | host_domain.CapacityReleased():
                waiting = [r.vm.id for r in self.vms.by_id.values() if r.vm.status is vm_domain.Status.UNSCHEDULABLE]
                for vm_id in sorted(waiting, key=str):
                    await self._place(vm_id, None)

    async def _place(self, vm_id: UUID, tracking: Tracking | None) -> None:
        vm = self.vms.get(vm_id)
        if vm is None or vm.status not in (vm_domain.Status.REQUESTED, vm_domain.Status.UNSCHEDULABLE):
            return
        needs = Needs(vm.cores, vm.ram, vm.disk)
        for _ in range(self.max_attempts):
            decision = place(self.hosts.by_id.values(), needs, overcommit=self.overcommit, strategy=self.strategy)
            if isinstance(decision, NoRoom):
                if vm.status is vm_domain.Status.REQUESTED:
                    await self.commands.mark_unschedulable(self.actor, vm_id, decision.reason, tracking=tracking)
                    self.unschedulable += 1
                elif tracking is not None:
                    await self.store.append(tracking=tracking)
                return
            assert isinstance(decision, Placed)
            try:
                outcome = await self.commands.place_vm(self.actor, vm_id, decision.host_id, tracking=tracking)
            except Rejected:
                # Our view of that host was stale and it is full: refresh it and choose again.
                await self._refresh_host(decision.host_id)
                continue
            except NotFound:
                await self._refresh_host(decision.host_id)
                continue
            if outcome.events:
                self.placed += 1
            return
        log.warning("gave up placing VM %s after %d attempts", vm_id, self.max_attempts)

    async def _refresh_host(self, host_id: UUID) -> None:
        loaded = await self.commands.repository.load(HOST, host_domain.stream_name(host_id))
        if loaded.state is None:
            self.hosts.by_id.pop(host_id, None)
        else:
            self.hosts.by_id[host_id] = loaded.state
