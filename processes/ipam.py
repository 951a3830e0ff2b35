"""The IPAM allocator, a process manager: VNIs and /64s for networks, MACs for NICs.

It follows the log and keeps a view of every value in use (the ``ipam.claimed`` and
``ipam.released`` events of the claim streams) and of every NIC. For each event after
its tracked position it decides and appends, with its tracking position in the same
append (exactly-once):

- ``network.requested``: the lowest free VNI after the last one given and, for the IPAM
  kinds, the next free /64 of the pool -> ``network.allocated`` + the claims; an exhausted
  pool -> ``network.allocation_failed`` naming the pool;
- ``vm.nic_added``: a random locally administered MAC -> ``vm.nic_allocated`` + its claim;
- ``network.deleted``, ``vm.nic_removed``, ``vm.deleted``: the claims are released, and a
  deleted VM's NICs leave their networks (``network.port_removed``).

It runs on the shared process-manager framework (processes/framework.py): leader lease
``pm-ipam-allocator``, its view restored from its own snapshot, the log from there.

The view only proposes: the claim stream of each value is appended to at the version the
command handler read, so a value held by anyone (another allocator, a stale view) is
refused (``Taken``) and the allocator marks it used and picks again. The pool is recorded
in the log (``ipam.pool_configured``): a ULA /48 generated at the first start, or the
operator's ``--ipv6-pool``.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import msgspec

from ucloud.commands.aggregates import VM
from ucloud.commands.networks import NetworkCommands
from ucloud.commands.unit_of_work import Actor, Outcome, Repository
from ucloud.domain import network as net
from ucloud.domain import vm as vm_domain
from ucloud.domain.events import Event, EventCodec, tag_of
from ucloud.eventstore.errors import TrackingConflict
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.records import EventRecord, Tracking

from .framework import ProcessManager, ProcessRunner

log = logging.getLogger(__name__)

_WATCHED_TYPES: tuple[type[Event], ...] = (
    *net.NETWORK_EVENT_TYPES, *net.IPAM_EVENT_TYPES, vm_domain.VmNicAdded, vm_domain.VmNicAllocated,
    vm_domain.VmNicRemoved, vm_domain.VmDeleted)
_WATCHED = frozenset(tag_of(t) for t in _WATCHED_TYPES)


@dataclass
class _Nic:
    vm_id: UUID
    network_id: UUID
    mac: str = ""


class IpamView:
    """Values in use and who holds them; networks waiting; NICs by VM. Pure folding."""

    def __init__(self) -> None:
        self.pool: str | None = None
        self.held: dict[str, UUID] = {}  # resource -> holder
        self.vnis: set[int] = set()
        self.prefixes: set[str] = set()  # /64s as "addr/64"
        self.macs: set[str] = set()
        self.networks: dict[UUID, net.Network] = {}
        self.nics: dict[UUID, _Nic] = {}
        self.nics_of_vm: dict[UUID, set[UUID]] = {}
        self.last_vni = 0
        self.next_prefix = 0

    def apply(self, event: Event) -> None:
        match event:
            case net.IpamPoolConfigured():
                self.pool = event.pool
                self.next_prefix = 0
            case net.IpamClaimed():
                self._hold(event.resource, event.holder)
            case net.IpamReleased():
                if self.held.get(event.resource) == event.holder:
                    self._free(event.resource)
            case vm_domain.VmNicAdded():
                self.nics[event.nic_id] = _Nic(event.vm_id, event.network_id)
                self.nics_of_vm.setdefault(event.vm_id, set()).add(event.nic_id)
            case vm_domain.VmNicAllocated():
                if event.nic_id in self.nics:
                    self.nics[event.nic_id].mac = event.mac
            case vm_domain.VmNicRemoved():
                self.nics.pop(event.nic_id, None)
                self.nics_of_vm.get(event.vm_id, set()).discard(event.nic_id)
            case vm_domain.VmDeleted():
                for nic_id in self.nics_of_vm.pop(event.vm_id, set()):
                    self.nics.pop(nic_id, None)
            case _ if isinstance(event, net.NETWORK_EVENT_TYPES):
                network_id: UUID = event.network_id  # type: ignore[attr-defined]
                state = net.evolve(self.networks.get(network_id), event)
                if state is not None:
                    self.networks[network_id] = state

    def _hold(self, resource: str, holder: UUID) -> None:
        self.held[resource] = holder
        kind, _, value = resource.partition(":")
        if kind == "vni":
            self.vnis.add(int(value))
        elif kind == "prefix":
            self.prefixes.add(value + "/64")
        elif kind == "mac":
            self.macs.add(value)

    def _free(self, resource: str) -> None:
        self.held.pop(resource, None)
        kind, _, value = resource.partition(":")
        if kind == "vni":
            self.vnis.discard(int(value))
        elif kind == "prefix":
            self.prefixes.discard(value + "/64")
        elif kind == "mac":
            self.macs.discard(value)

    def dump(self) -> Any:
        return {
            "pool": self.pool, "held": {r: str(h) for r, h in self.held.items()},
            "networks": [msgspec.to_builtins(n) for n in self.networks.values()],
            "nics": {str(k): [str(n.vm_id), str(n.network_id), n.mac] for k, n in self.nics.items()},
            "last_vni": self.last_vni, "next_prefix": self.next_prefix,
        }

    def load(self, data: Any) -> None:
        self.__init__()  # type: ignore[misc]
        self.pool = data["pool"]
        for resource, holder in data["held"].items():
            self._hold(resource, UUID(holder))
        for raw in data["networks"]:
            network = msgspec.convert(raw, net.Network)
            self.networks[network.id] = network
        for nic_id, (vm_id, network_id, mac) in data["nics"].items():
            self.nics[UUID(nic_id)] = _Nic(UUID(vm_id), UUID(network_id), mac)
            self.nics_of_vm.setdefault(UUID(vm_id), set()).add(UUID(nic_id))
        self.last_vni, self.next_prefix = data["last_vni"], data["next_prefix"]

    def held_by(self, holder: UUID) -> list[str]:
        return sorted(r for r, h in self.held.items() if h == holder)

    # -- proposals (the claim streams decide) ------------------------------------------------

    def propose_vni(self) -> int | None:
        span = net.VNI_MAX - net.VNI_MIN + 1
        if len(self.vnis) >= span:
            return None
        vni = self.last_vni
        for _ in range(span):
            vni = vni + 1 if vni < net.VNI_MAX else net.VNI_MIN
            if vni not in self.vnis:
                return vni
        return None  # pragma: no cover - the count above says one is free

    def propose_prefix(self) -> str | None:
        if self.pool is None:
            return None
        size = net.prefixes_in(self.pool)
        in_pool = sum(1 for p in self.prefixes if net.prefix_index(self.pool, p) is not None)
        if in_pool >= size:
            return None
        index = self.next_prefix
        for _ in range(size):
            index = index % size
            prefix = net.nth_prefix(self.pool, index)
            index += 1
            if prefix not in self.prefixes:
                self.next_prefix = index
                return prefix
        return None  # pragma: no cover

    def propose_mac(self) -> str:
        while True:
            mac = net.mac_from_int(secrets.randbits(48))
            if mac not in self.macs:
                return mac


class IpamAllocator(ProcessManager):
    """The process manager around IpamView. ``consumer`` (its name) is stable: two
    allocators with the same name share one tracking position and one leader lease (the
    second waits, or skips what the first did); allocators with different names both act,
    and the claim streams keep them apart."""

    interested_in = _WATCHED

    def __init__(self, store: EventStore, codec: EventCodec, *, pool: str | None = None,
                 consumer: str = "ipam-allocator", max_attempts: int = 64) -> None:
        self.store = store
        self.codec = codec
        self.commands = NetworkCommands(Repository(store, codec))
        self.configured_pool = str(net.check_pool(pool)) if pool is not None else None
        self.consumer = self.name = consumer
        self._pool_ready = False
        self.actor = Actor(consumer, "ucloud-system", is_admin=True)
        self.view = IpamView()
        self.tracked = 0
        self.max_attempts = max_attempts
        self.allocated = 0

    async def setup(self) -> str:
        """Record the pool (the configured one, or a ULA /48 generated now if the log has none)."""
        if self.configured_pool is not None:
            outcome = await self.commands.configure_pool(self.actor, self.configured_pool)
        else:
            outcome = await self.commands.ensure_pool(self.actor, net.ula_pool(secrets.randbits(40)))
        self.view.pool = outcome.result
        self._pool_ready = True
        return outcome.result

    async def run(self) -> None:
        """Alone, without a leader lease (tests; `ucloud processes` runs it with one)."""
        await ProcessRunner(self, self.store).run()

    def on_lead(self) -> None:
        self._pool_ready = False  # a new leader checks the pool once more

    async def handle_run(self, records: list[EventRecord]) -> None:
        if not self._pool_ready:
            await self.setup()
        for record in records:
            await self.handle(record)

    def dump(self) -> Any:
        return self.view.dump()

    def load(self, data: Any) -> None:
        self.view.load(data)

    async def handle(self, record: EventRecord) -> None:
        event = self.codec.decode(record.type, record.schema, record.data)
        self.view.apply(event)
        if record.position <= self.tracked:
            return
        tracking = Tracking(self.consumer, record.position)
        try:
            await self._react(event, tracking)
        except TrackingConflict as conflict:
            self.tracked = conflict.recorded  # another instance of our name did it
            return
        self.tracked = record.position

    async def _react(self, event: Event, tracking: Tracking) -> None:
        match event:
            case net.NetworkRequested():
                await self._allocate_network(event, tracking)
            case vm_domain.VmNicAdded():
                await self._allocate_nic(event, tracking)
            case net.NetworkDeleted():
                claims = [(r, event.network_id) for r in self.view.held_by(event.network_id)]
                self._learn(await self.commands.release(self.actor, claims=claims, tracking=tracking))
            case vm_domain.VmNicRemoved():
                claims = [(r, event.nic_id) for r in self.view.held_by(event.nic_id)]
                self._learn(await self.commands.release(self.actor, claims=claims, tracking=tracking))
            case vm_domain.VmDeleted():
                await self._release_vm(event.vm_id, tracking)
            case _:
                await self.store.append(tracking=tracking)

    async def _allocate_network(self, event: net.NetworkRequested, tracking: Tracking) -> None:
        network = self.view.networks.get(event.network_id)
        if network is None or network.status is not net.NetworkStatus.REQUESTED:
            await self.store.append(tracking=tracking)
            return
        for _ in range(self.max_attempts):
            vni = self.view.propose_vni()
            if vni is None:
                await self.commands.fail_network(self.actor, event.network_id, "no VNI is free", tracking)
                return
            prefix = ""
            if event.ipam is not net.Ipam.NONE:
                proposed = self.view.propose_prefix()
                if proposed is None:
                    reason = (f"the IPv6 pool {self.view.pool} has no free /64 "
                              f"({net.prefixes_in(self.view.pool)} in use)" if self.view.pool
                              else "no IPv6 pool is configured")
                    await self.commands.fail_network(self.actor, event.network_id, reason, tracking)
                    return
                prefix = proposed
            try:
                outcome = await self.commands.allocate_network(self.actor, event.network_id, vni, prefix, tracking)
            except net.Taken:
                # Someone holds one of them that our view did not show yet: mark both and pick again.
                self.view.vnis.add(vni)
                if prefix:
                    self.view.prefixes.add(prefix)
                continue
            self.view.last_vni = vni
            self._learn(outcome)
            self.allocated += 1
            return
        await self.commands.fail_network(self.actor, event.network_id,
                                         f"no free VNI or /64 found in {self.max_attempts} attempts", tracking)

    async def _allocate_nic(self, event: vm_domain.VmNicAdded, tracking: Tracking) -> None:
        nic = self.view.nics.get(event.nic_id)
        if nic is None or nic.mac:
            await self.store.append(tracking=tracking)
            return
        for _ in range(self.max_attempts):
            mac = self.view.propose_mac()
            try:
                outcome = await self.commands.allocate_nic(self.actor, event.vm_id, event.nic_id, mac, tracking)
            except net.Taken:
                self.view.macs.add(mac)
                continue
            self._learn(outcome)
            self.allocated += 1
            return
        raise RuntimeError(f"no free MAC found in {self.max_attempts} attempts")  # pragma: no cover

    async def _release_vm(self, vm_id: UUID, tracking: Tracking) -> None:
        """A deleted VM's NICs leave their networks and free their MACs. The view has
        already dropped them (apply ran first), so they are read from the VM's stream."""
        loaded = await self.commands.repository.load(VM, vm_domain.stream_name(vm_id))
        vm = loaded.state
        nics = vm.nics if vm is not None else ()
        claims = [(r, nic.id) for nic in nics for r in self.view.held_by(nic.id)]
        ports = [(nic.network_id, vm_id, nic.id) for nic in nics]
        self._learn(await self.commands.release(self.actor, claims=claims, ports=ports, tracking=tracking))

    def _learn(self, outcome: Outcome[None]) -> None:
        """Our own appends enter the view at once, before the log brings them back (folding
        them again then changes nothing)."""
        for event in outcome.events:
            if isinstance(event, net.IPAM_EVENT_TYPES):
                self.view.apply(event)
