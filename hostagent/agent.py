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
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from ucloud.commands.aggregates import IMAGE
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.domain import host as host_domain
from ucloud.domain import image as image_domain
from ucloud.domain import vm as vm_domain
from ucloud.domain.errors import DomainError
from ucloud.imagestore.stores import Disk, ImageStore, StoreError, run
from ucloud.projections.runner import ProjectionRunner
from ucloud.projections.views import VmsView

from .hypervisor import ExitReason, HypervisorDriver, VmSpec, VmState, VmStatus
from .images import Image, ImageCatalogue, ImageNotFound

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
        stores: dict[str, ImageStore] | None = None,
        metadata_url: str | None = None,
    ) -> None:
        """``stores``: the image stores this host reaches (declared at registration; a VM
        whose image is in one of them is cloned from it)."""
        self.commands = commands
        self.stores = dict(stores or {})
        self._disk_sizes: dict[UUID, int] = {}  # what each VM's disk was last seen or grown to
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
        await self.commands.register_host(
            self.actor, self.hostname, self.capacity.cores, self.capacity.ram, self.capacity.disk,
            hypervisor=type(self.driver).name, stores=tuple(self.stores),
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
        try:
            disk, boot = await self._prepare_disk(vm)
        except (ImageNotFound, StoreError) as error:
            await self._report(vm_domain.ReportFailed(vm_id=vm.id, host_id=self.host_id, reason=str(error)[:500]))
            return
        try:
            observed = await self.driver.status(vm.id)
            if observed.state is not VmState.ABSENT and not observed.running:
                await self.driver.remove(vm.id)  # the last run's leftovers (exit record, sockets)
            handle = await self.driver.start(VmSpec(
                vm_id=vm.id, name=vm.name, cores=vm.cores, ram_bytes=vm.ram, disk_path=disk.path,
                disk_format=disk.format,
                kernel=str(boot.kernel) if boot and boot.kernel else None,
                initrd=str(boot.initrd) if boot and boot.initrd else None,
                append=boot.append if boot and boot.kernel else None,
                smbios_product=OPENSTACK_PRODUCT, smbios_serial=self.smbios_serial,
            ))
        except Exception as error:  # any start failure is reported, with its reason
            log.exception("vm %s: start failed", vm.id)
            await self._report(vm_domain.ReportFailed(vm_id=vm.id, host_id=self.host_id, reason=str(error)[:500]))
            return
        await self._report(vm_domain.ReportStarted(vm_id=vm.id, host_id=self.host_id, accelerator=handle.accel))

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
        loaded = await self.commands.repository.load(IMAGE, image_domain.stream_name(vm.image_id))
        catalogued = loaded.state
        if catalogued is None or not catalogued.location:
            raise StoreError(f"image {vm.image!r} is not ready in store {vm.image_store!r}")
        cloned = await store.clone(catalogued.location, vm.id, vm.disk, self.disks)
        self._disk_sizes.pop(vm.id, None)  # an existing clone may be smaller than a resize asked: look again
        return cloned, None

    async def _report(self, command: vm_domain.VmReport) -> None:
        outcome = await self.commands.report(self.actor, command)
        # Act on the next pass only once our own report is in the view.
        await self.runner.wait_for(outcome.position, timeout=5)


def _reason(observed: VmStatus) -> str:
    if observed.state is VmState.ABSENT:
        return "this host has no record of the guest (host rebooted?)"
    return observed.detail or f"the guest is no longer running ({observed.state})"
