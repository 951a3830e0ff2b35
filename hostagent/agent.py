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
from ucloud.domain import vm as vm_domain
from ucloud.domain.errors import DomainError
from ucloud.projections.runner import ProjectionRunner
from ucloud.projections.views import VmsView

from .hypervisor import ExitReason, HypervisorDriver, VmSpec, VmState, VmStatus
from .images import ImageCatalogue, ImageNotFound

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
    ) -> None:
        self.commands = commands
        self.driver = driver
        self.images = images
        self.state_dir = Path(state_dir)
        self.hostname = hostname or socket.gethostname()
        self.host_id = host_domain.host_id_for(self.hostname)
        self.capacity = capacity or measure_capacity(self.state_dir)
        self.actor = Actor(f"host/{self.hostname}", "ucloud-system", is_admin=True)
        self.vms = VmsView()
        self.runner = ProjectionRunner(commands.store, commands.codec, [self.vms], name=f"hostagent-{self.host_id}")
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
            if record.type.startswith("vm."):
                self._wake.set()

    async def reconcile(self) -> None:
        """One pass: compare what the log wants with what runs, and act on each VM."""
        for vm in self.vms.on_host(self.host_id):
            try:
                await self._reconcile_vm(vm)
            except DomainError as error:
                # The log moved on while we acted; the next pass sees the new state.
                log.info("vm %s: report not accepted: %s", vm.id, error)
            except Exception:
                log.exception("vm %s: reconcile failed", vm.id)

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
