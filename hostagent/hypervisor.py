"""The hypervisor driver port of the host agent.

The host agent talks to one ``HypervisorDriver``: QEMU today (``ucloud.hostagent.qemu``),
bhyve on FreeBSD later. A driver owns a *run root* on the host; every VM gets a
run directory ``<run_root>/<vm_id>/`` holding whatever the driver needs to find
the VM again after the agent restarts (sockets, pid file, metadata). That is why
the run directory is the driver's business and not a field of ``VmSpec``:
rediscovery (``list_running``) must know where to look without being told.

Every operation is idempotent where that makes sense for a reconcile loop:
``start`` of a running VM with the same spec returns the existing handle,
``stop``/``kill`` of a stopped VM return its status.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from enum import StrEnum
from pathlib import Path
from typing import ClassVar
from uuid import UUID

import msgspec

MIB = 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_TAP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_SMBIOS = re.compile(r"[\x20-\x7e]{1,255}", re.ASCII)
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class HypervisorError(Exception):
    """Base of every driver failure; the message names the VM and what went wrong."""


class InvalidSpec(HypervisorError, ValueError):
    """A VmSpec or argument that can never work (bad name, RAM not in MiB, ...)."""


class VmNotRunning(HypervisorError):
    """The operation needs a running VM and this one is not running."""


class VmAlreadyRunning(HypervisorError):
    """start() was asked for a VM that already runs here with a different spec."""


class VmStartError(HypervisorError):
    """The hypervisor refused to start or died while starting; carries its log tail."""


class DiskError(HypervisorError):
    """Creating or deleting a disk failed (missing base, target exists, disk in use)."""


class NetworkInterface(msgspec.Struct, frozen=True, kw_only=True):
    """One NIC of a VM: a tap device (created by the network driver) and a MAC."""

    tap: str
    mac: str

    def __post_init__(self) -> None:
        if not _TAP.match(self.tap):
            raise InvalidSpec(
                f"tap name {self.tap!r} is not a valid interface name (1-15 of A-Z a-z 0-9 _ . -)"
            )
        if not _MAC.match(self.mac):
            raise InvalidSpec(f"MAC {self.mac!r} is not lower-case aa:bb:cc:dd:ee:ff")
        if int(self.mac[:2], 16) & 1:
            raise InvalidSpec(f"MAC {self.mac!r} is a multicast address; a NIC needs unicast")


class VmSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What to run. Paths are strings so the spec round-trips through JSON/msgpack."""

    vm_id: UUID
    name: str
    cores: int
    ram_bytes: int
    disk_path: str | None = None
    disk_format: str = "qcow2"
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    interfaces: tuple[NetworkInterface, ...] = ()
    # SMBIOS type 1 (system) strings the guest reads from DMI: cloud-init takes its NoCloud
    # seed URL from the serial and tries OpenStack only when the product is "OpenStack Nova".
    smbios_product: str | None = None
    smbios_serial: str | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise InvalidSpec(
                f"VM name {self.name!r} must be 1-63 characters of A-Z a-z 0-9 . _ - "
                "starting with a letter or digit"
            )
        if self.cores < 1:
            raise InvalidSpec(f"VM {self.name}: cores must be at least 1, got {self.cores}")
        if self.ram_bytes < 16 * MIB or self.ram_bytes % MIB:
            raise InvalidSpec(
                f"VM {self.name}: ram_bytes must be a whole number of MiB and at least 16 MiB, "
                f"got {self.ram_bytes}"
            )
        if self.disk_format not in ("qcow2", "raw"):
            raise InvalidSpec(f"VM {self.name}: disk_format must be qcow2 or raw")
        for what, value in (("smbios_product", self.smbios_product), ("smbios_serial", self.smbios_serial)):
            if value is not None and not _SMBIOS.fullmatch(value):
                raise InvalidSpec(f"VM {self.name}: {what} must be 1-255 printable ASCII characters")
        if self.kernel is None and (self.initrd is not None or self.append is not None):
            raise InvalidSpec(f"VM {self.name}: initrd/append need a kernel (direct kernel boot)")
        if self.kernel is None and self.disk_path is None:
            raise InvalidSpec(f"VM {self.name}: nothing to boot: give a disk_path or a kernel")
        for field in ("disk_path", "kernel", "initrd"):
            value = getattr(self, field)
            if field == "disk_path" and value is not None and value.startswith("rbd:"):
                continue  # a Ceph RBD disk QEMU opens itself (imagestore/rbd.py)
            if value is not None and not Path(value).is_absolute():
                raise InvalidSpec(f"VM {self.name}: {field} must be an absolute path: {value!r}")
        taps = [nic.tap for nic in self.interfaces]
        macs = [nic.mac for nic in self.interfaces]
        if len(set(taps)) != len(taps) or len(set(macs)) != len(macs):
            raise InvalidSpec(f"VM {self.name}: two interfaces share a tap or a MAC")


class VmState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"  # process up, vCPUs stopped (e.g. migration, paused by QMP)
    UNRESPONSIVE = "unresponsive"  # process up, control channel does not answer
    STOPPED = "stopped"  # process gone after an orderly shutdown; see ExitReason
    CRASHED = "crashed"  # process gone without an orderly shutdown
    ABSENT = "absent"  # this host has no record of the VM


class ExitReason(StrEnum):
    STOPPED_BY_HOST = "stopped-by-host"  # our stop()/kill() (or an operator's quit)
    GUEST_SHUTDOWN = "guest-shutdown"  # the guest powered itself off
    CRASHED = "crashed"  # the hypervisor died, was killed, or the guest panicked


class VmStatus(msgspec.Struct, frozen=True, kw_only=True):
    """What the driver observed. exit_* are set once the VM is no longer running."""

    vm_id: UUID
    state: VmState
    exit_reason: ExitReason | None = None
    detail: str = ""
    pid: int | None = None
    exit_code: int | None = None  # process exit status when known (negative: signal)

    @property
    def running(self) -> bool:
        return self.state in (VmState.RUNNING, VmState.PAUSED, VmState.UNRESPONSIVE)


class VmHandle(msgspec.Struct, frozen=True, kw_only=True):
    """A VM the driver runs. started=False means start() found it already running."""

    vm_id: UUID
    pid: int
    run_dir: str
    accel: str
    started: bool = True


class HypervisorDriver(ABC):
    """Start, stop, observe and rediscover VMs on this host."""

    name: ClassVar[str]

    @abstractmethod
    async def start(self, spec: VmSpec) -> VmHandle:
        """Boot the VM. Detached from the agent: it survives the agent's death.

        If the VM already runs here with an equal spec, returns its handle with
        started=False (never a second copy); with a different spec raises
        VmAlreadyRunning. Raises VmStartError with the hypervisor's message
        when it does not come up.
        """

    @abstractmethod
    async def stop(self, vm_id: UUID, timeout: float = 30.0) -> VmStatus:
        """Graceful stop: ACPI power button, then a hard stop after timeout seconds.

        The resulting exit reason is STOPPED_BY_HOST. Stopping a VM that is not
        running returns its status unchanged.
        """

    @abstractmethod
    async def kill(self, vm_id: UUID) -> VmStatus:
        """Pull the plug now (no guest cooperation). Exit reason STOPPED_BY_HOST."""

    @abstractmethod
    async def reboot(self, vm_id: UUID) -> None:
        """Hard reset of a running VM (the reset button). Raises VmNotRunning."""

    @abstractmethod
    async def status(self, vm_id: UUID) -> VmStatus:
        """Observe the VM: running/paused/unresponsive, or how it ended, or ABSENT."""

    @abstractmethod
    async def wait_exit(self, vm_id: UUID, timeout: float | None = None) -> VmStatus:
        """Wait until the VM's process is gone; returns its final status.

        Raises TimeoutError when it still runs after timeout seconds.
        """

    @abstractmethod
    async def interfaces(self, vm_id: UUID) -> tuple[NetworkInterface, ...]:
        """The NICs the VM has now (booted with or plugged since)."""

    @abstractmethod
    async def attach_interface(self, vm_id: UUID, nic: NetworkInterface) -> None:
        """Hot-plug a NIC into a running VM (its tap must exist). No-op if it has it."""

    @abstractmethod
    async def detach_interface(self, vm_id: UUID, tap: str, timeout: float = 60.0) -> None:
        """Hot-unplug a NIC (the guest must let go; HypervisorError if it does not in time)."""

    @abstractmethod
    async def list_running(self) -> list[UUID]:
        """Ids of the VMs whose hypervisor process runs on this host (for adoption)."""

    @abstractmethod
    async def remove(self, vm_id: UUID) -> None:
        """Forget a VM that is not running: delete its run directory (not its disk)."""

    @abstractmethod
    async def create_disk(
        self, image: Path, target: Path, size: int | None = None, *, linked: bool = True
    ) -> Path:
        """Make target a clone of image, optionally grown to size bytes.

        linked=True: a copy-on-write clone backed by image (image must then stay);
        linked=False: an independent full copy. Paths must be absolute. Raises
        DiskError if image is missing, target exists or size is below the image's.
        """

    @abstractmethod
    async def delete_disk(self, path: Path) -> None:
        """Delete a VM disk. Raises DiskError if a running VM uses it."""

    async def resize_disk(self, vm_id: UUID, size: int) -> None:
        """Grow a running VM's disk to ``size`` bytes; the guest sees the new size at once.
        Raises VmNotRunning if it does not run."""
        raise HypervisorError(f"{type(self).__name__} cannot grow a running VM's disk")

    @abstractmethod
    def run_dir(self, vm_id: UUID) -> Path: ...

    @abstractmethod
    def console_path(self, vm_id: UUID) -> Path:
        """Unix socket of the VM's interactive serial console."""

    @abstractmethod
    def vnc_socket_path(self, vm_id: UUID) -> Path:
        """Unix socket of the VM's VNC server (never a TCP port)."""

    @abstractmethod
    def serial_log_path(self, vm_id: UUID) -> Path:
        """Everything the guest wrote to its serial console since the last start."""
