"""The host agent (ucloud-host): makes this machine match its slice of the log.

It registers the host with its real capacity, follows its slice of the log
(``host-<id>``: the host's events and those of the VMs placed on it) into a VM read
model restored from its own snapshot, and reconciles every VM placed here: start, stop,
reboot, delete, through a hypervisor driver. What it observes (started, stopped,
crashed, failed, deleted) it reports back through its narrow write port (hostagent/
writes.py): the command side in-process, or the gateway with this host's own credential,
which accepts reports only about VMs placed on this host. It never writes to the log.
Restarted, it adopts the guests that are still running instead of starting second
copies: the driver finds them by their run directories, and a VM the driver reports
running is never started again.

Heartbeat and fencing (docs/operations.md, "Fencing"): the agent holds the lease
``host-<id>`` and records each life of it as ``host.up``; it acts on guests only while
the lease is valid. When a renewal is refused or late past the fence deadline (TTL
minus a margin after the last renewal began) it kills every guest at once, before the
lease can expire in the store and long before the failure detector can declare the
host dead. Each renewal also feeds the watchdog (hostagent/watchdog.py), which kills the
guests itself if the agent hangs. A guest left from an older placement of its VM (the
host came back after its VMs were moved) is killed, never restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import msgspec

from ucloud.commands.aggregates import IMAGE
from ucloud.commands.unit_of_work import Repository
from ucloud.domain import host as host_domain
from ucloud.domain import image as image_domain
from ucloud.domain import network as net
from ucloud.domain import vm as vm_domain
from ucloud.domain.catalogue import build_codec
from ucloud.domain.errors import DomainError
from ucloud.domain.events import Event
from ucloud.eventstore.errors import EventStoreError
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.leases import Grant, HeldLease, Leases, hold
from ucloud.eventstore.records import EventRecord
from ucloud.imagestore.stores import Disk, ImageStore, StoreError, run
from ucloud.projections.runner import Projection, ProjectionRunner
from ucloud.projections.views import HostsView, NetworksView, VmsView

from .hypervisor import (
    ExitReason,
    HypervisorDriver,
    HypervisorError,
    NetworkInterface,
    VmSpec,
    VmState,
    VmStatus,
)
from .images import Image, ImageCatalogue, ImageNotFound
from .network.driver import NetworkDriver, NetworkError, NetworkSpec, PortSpec, tap_name
from .writes import HostWrites

log = logging.getLogger(__name__)

S = vm_domain.Status
D = vm_domain.Desired


@dataclass(frozen=True)
class Capacity:
    cores: int
    ram: int
    disk: int


def measure_capacity(path: Path) -> Capacity:
    """This machine's cores, RAM and the disk space under ``path``."""
    ram = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
                break
    path.mkdir(parents=True, exist_ok=True)
    return Capacity(cores=os.cpu_count() or 1, ram=ram, disk=shutil.disk_usage(path).total)


# cloud-init (>= 24.2) tries its OpenStack datasource, at fe80::a9fe:a9fe, only for this DMI product.
OPENSTACK_PRODUCT = "OpenStack Nova"


def nocloud_serial(metadata_url: str) -> str:
    """The SMBIOS serial that points cloud-init's NoCloud datasource at the metadata server
    (``ds=nocloud-net;s=http://[ADDR]/nocloud/``): Debian 12's cloud-init 22.4 reads its
    seed over IPv6 only this way. The URL is the server's routable address; ValueError
    when it is not an http:// URL of printable ASCII without spaces, commas or ';'."""
    if not metadata_url.startswith("http://") or any(c in metadata_url for c in " ;,") or not (
            metadata_url.isascii() and metadata_url.isprintable()) or len(metadata_url) > 200:
        raise ValueError(f"metadata URL {metadata_url!r} must be http://HOST[:PORT][/PATH] in printable ASCII "
                         "without spaces, commas or ';' (at most 200 characters)")
    return f"ds=nocloud-net;s={metadata_url.rstrip('/')}/nocloud/"


class SliceVms(Projection):
    """The VMs of one host's slice, with each VM's stream version: a slice holds a VM's
    events only while it is placed here, so the agent fills what it missed (the VM's
    request, or its life elsewhere before it came back) from the VM's own stream."""

    name = "slice-vms"
    snapshot_schema = 4  # 3: its VMs view dumps its rows as one msgpack blob; 4: its hosts view too
    handles = VmsView.handles | HostsView.handles

    def __init__(self) -> None:
        self.vms = VmsView()
        self.hosts = HostsView()  # this host only: its slice holds no other host's events
        self.versions: dict[UUID, int] = {}

    def apply(self, record: EventRecord, event: Event) -> None:
        if isinstance(event, host_domain.HOST_EVENT_TYPES):
            self.hosts.apply(record, event)
            return
        vm_id = getattr(event, "vm_id", None)
        if vm_id is None or record.version <= self.versions.get(vm_id, 0):
            return
        self.vms.apply(record, event)
        self.versions[vm_id] = record.version

    def dump(self) -> Any:
        return {"vms": self.vms.dump(), "hosts": self.hosts.dump(),
                "versions": {str(k): v for k, v in self.versions.items()}}

    def load(self, data: Any) -> None:
        self.vms.load(data["vms"])
        self.hosts.load(data["hosts"])
        self.versions = {UUID(k): v for k, v in data["versions"].items()}


class HostAgent:
    def __init__(
        self,
        store: EventStore,
        writes: HostWrites,
        driver: HypervisorDriver,
        images: ImageCatalogue,
        *,
        state_dir: Path,
        hostname: str | None = None,
        capacity: Capacity | None = None,
        resync_interval: float = 2.0,
        stop_timeout: float = 30.0,
        stores: dict[str, ImageStore] | None = None,
        metadata_url: str | None = None,
        leases: Leases | None = None,
        lease_ttl: float = 3.0,
        lease_margin: float = 0.5,
        feed: Any = None,
        snapshot_interval: float = 30.0,
        prepare: Callable[[], Awaitable[None]] | None = None,
        network: NetworkDriver | None = None,
        router: bool = False,
        rdnss: tuple[str, ...] = (),
        nic_grace: float = 20.0,
    ) -> None:
        """``store``: the log, read only (the agent's slice, VM and image streams); the agent
        writes to it only its heartbeat lease and its own snapshots. ``writes``: everything
        else it records (hostagent/writes.py: the command side in this process, or the
        gateway with this host's credential). ``stores``: the image stores this host reaches (declared at registration; a VM
        whose image is in one of them is cloned from it). ``leases``: the heartbeat; None
        runs without one (and never fences). ``feed``: called with each new fence deadline
        (the watchdog client). ``prepare``: slow start-up work (building the tiny image)
        done once the lease is held, so that a restarted agent resumes its lease before it
        runs out. ``network``: the network driver (None: VMs run without their NICs, with
        a warning); ``router``: this host routes every IPAM network (holds each /64's first
        address, runs radvd for the automatic ones); ``rdnss``: DNS servers radvd announces;
        ``nic_grace``: how long a VM waits for the IPAM allocator to give its NICs their MACs
        before it boots without them (they are hot-plugged when they come)."""
        self.store = store
        self.writes = writes
        codec = build_codec()
        self.repository = Repository(store, codec)
        self.stores = dict(stores or {})
        self._disk_sizes: dict[UUID, int] = {}  # what each VM's disk was last seen or grown to
        self.driver = driver
        self.images = images
        self.state_dir = Path(state_dir)
        self.hostname = hostname or socket.gethostname()
        self.host_id = host_domain.host_id_for(self.hostname)
        self.capacity = capacity or measure_capacity(self.state_dir)
        self.slice = SliceVms()
        self.vms = self.slice.vms
        self.runner = ProjectionRunner(store, codec, [self.slice], name=f"hostagent-{self.host_id}",
                                       snapshot_interval=snapshot_interval)
        self.leases = leases
        self.lease_ttl = lease_ttl
        self.lease_margin = lease_margin
        self.feed = feed
        self.prepare = prepare
        self.held: HeldLease | None = None
        self.session = 0
        self.read = 0  # events read from the log (slice and VM streams), for tests and benchmarks
        self.passes = 0  # reconcile passes done in this life of the agent
        self.fenced = 0  # guests killed because the lease was lost
        self.resync_interval = resync_interval
        self.stop_timeout = stop_timeout
        self.smbios_serial = nocloud_serial(metadata_url) if metadata_url else None
        # Networks come from the "networks" slice (every network event), in a view of their own.
        self.networks = NetworksView()
        self.network_runner = ProjectionRunner(store, codec, [self.networks],
                                               name=f"hostagent-{self.host_id}-networks",
                                               snapshot_interval=snapshot_interval)
        self.network = network
        self.router = router
        self.rdnss = rdnss
        self.nic_grace = nic_grace
        self._synced = False  # the views have caught up with the log as it was at the start
        self._waiting_for_macs: dict[UUID, float] = {}
        self._ports: dict[str, PortSpec] = {}  # the ports the last pass made, by tap
        self._wake = asyncio.Event()
        self._parallel = asyncio.Semaphore(8)  # VMs reconciled at once
        self._reported_reboots: dict[UUID, int] = {}

    @property
    def disks(self) -> Path:
        return self.state_dir / "disks"

    def disk_path(self, vm_id: UUID) -> Path:
        return self.disks / f"{vm_id}.qcow2"

    def disk_of(self, vm: vm_domain.Vm) -> tuple[ImageStore | None, Disk]:
        """The store a VM's disk is a clone in (None: a host-provided image) and the disk."""
        store = self.stores.get(vm.image_store) if vm.image_id is not None else None
        if store is not None:
            return store, store.disk(vm.id, self.disks)
        return None, Disk(str(self.disk_path(vm.id)), "qcow2")

    async def register(self) -> None:
        """Record this host's measured capacity; retried while the writer (the log, or the
        gateway) cannot be reached, so an agent may start before them."""
        while True:
            try:
                await self.writes.register(self.capacity.cores, self.capacity.ram, self.capacity.disk,
                                           type(self.driver).name, tuple(self.stores))
                return
            except EventStoreError as error:
                log.info("cannot register this host now: %s", error)
                await asyncio.sleep(1.0)

    @property
    def slice_name(self) -> str:
        return host_domain.slice_name(self.host_id)

    @property
    def lease_file(self) -> Path:
        return self.state_dir / "heartbeat-lease"

    @property
    def live(self) -> bool:
        """May the agent act on guests now? Only while its lease is valid."""
        return self.leases is None or (self.held is not None and self.held.valid)

    async def run(self) -> None:
        if self.leases is None:  # no heartbeat: tests of the agent alone; it never fences
            if self.prepare is not None:
                await self.prepare()
            await self.register()
            await self.catch_up()
            follow = asyncio.create_task(self._follow())
            self._synced = True
            try:
                await self._reconcile_forever(None)
            finally:
                await self._stop_following(follow)
            return
        # The lease first: a restarted agent resumes its session before it runs out, and
        # keeps its guests (the rest of the start may take a while on a long log).
        grant = await self._take_lease()
        following: asyncio.Task[None] | None = None
        try:
            while True:
                async with hold(self.leases, grant, margin=self.lease_margin, on_renewed=self.feed) as held:
                    self.held = held
                    if following is None:
                        if self.prepare is not None:
                            await self.prepare()
                        await self.register()
                        await self.catch_up()
                        following = asyncio.create_task(self._follow())
                    await self._up(grant)
                    self._synced = True
                    await self._reconcile_forever(held)
                    # Fence first, inside the block: leaving it gives the lease back, which
                    # may hang on the very network that failed us.
                    self.held = None
                    await self.fence("the heartbeat lease was lost")
                grant = await self._take_lease()
        finally:
            if following is not None:
                await self._stop_following(following)

    async def _stop_following(self, follow: asyncio.Task[None]) -> None:
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow
        with contextlib.suppress(Exception):
            await asyncio.shield(self.runner.save_snapshot())
        with contextlib.suppress(Exception):
            await asyncio.shield(self.network_runner.save_snapshot())

    async def _reconcile_forever(self, held: HeldLease | None) -> None:
        while held is None or held.valid:
            # Cleared before the pass, not after: a VM placed here while a pass runs wakes
            # the next one at once instead of waiting out the resync interval.
            self._wake.clear()
            await self.reconcile()
            self.passes += 1
            if self.passes == 1:  # an operator (and tests/bench/bench_startup.py) sees when the start is over
                log.info("reconciled: first pass over the %d VMs of this host done, %d events read since the start",
                         len(self.vms.on_host(self.host_id)), self.read)
            waits = [asyncio.ensure_future(self._wake.wait())]
            if held is not None:
                waits.append(asyncio.ensure_future(held.lost.wait()))
            try:
                await asyncio.wait(waits, timeout=self.resync_interval, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()

    async def _take_lease(self) -> Grant:
        """Resume the lease of our last life if it still lives (a restarted agent keeps its
        session and its guests), else wait for the name to be free and take a new one."""
        assert self.leases is not None
        with contextlib.suppress(OSError, ValueError, msgspec.DecodeError, EventStoreError):
            saved = msgspec.json.decode(self.lease_file.read_bytes(), type=Grant)
            if saved.name == self.slice_name and await self.leases.renew(saved):
                log.info("resumed the heartbeat lease: session %d", saved.token)
                return saved
            log.info("the heartbeat lease of session %d is gone", saved.token)
        while True:
            try:
                grant = await self.leases.acquire(self.slice_name, self.hostname, self.lease_ttl)
            except EventStoreError as error:
                log.info("cannot take the heartbeat lease now: %s", error)
                grant = None
            if grant is not None:
                self.lease_file.write_bytes(msgspec.json.encode(grant))
                log.info("took the heartbeat lease: session %d (TTL %gs)", grant.token, grant.ttl)
                return grant
            await asyncio.sleep(self.lease_ttl / 4)

    async def _up(self, grant: Grant) -> None:
        """Record this session (host.up) and read the log up to it before acting: a host
        that was declared dead meanwhile then sees its VMs gone before it touches a guest."""
        self.session = grant.token
        while True:
            try:
                position = await self.writes.up(grant.token, grant.ttl)
                break
            except EventStoreError as error:
                log.info("cannot record host.up now: %s", error)
                await asyncio.sleep(0.2)
        # Everything up to now, not only up to our own event: a VM placed here just before
        # must be in the view before a reconcile pass looks at the guests.
        head = await self.store.head()
        await self.runner.wait_for(max(position, head), timeout=30)
        log.info("host %s is up in session %d", self.hostname, grant.token)

    async def _evacuate(self) -> None:
        """An admin asked for this host's VMs to run elsewhere: kill their guests here
        first, then move the VMs (vm.host_lost, claims released, host.evacuated in one
        append); the scheduler places them again. Never the other order: a guest must be
        gone here before it can start elsewhere."""
        vms = self.vms.on_host(self.host_id)
        for vm in vms:
            if (await self.driver.status(vm.id)).running:
                await self.driver.kill(vm.id)
                log.warning("stopped VM %s: its host is evacuated", vm.id)
        position = await self.writes.evacuated([vm.id for vm in vms])
        await self.runner.wait_for(position, timeout=10)

    async def fence(self, why: str) -> None:
        """Kill every guest now (no guest cooperation: the clock is against us)."""
        for vm_id in await self.driver.list_running():
            with contextlib.suppress(Exception):
                await self.driver.kill(vm_id)
                self.fenced += 1
                log.warning("fenced VM %s: %s", vm_id, why)

    async def catch_up(self) -> None:
        """Restore our snapshot, then read what the slice does not hold (a log older than
        slices) up to where slices begin."""
        await self.runner.restore()
        store = self.store
        begins = await store.slices_from()
        if begins is not None and self.runner.position < begins:
            for record in await store.read_all(self.runner.position, up_to=begins):
                self.read += 1
                if record.stream.startswith("vm-") or record.stream == host_domain.stream_name(self.host_id):
                    self.runner.apply(record)
            self.runner.position = begins
        # Only VMs placed here concern us; a snapshot-less start over an old log keeps them.
        await self.runner.notify()
        # Every network, up to now (the networks slice holds them all, from their start).
        await self.network_runner.restore()
        head = await store.head()
        for record in await store.read_slice("networks", self.network_runner.position, up_to=head):
            self.network_runner.apply(record)
        self.network_runner.position = max(self.network_runner.position, head)

    async def _follow(self) -> None:
        networks = asyncio.create_task(self._follow_networks())
        try:
            await self._follow_slice()
        finally:
            networks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await networks

    async def _follow_networks(self) -> None:
        async for record in self.store.subscribe(self.network_runner.position, slice="networks"):
            self.network_runner.apply(record)
            self.network_runner.position = record.position
            self._wake.set()
            await self.network_runner.snapshot_if_due()

    async def _follow_slice(self) -> None:
        store = self.store
        async for record in store.subscribe(self.runner.position, slice=self.slice_name):
            self.read += 1
            if record.stream.startswith("vm-"):
                vm_id = UUID(record.stream[len("vm-"):])
                known = self.slice.versions.get(vm_id, 0)
                if record.version > known + 1:
                    # The VM's events from before it came into our slice: its stream fills them.
                    for missed in await store.read_stream(record.stream, after_version=known,
                                                          up_to_version=record.version - 1):
                        self.read += 1
                        self.runner.apply(missed)
                self.runner.apply(record)
                self._wake.set()
            elif record.stream == host_domain.stream_name(self.host_id):
                self.runner.apply(record)
                self._wake.set()
            self.runner.position = record.position
            await self.runner.notify()
            await self.runner.snapshot_if_due()

    async def reconcile(self) -> None:
        """One pass: compare what the log wants with what runs, and act on each VM."""
        if not self.live:
            return
        host = self.slice.hosts.by_id.get(self.host_id)
        if host is not None and host.evacuating:
            await self._evacuate()
            return
        for vm_id in await self.driver.list_running():
            known = self.vms.get(vm_id)
            if known is not None and known.host_id != self.host_id:
                # A survivor of a placement the log took away (this host was declared dead,
                # or evacuated): the VM runs, or will, elsewhere. (A guest the view does not
                # know at all is left alone: only the log's word moves a VM.)
                await self.driver.kill(vm_id)
                log.warning("killed VM %s: it is no longer placed on this host", vm_id)
        # Networks and ports first (a VM boots onto its ports), stale ones last (a NIC
        # leaves its VM before its port goes), and only once the views caught up.
        vms = self.vms.on_host(self.host_id)
        if self.network is not None:
            try:
                await self._ensure_networks(vms)
            except Exception:
                log.exception("networks: reconcile failed")
        # VMs are independent (the driver locks each one): handled side by side, so five
        # guests moved here from a dead host start together, not one after another.
        await asyncio.gather(*(self._reconcile_guarded(vm) for vm in vms))
        if self.network is not None and self._synced and self.live:
            try:
                await self._remove_stale_networks(self.vms.on_host(self.host_id))
            except Exception:
                log.exception("networks: cleanup failed")

    async def _reconcile_guarded(self, vm: vm_domain.Vm) -> None:
        async with self._parallel:
            if not self.live:
                return
            try:
                await self._reconcile_vm(vm)
            except DomainError as error:
                # The log moved on while we acted; the next pass sees the new state.
                log.info("vm %s: report not accepted: %s", vm.id, error)
            except Exception:
                log.exception("vm %s: reconcile failed", vm.id)

    # -- networks ------------------------------------------------------------------------------

    def _wanted(self, vms: list[vm_domain.Vm]) -> tuple[dict[int, NetworkSpec], dict[str, PortSpec]]:
        """The networks and ports this host should have: every NIC (with its MAC) of a VM
        placed here and not being deleted, on a ready network; a router host also has every
        ready IPAM network."""
        networks: dict[int, NetworkSpec] = {}
        ports: dict[str, PortSpec] = {}

        def spec(network: net.Network) -> NetworkSpec:
            routes = self.router and network.ipam is not net.Ipam.NONE
            return NetworkSpec(vni=network.vni, group=network.group, ipam=network.ipam.value,
                               prefix=network.prefix, router=routes, rdnss=self.rdnss if routes else ())

        if self.router:
            for served in self.networks.by_id.values():
                if served.status is net.NetworkStatus.READY and served.ipam is not net.Ipam.NONE:
                    networks[served.vni] = spec(served)
        for vm in vms:
            if vm.desired is D.DELETED or vm.status is S.DELETED:
                continue
            for nic in vm.nics:
                network = self.networks.by_id.get(nic.network_id)
                if not nic.mac or network is None or network.status is not net.NetworkStatus.READY:
                    continue
                networks.setdefault(network.vni, spec(network))
                addresses = (net.link_local_address(nic.mac),) + (
                    (net.eui64_address(network.prefix, nic.mac),) if network.prefix else ())
                ports[tap_name(nic.id.hex)] = PortSpec(name=tap_name(nic.id.hex), mac=nic.mac, vni=network.vni,
                                                       addresses=addresses)
        return networks, ports

    async def _ensure_networks(self, vms: list[vm_domain.Vm]) -> None:
        assert self.network is not None
        networks, ports = self._wanted(vms)
        for spec in networks.values():
            try:
                await self.network.ensure_network(spec)
            except NetworkError:
                log.exception("network VNI %d: setup failed", spec.vni)
        for port in ports.values():
            try:
                await self.network.ensure_port(port)
            except NetworkError:
                log.exception("port %s: setup failed", port.name)
                ports = {k: v for k, v in ports.items() if k != port.name}
        self._ports = ports

    async def _remove_stale_networks(self, vms: list[vm_domain.Vm]) -> None:
        assert self.network is not None
        networks, ports = self._wanted(vms)
        in_use: set[str] = set()
        for vm_id in await self.driver.list_running():
            in_use |= {nic.tap for nic in await self.driver.interfaces(vm_id)}
        for name in await self.network.ports() - set(ports) - in_use:
            await self.network.remove_port(name)
        for vni in await self.network.networks() - set(networks):
            await self.network.remove_network(vni)

    def _interfaces(self, vm: vm_domain.Vm) -> tuple[NetworkInterface, ...]:
        """The VM's NICs whose ports are ready, in the VM's order."""
        result = []
        for nic in vm.nics:
            port = self._ports.get(tap_name(nic.id.hex))
            if port is not None:
                result.append(NetworkInterface(tap=port.name, mac=port.mac))
        return tuple(result)

    async def _plug(self, vm: vm_domain.Vm) -> None:
        """Hot-plug the NICs a running VM lacks and unplug those it should not have."""
        if self.network is None:
            return
        wanted = self._interfaces(vm)
        has = await self.driver.interfaces(vm.id)
        for nic in has:
            if nic not in wanted:
                try:
                    await self.driver.detach_interface(vm.id, nic.tap)
                except HypervisorError as error:
                    log.warning("vm %s: unplugging %s: %s", vm.id, nic.tap, error)
        for nic in wanted:
            if nic not in has:
                await self.driver.attach_interface(vm.id, nic)


    async def _reconcile_vm(self, vm: vm_domain.Vm) -> None:
        if vm.status is S.DELETED:
            return
        observed = await self.driver.status(vm.id)
        running = observed.running
        if running and self._epoch_of(vm.id) not in (None, vm.epoch):
            # Started for an older placement of this VM: kill it, never keep it.
            observed = await self.driver.kill(vm.id)
            running = False
            log.warning("killed VM %s: a guest of placement %s, the VM is at %d", vm.id, self._epoch_of(vm.id),
                        vm.epoch)
        if vm.desired is D.DELETED:
            if running:
                await self.driver.stop(vm.id, timeout=self.stop_timeout)
            if observed.state is not VmState.ABSENT:
                await self.driver.remove(vm.id)
            store, _ = self.disk_of(vm)
            if store is not None:
                await store.remove_clone(vm.id, self.disks)  # the clone only: the image stays
            disk = self.disk_path(vm.id)
            if disk.exists():
                await self.driver.delete_disk(disk)
            self._disk_sizes.pop(vm.id, None)
            await self._report(vm_domain.ReportDeleted(vm_id=vm.id, host_id=self.host_id))
            return
        if vm.desired is D.STOPPED:
            if running:
                observed = await self.driver.stop(vm.id, timeout=self.stop_timeout)
            await self._grow_disk(vm, online=False)
            if vm.status is not S.STOPPED:
                await self._report(vm_domain.ReportStopped(vm_id=vm.id, host_id=self.host_id,
                                                           reason=observed.detail or "stopped by request"))
            return
        # desired: running
        if running:
            await self._plug(vm)
            await self._grow_disk(vm, online=True)
            if vm.status is not S.RUNNING:  # adopted, or our report was lost
                await self._report(vm_domain.ReportStarted(vm_id=vm.id, host_id=self.host_id))
            elif vm.reboot_requests > vm.reboots and self._reported_reboots.get(vm.id, -1) < vm.reboot_requests:
                await self.driver.reboot(vm.id)
                self._reported_reboots[vm.id] = vm.reboot_requests
                await self._report(vm_domain.ReportRebooted(vm_id=vm.id, host_id=self.host_id))
            return
        if vm.status is S.RUNNING:
            if observed.exit_reason is ExitReason.GUEST_SHUTDOWN:
                # The guest powered itself off: that is a stop, not a crash.
                await self._report(vm_domain.ReportStopped(vm_id=vm.id, host_id=self.host_id,
                                                           reason="the guest shut itself down"))
                return
            # It was running and is not: it died under us.
            await self._report(vm_domain.ReportCrashed(vm_id=vm.id, host_id=self.host_id,
                                                       reason=_reason(observed)))
            if vm.restart_policy is not vm_domain.RestartPolicy.ALWAYS:
                return
        elif vm.status in (S.CRASHED, S.FAILED) and vm.restart_policy is not vm_domain.RestartPolicy.ALWAYS:
            return
        elif vm.status is S.FAILED:
            return  # a failed start is not retried in a loop; the user starts it again
        await self._start(vm)

    async def _grow_disk(self, vm: vm_domain.Vm, *, online: bool) -> None:
        """Grow the VM's disk to its size in the log, if it is smaller (after a resize):
        through the hypervisor while the guest runs, in the disk file or store otherwise."""
        if self._disk_sizes.get(vm.id, -1) >= vm.disk:
            return
        store, disk = self.disk_of(vm)
        if store is not None:
            size = await store.clone_size(vm.id, self.disks)
        elif Path(disk.path).exists():
            info = json.loads(await run("qemu-img", "info", "--output=json", "-U", disk.path, what="reading a disk"))
            size = int(info["virtual-size"])
        else:
            size = None
        if size is None:
            return  # no disk yet: it is made at its full size on start
        if size < vm.disk:
            if online:
                await self.driver.resize_disk(vm.id, vm.disk)
            elif store is not None:
                await store.grow(vm.id, vm.disk, self.disks)
            else:
                await run("qemu-img", "resize", "-q", "-f", "qcow2", disk.path, str(vm.disk), what="growing a disk")
            size = vm.disk
            await self._report(vm_domain.ReportDiskResized(vm_id=vm.id, host_id=self.host_id, disk=size,
                                                           online=online))
        self._disk_sizes[vm.id] = size

    async def _start(self, vm: vm_domain.Vm) -> None:
        if self.network is None and vm.nics:
            log.warning("vm %s: this host has no network driver; it runs without its %d NICs", vm.id, len(vm.nics))
        elif self.network is not None and any(not nic.mac for nic in vm.nics):
            # The IPAM allocator gives MACs within moments; boot with every NIC if it can.
            loop = asyncio.get_running_loop()
            since = self._waiting_for_macs.setdefault(vm.id, loop.time())
            if loop.time() - since < self.nic_grace:
                return
            log.warning("vm %s: starts without the NICs that have no MAC yet (hot-plugged later)", vm.id)
        self._waiting_for_macs.pop(vm.id, None)
        try:
            disk, boot = await self._prepare_disk(vm)
        except (ImageNotFound, StoreError) as error:
            await self._report(vm_domain.ReportFailed(vm_id=vm.id, host_id=self.host_id, reason=str(error)[:500]))
            return
        try:
            observed = await self.driver.status(vm.id)
            if observed.state is not VmState.ABSENT and not observed.running:
                await self.driver.remove(vm.id)  # the last run's leftovers (exit record, sockets)
            self._set_epoch(vm.id, vm.epoch)
            if not self.live:
                return
            handle = await self.driver.start(VmSpec(
                vm_id=vm.id, name=vm.name, cores=vm.cores, ram_bytes=vm.ram, disk_path=disk.path,
                disk_format=disk.format,
                kernel=str(boot.kernel) if boot and boot.kernel else None,
                initrd=str(boot.initrd) if boot and boot.initrd else None,
                append=boot.append if boot and boot.kernel else None,
                smbios_product=OPENSTACK_PRODUCT, smbios_serial=self._seed(vm),
                interfaces=self._interfaces(vm) if self.network is not None else (),
            ))
        except Exception as error:  # any start failure is reported, with its reason
            log.exception("vm %s: start failed", vm.id)
            await self._report(vm_domain.ReportFailed(vm_id=vm.id, host_id=self.host_id, reason=str(error)[:500]))
            return
        log.info("started VM %s (placement %d, %s)", vm.id, vm.epoch, handle.accel)
        await self._report(vm_domain.ReportStarted(vm_id=vm.id, host_id=self.host_id, accelerator=handle.accel))

    def _seed(self, vm: vm_domain.Vm) -> str | None:
        """The NoCloud seed in the VM's SMBIOS serial: the configured metadata URL, else the
        router address of its first NIC's network (where the router host's metadata server
        listens; any host's server answers any NIC), else none."""
        if self.smbios_serial is not None:
            return self.smbios_serial
        network = self.networks.by_id.get(vm.nics[0].network_id) if vm.nics else None
        if network is None or not network.prefix:
            return None
        return nocloud_serial(f"http://[{net.router_address(network.prefix)}]")

    async def _prepare_disk(self, vm: vm_domain.Vm) -> tuple[Disk, Image | None]:
        """The VM's disk, made now if it does not exist: a clone of its catalogued image in
        the image's store, or an overlay on a host-provided image (which may also give a
        kernel to boot directly)."""
        if vm.image_id is None:
            image = self.images.get(vm.image)
            disk = self.disk_path(vm.id)
            if not disk.exists():
                await self.driver.create_disk(image.disk, disk, vm.disk)
            self._disk_sizes[vm.id] = max(vm.disk, self._disk_sizes.get(vm.id, 0))
            return Disk(str(disk), "qcow2"), image
        store = self.stores.get(vm.image_store)
        if store is None:
            raise StoreError(f"this host does not reach image store {vm.image_store!r}")
        loaded = await self.repository.load(IMAGE, image_domain.stream_name(vm.image_id), save_snapshot=False)
        catalogued = loaded.state
        if catalogued is None or not catalogued.location:
            raise StoreError(f"image {vm.image!r} is not ready in store {vm.image_store!r}")
        cloned = await store.clone(catalogued.location, vm.id, vm.disk, self.disks)
        self._disk_sizes.pop(vm.id, None)  # an existing clone may be smaller than a resize asked: look again
        return cloned, None

    def _epoch_path(self, vm_id: UUID) -> Path:
        return self.state_dir / "epochs" / str(vm_id)

    def _epoch_of(self, vm_id: UUID) -> int | None:
        try:
            return int(self._epoch_path(vm_id).read_text())
        except (OSError, ValueError):
            return None

    def _set_epoch(self, vm_id: UUID, epoch: int) -> None:
        path = self._epoch_path(vm_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(epoch))

    async def _report(self, command: vm_domain.VmReport) -> None:
        position = await self.writes.report(command)
        # Act on the next pass only once our own report is in the view.
        await self.runner.wait_for(position, timeout=5)


def _reason(observed: VmStatus) -> str:
    if observed.state is VmState.ABSENT:
        return "this host has no record of the guest (host rebooted?)"
    return observed.detail or f"the guest is no longer running ({observed.state})"
