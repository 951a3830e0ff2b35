"""The host agent (ucloud-host): makes this machine match its slice of the log.

It registers the host with its real capacity, follows the log through a VM read
model, and reconciles every VM placed here: start, stop, reboot, delete, through a
hypervisor driver. What it observes (started, stopped, crashed, failed, deleted) it
reports back as events through the command side. Restarted, it adopts the guests
that are still running instead of starting second copies: the driver finds them by
their run directories, and a VM the driver reports running is never started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.domain import host as host_domain
from ucloud.domain import network as net
from ucloud.domain import vm as vm_domain
from ucloud.domain.errors import DomainError
from ucloud.projections.runner import ProjectionRunner
from ucloud.projections.views import NetworksView, VmsView

from .hypervisor import (
    ExitReason,
    HypervisorDriver,
    HypervisorError,
    NetworkInterface,
    VmSpec,
    VmState,
    VmStatus,
)
from .images import ImageCatalogue, ImageNotFound
from .network.driver import NetworkDriver, NetworkError, NetworkSpec, PortSpec, tap_name

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


class HostAgent:
    def __init__(
        self,
        commands: CommandService,
        driver: HypervisorDriver,
        images: ImageCatalogue,
        *,
        state_dir: Path,
        hostname: str | None = None,
        capacity: Capacity | None = None,
        resync_interval: float = 2.0,
        stop_timeout: float = 30.0,
        metadata_url: str | None = None,
        network: NetworkDriver | None = None,
        router: bool = False,
        rdnss: tuple[str, ...] = (),
        nic_grace: float = 20.0,
    ) -> None:
        """``network``: the network driver (None: VMs run without their NICs, with a
        warning); ``router``: this host routes every IPAM network (holds each /64's first
        address, runs radvd for the automatic ones); ``rdnss``: DNS servers radvd announces;
        ``nic_grace``: how long a VM waits for the IPAM allocator to give its NICs their MACs
        before it boots without them (they are hot-plugged when they come)."""
        self.commands = commands
        self.driver = driver
        self.images = images
        self.state_dir = Path(state_dir)
        self.hostname = hostname or socket.gethostname()
        self.host_id = host_domain.host_id_for(self.hostname)
        self.capacity = capacity or measure_capacity(self.state_dir)
        self.actor = Actor(f"host/{self.hostname}", "ucloud-system", is_admin=True)
        self.vms = VmsView()
        self.networks = NetworksView()
        self.runner = ProjectionRunner(commands.store, commands.codec, [self.vms, self.networks],
                                       name=f"hostagent-{self.host_id}")
        self.network = network
        self.router = router
        self.rdnss = rdnss
        self.nic_grace = nic_grace
        self._waiting_for_macs: dict[UUID, float] = {}
        self._caught_up_at = 0  # the log's head when run() started
        self._ports: dict[str, PortSpec] = {}  # the ports this pass wants, by tap
        self.resync_interval = resync_interval
        self.stop_timeout = stop_timeout
        self.smbios_serial = nocloud_serial(metadata_url) if metadata_url else None
        self._wake = asyncio.Event()
        self._reported_reboots: dict[UUID, int] = {}

    def disk_path(self, vm_id: UUID) -> Path:
        return self.state_dir / "disks" / f"{vm_id}.qcow2"

    async def register(self) -> None:
        await self.commands.register_host(
            self.actor, self.hostname, self.capacity.cores, self.capacity.ram, self.capacity.disk,
            hypervisor=type(self.driver).name,
        )

    async def run(self) -> None:
        await self.register()
        # Nothing is torn down before the views have caught up with the log as it was at
        # the start: a restarted agent's empty views must not read as "no network needed".
        self._caught_up_at = await self.commands.store.head()
        follow = asyncio.create_task(self._follow())
        try:
            while True:
                await self.reconcile()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.resync_interval)
        finally:
            follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follow

    async def _follow(self) -> None:
        async for record in self.commands.store.subscribe(self.runner.position):
            self.runner.apply(record)
            await self.runner.notify()
            if record.type.startswith(("vm.", "network.")):
                self._wake.set()

    async def reconcile(self) -> None:
        """One pass: compare what the log wants with what runs, and act on each VM.
        Networks and ports first (a VM boots onto its ports), stale ones last (a NIC
        leaves its VM before its port goes)."""
        vms = self.vms.on_host(self.host_id)
        if self.network is not None:
            try:
                await self._ensure_networks(vms)
            except Exception:
                log.exception("networks: reconcile failed")
        for vm in vms:
            try:
                await self._reconcile_vm(vm)
            except DomainError as error:
                # The log moved on while we acted; the next pass sees the new state.
                log.info("vm %s: report not accepted: %s", vm.id, error)
            except Exception:
                log.exception("vm %s: reconcile failed", vm.id)
        if self.network is not None and self.runner.position >= self._caught_up_at:
            try:
                await self._remove_stale_networks(vms)
            except Exception:
                log.exception("networks: cleanup failed")

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
        if vm.desired is D.DELETED:
            if running:
                await self.driver.stop(vm.id, timeout=self.stop_timeout)
            if observed.state is not VmState.ABSENT:
                await self.driver.remove(vm.id)
            disk = self.disk_path(vm.id)
            if disk.exists():
                await self.driver.delete_disk(disk)
            await self._report(vm_domain.ReportDeleted(vm_id=vm.id, host_id=self.host_id))
            return
        if vm.desired is D.STOPPED:
            if running:
                observed = await self.driver.stop(vm.id, timeout=self.stop_timeout)
            if vm.status is not S.STOPPED:
                await self._report(vm_domain.ReportStopped(vm_id=vm.id, host_id=self.host_id,
                                                           reason=observed.detail or "stopped by request"))
            return
        # desired: running
        if running:
            await self._plug(vm)
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
            image = self.images.get(vm.image)
        except ImageNotFound as error:
            await self._report(vm_domain.ReportFailed(vm_id=vm.id, host_id=self.host_id, reason=str(error)))
            return
        disk = self.disk_path(vm.id)
        try:
            if not disk.exists():
                await self.driver.create_disk(image.disk, disk, vm.disk)
            observed = await self.driver.status(vm.id)
            if observed.state is not VmState.ABSENT and not observed.running:
                await self.driver.remove(vm.id)  # the last run's leftovers (exit record, sockets)
            handle = await self.driver.start(VmSpec(
                vm_id=vm.id, name=vm.name, cores=vm.cores, ram_bytes=vm.ram, disk_path=str(disk),
                kernel=str(image.kernel) if image.kernel else None,
                initrd=str(image.initrd) if image.initrd else None,
                append=image.append if image.kernel else None,
                smbios_product=OPENSTACK_PRODUCT, smbios_serial=self.smbios_serial,
                interfaces=self._interfaces(vm) if self.network is not None else (),
            ))
        except Exception as error:  # any start failure is reported, with its reason
            log.exception("vm %s: start failed", vm.id)
            await self._report(vm_domain.ReportFailed(vm_id=vm.id, host_id=self.host_id, reason=str(error)[:500]))
            return
        await self._report(vm_domain.ReportStarted(vm_id=vm.id, host_id=self.host_id, accelerator=handle.accel))

    async def _report(self, command: vm_domain.VmReport) -> None:
        outcome = await self.commands.report(self.actor, command)
        # Act on the next pass only once our own report is in the view.
        await self.runner.wait_for(outcome.position, timeout=5)


def _reason(observed: VmStatus) -> str:
    if observed.state is VmState.ABSENT:
        return "this host has no record of the guest (host rebooted?)"
    return observed.detail or f"the guest is no longer running ({observed.state})"
