"""The VM aggregate: its events, commands, state, and pure decide/evolve.

Status machine (every transition is an event):

    requested ──placed──► scheduled ──started──► running ──stop──► stopping ──stopped──► stopped
        │                    │                      │ ▲                                     │
        └─► unschedulable    └─► failed             │ └──── restarted (policy) ◄── crashed ◄─┘ (from running)
                                                    └──────────── start ◄───────────────────┘
    any non-deleted ──delete──► deleting ──deleted──► deleted   (deleted accepts no command)

``desired`` is what the user asked for (running, stopped, deleted); ``status`` is what
the system last observed. The host agent reconciles the two.
"""

from __future__ import annotations

import enum
from uuid import UUID

import msgspec

from .errors import InvalidValue, NotFound, OutOfBounds, Rejected
from .events import Command, Event


class Status(enum.StrEnum):
    REQUESTED = "requested"
    SCHEDULED = "scheduled"
    UNSCHEDULABLE = "unschedulable"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"
    FAILED = "failed"
    DELETING = "deleting"
    DELETED = "deleted"


class Desired(enum.StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    DELETED = "deleted"


class RestartPolicy(enum.StrEnum):
    ALWAYS = "always"  # restart after a crash
    NEVER = "never"


# -- events ---------------------------------------------------------------------


class VmRequested(Event, tag="vm.requested", frozen=True):
    """A user asked for a VM; it waits for the scheduler."""

    vm_id: UUID
    owner: str
    name: str
    cores: int
    ram: int  # bytes
    disk: int  # bytes
    image: str
    ssh_keys: tuple[str, ...] = ()
    restart_policy: RestartPolicy = RestartPolicy.ALWAYS
    # The catalogued image the disk is a clone of, and its store; None/"" for an image the
    # hosts provide themselves (``tiny``).
    image_id: UUID | None = None
    image_store: str = ""
    # What the guest's cloud-init or ucloud-init runs (served by the metadata server). It
    # is in the log like every other field: never a place for secrets.
    user_data: str = ""


class VmScheduled(Event, tag="vm.scheduled", frozen=True):
    """The scheduler placed the VM on a host (appended together with host.capacity_claimed)."""

    vm_id: UUID
    host_id: UUID


class VmUnschedulable(Event, tag="vm.unschedulable", frozen=True):
    """No host had room; `reason` says why for each host. Retried when capacity appears."""

    vm_id: UUID
    reason: str


class VmStartRequested(Event, tag="vm.start_requested", frozen=True):
    """The owner asked to start a stopped, crashed or failed VM."""

    vm_id: UUID


class VmStarted(Event, tag="vm.started", frozen=True):
    """The host agent observed the guest running (`accelerator`: kvm or tcg)."""

    vm_id: UUID
    host_id: UUID
    accelerator: str = ""  # "kvm" or "tcg"


class VmStopRequested(Event, tag="vm.stop_requested", frozen=True):
    """The owner asked to stop the VM."""

    vm_id: UUID


class VmStopped(Event, tag="vm.stopped", frozen=True):
    """The host agent observed the guest stopped."""

    vm_id: UUID
    host_id: UUID
    reason: str = "stopped by request"


class VmRebootRequested(Event, tag="vm.reboot_requested", frozen=True):
    """The owner asked to reboot a running VM."""

    vm_id: UUID


class VmRebooted(Event, tag="vm.rebooted", frozen=True):
    """The host agent reset the guest."""

    vm_id: UUID
    host_id: UUID


class VmCrashed(Event, tag="vm.crashed", frozen=True):
    """The guest stopped without being asked to; `reason` is what the host saw."""

    vm_id: UUID
    host_id: UUID
    reason: str


class VmFailed(Event, tag="vm.failed", frozen=True):
    """The host agent could not start the guest (missing image, QEMU error)."""

    vm_id: UUID
    host_id: UUID
    reason: str


class VmDeleteRequested(Event, tag="vm.delete_requested", frozen=True):
    """The owner asked to delete the VM."""

    vm_id: UUID


class VmDeleted(Event, tag="vm.deleted", frozen=True):
    """The VM is gone: its guest stopped and its disk removed (`host_id` null if it never ran)."""

    vm_id: UUID
    host_id: UUID | None = None


class VmHostLost(Event, tag="vm.host_lost", frozen=True):
    """The VM's host was declared dead (or evacuated): its claim is released in the same
    append and the VM leaves the host. It waits for a new host if it should run and its
    restart policy is ``always``; it is stopped (with the reason) otherwise; a VM being
    deleted is deleted (its disk stays on the lost host)."""

    vm_id: UUID
    host_id: UUID
    reason: str
class VmResized(Event, tag="vm.resized", frozen=True):
    """The owner changed the VM's size: cores and RAM while it is stopped, the disk grown at
    any time (appended with host.claim_changed when the VM is placed)."""

    vm_id: UUID
    cores: int
    ram: int
    disk: int


class VmDiskResized(Event, tag="vm.disk_resized", frozen=True):
    """The host agent grew the VM's disk to ``disk`` bytes (online through QMP if it runs)."""

    vm_id: UUID
    host_id: UUID
    disk: int
    online: bool = False
class VmNicAdded(Event, tag="vm.nic_added", frozen=True):
    """A NIC on a network was added to the VM (appended with network.port_added); its MAC
    comes from the IPAM allocator. On a running VM the host agent hot-plugs it."""

    vm_id: UUID
    nic_id: UUID
    network_id: UUID


class VmNicAllocated(Event, tag="vm.nic_allocated", frozen=True):
    """The IPAM allocator gave the NIC its MAC (claimed in the MAC's own stream)."""

    vm_id: UUID
    nic_id: UUID
    mac: str


class VmNicRemoved(Event, tag="vm.nic_removed", frozen=True):
    """The NIC was detached (appended with network.port_removed); the host agent unplugs it."""

    vm_id: UUID
    nic_id: UUID


VmEvent = (
    VmRequested | VmScheduled | VmUnschedulable | VmStartRequested | VmStarted | VmStopRequested
    | VmStopped | VmRebootRequested | VmRebooted | VmCrashed | VmFailed | VmDeleteRequested | VmDeleted
    | VmHostLost | VmNicAdded | VmNicAllocated | VmNicRemoved | VmResized | VmDiskResized
)
VM_EVENT_TYPES: tuple[type[Event], ...] = VmEvent.__args__


# -- commands -------------------------------------------------------------------


class CreateVm(Command, tag="vm.create", frozen=True):
    vm_id: UUID
    owner: str
    name: str
    cores: int
    ram: int
    disk: int
    image: str
    ssh_keys: tuple[str, ...] = ()
    restart_policy: RestartPolicy = RestartPolicy.ALWAYS
    image_id: UUID | None = None
    image_store: str = ""
    user_data: str = ""


class StartVm(Command, tag="vm.start", frozen=True):
    vm_id: UUID


class StopVm(Command, tag="vm.stop", frozen=True):
    vm_id: UUID


class RebootVm(Command, tag="vm.reboot", frozen=True):
    vm_id: UUID


class DeleteVm(Command, tag="vm.delete", frozen=True):
    vm_id: UUID


class ResizeVm(Command, tag="vm.resize", frozen=True):
    """The new size; a field equal to the current one is no change."""

    vm_id: UUID
    cores: int
    ram: int
    disk: int


# Placement and observations come from the scheduler and the host agent.
class PlaceVm(Command, tag="vm.place", frozen=True):
    vm_id: UUID
    host_id: UUID


class MarkUnschedulable(Command, tag="vm.mark_unschedulable", frozen=True):
    vm_id: UUID
    reason: str


class ReportStarted(Command, tag="vm.report_started", frozen=True):
    vm_id: UUID
    host_id: UUID
    accelerator: str = ""


class ReportStopped(Command, tag="vm.report_stopped", frozen=True):
    vm_id: UUID
    host_id: UUID
    reason: str = "stopped by request"


class ReportRebooted(Command, tag="vm.report_rebooted", frozen=True):
    vm_id: UUID
    host_id: UUID


class ReportCrashed(Command, tag="vm.report_crashed", frozen=True):
    vm_id: UUID
    host_id: UUID
    reason: str


class ReportFailed(Command, tag="vm.report_failed", frozen=True):
    vm_id: UUID
    host_id: UUID
    reason: str


class ReportDeleted(Command, tag="vm.report_deleted", frozen=True):
    vm_id: UUID
    host_id: UUID


class EvictVm(Command, tag="vm.evict", frozen=True):
    vm_id: UUID
    host_id: UUID
    reason: str


class ReportDiskResized(Command, tag="vm.report_disk_resized", frozen=True):
    vm_id: UUID
    host_id: UUID
    disk: int
    online: bool = False
class AddNic(Command, tag="vm.add_nic", frozen=True):
    vm_id: UUID
    nic_id: UUID
    network_id: UUID


class AllocateNic(Command, tag="vm.allocate_nic", frozen=True):
    vm_id: UUID
    nic_id: UUID
    mac: str


class RemoveNic(Command, tag="vm.remove_nic", frozen=True):
    vm_id: UUID
    network_id: UUID


MAX_NICS = 16


# What a user may ask of an existing VM, and what a host agent may report about one.
VmLifecycleCommand = StartVm | StopVm | RebootVm | DeleteVm
VmReport = (ReportStarted | ReportStopped | ReportRebooted | ReportCrashed | ReportFailed | ReportDeleted
            | ReportDiskResized)

VmCommand = (
    CreateVm | StartVm | StopVm | RebootVm | DeleteVm | PlaceVm | MarkUnschedulable | ReportStarted
    | ReportStopped | ReportRebooted | ReportCrashed | ReportFailed | ReportDeleted | AddNic | AllocateNic
    | RemoveNic | ResizeVm | ReportDiskResized | EvictVm
)


# -- state ----------------------------------------------------------------------


class Nic(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A VM's network card: its network and, once the IPAM allocator gave it, its MAC."""

    id: UUID
    network_id: UUID
    mac: str = ""


class Vm(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A VM's state. gc=False: it holds only atoms and a tuple of strings, so it cannot
    be part of a reference cycle, and a read model with 100k of them then costs the
    cyclic garbage collector nothing."""

    id: UUID
    owner: str
    name: str
    cores: int
    ram: int
    disk: int
    image: str
    ssh_keys: tuple[str, ...]
    restart_policy: RestartPolicy
    status: Status
    desired: Desired
    host_id: UUID | None = None
    reason: str = ""
    accelerator: str = ""
    reboot_requests: int = 0  # a host agent reboots while reboots < reboot_requests
    reboots: int = 0
    # Placements so far: a host agent starts a guest for one epoch and kills a survivor of
    # an older one (a host that comes back after its VMs were moved) instead of keeping it.
    epoch: int = 0
    image_id: UUID | None = None
    image_store: str = ""
    disk_on_host: int = 0  # the disk size the host agent last reported (vm.disk_resized)
    user_data: str = ""
    nics: tuple[Nic, ...] = ()  # in the order they were added: the guest's NIC order

    def nic(self, nic_id: UUID) -> Nic | None:
        return next((n for n in self.nics if n.id == nic_id), None)


def evolve(vm: Vm | None, event: Event) -> Vm | None:
    """Fold one event into the state. Total: it never raises for a recorded event."""
    match event:
        case VmRequested():
            return Vm(
                id=event.vm_id, owner=event.owner, name=event.name, cores=event.cores, ram=event.ram,
                disk=event.disk, image=event.image, ssh_keys=event.ssh_keys,
                restart_policy=event.restart_policy, status=Status.REQUESTED, desired=Desired.RUNNING,
                image_id=event.image_id, image_store=event.image_store,
                user_data=event.user_data,
            )
    if vm is None:
        return None
    match event:
        case VmScheduled():
            status = Status.SCHEDULED if vm.desired is Desired.RUNNING else Status.STOPPED
            return msgspec.structs.replace(vm, host_id=event.host_id, status=status, reason="", epoch=vm.epoch + 1)
        case VmUnschedulable():
            return msgspec.structs.replace(vm, status=Status.UNSCHEDULABLE, reason=event.reason)
        case VmStartRequested():
            # A VM without a host (its host was lost while it was stopped) waits for one.
            status = Status.STARTING if vm.host_id is not None else Status.REQUESTED
            return msgspec.structs.replace(vm, desired=Desired.RUNNING, status=status, reason="")
        case VmStarted():
            return msgspec.structs.replace(
                vm, status=Status.RUNNING, host_id=event.host_id, accelerator=event.accelerator, reason=""
            )
        case VmStopRequested():
            return msgspec.structs.replace(vm, desired=Desired.STOPPED, status=Status.STOPPING)
        case VmStopped():
            # A stop the user did not ask for (the guest powered off) is still a stop.
            if vm.desired is Desired.DELETED:
                return msgspec.structs.replace(vm, status=Status.DELETING, reason=event.reason)
            return msgspec.structs.replace(vm, status=Status.STOPPED, desired=Desired.STOPPED, reason=event.reason)
        case VmRebootRequested():
            return msgspec.structs.replace(vm, reboot_requests=vm.reboot_requests + 1)
        case VmRebooted():
            return msgspec.structs.replace(vm, reboots=vm.reboots + 1)
        case VmCrashed():
            return msgspec.structs.replace(vm, status=Status.CRASHED, reason=event.reason)
        case VmFailed():
            return msgspec.structs.replace(vm, status=Status.FAILED, reason=event.reason)
        case VmDeleteRequested():
            return msgspec.structs.replace(vm, desired=Desired.DELETED, status=Status.DELETING)
        case VmDeleted():
            return msgspec.structs.replace(vm, status=Status.DELETED, desired=Desired.DELETED)
        case VmHostLost():
            if vm.desired is Desired.DELETED:
                return msgspec.structs.replace(vm, status=Status.DELETED, host_id=None, reason=event.reason)
            if vm.desired is Desired.RUNNING and vm.restart_policy is RestartPolicy.ALWAYS:
                return msgspec.structs.replace(vm, status=Status.REQUESTED, host_id=None, reason=event.reason)
            return msgspec.structs.replace(vm, status=Status.STOPPED, desired=Desired.STOPPED, host_id=None,
                                           reason=event.reason)
        case VmResized():
            return msgspec.structs.replace(vm, cores=event.cores, ram=event.ram, disk=event.disk)
        case VmDiskResized():
            return msgspec.structs.replace(vm, disk_on_host=event.disk)
        case VmNicAdded():
            return msgspec.structs.replace(vm, nics=(*vm.nics, Nic(id=event.nic_id, network_id=event.network_id)))
        case VmNicAllocated():
            return msgspec.structs.replace(vm, nics=tuple(
                msgspec.structs.replace(n, mac=event.mac) if n.id == event.nic_id else n for n in vm.nics))
        case VmNicRemoved():
            return msgspec.structs.replace(vm, nics=tuple(n for n in vm.nics if n.id != event.nic_id))
    return vm


def check_user_data(text: str, limit: int) -> str:
    """User data as stored: text of at most ``limit`` characters that encodes as UTF-8
    (a lone surrogate from a JSON escape does not) and holds no NUL."""
    if len(text) > limit:
        raise OutOfBounds("user_data", f"{len(text)} characters; at most {limit} are allowed")
    if "\x00" in text:
        raise InvalidValue("user_data", "contains a NUL character; user data is text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidValue("user_data", "is not valid Unicode text (a lone surrogate)") from None
    return text


def _require(vm: Vm | None, vm_id: UUID) -> Vm:
    if vm is None:
        raise NotFound(f"VM {vm_id} does not exist")
    if vm.status is Status.DELETED:
        raise Rejected(f"VM {vm_id} is deleted")
    return vm


def _from_host(vm: Vm, host_id: UUID, what: str) -> None:
    if vm.host_id != host_id:
        raise Rejected(f"host {host_id} reports {what} for VM {vm.id}, which is placed on {vm.host_id}")


def decide(vm: Vm | None, command: Command) -> list[Event]:
    """What happens when ``command`` meets ``vm``. Pure; raises Rejected or NotFound."""
    if isinstance(command, CreateVm):
        if vm is not None:
            raise Rejected(f"VM {command.vm_id} already exists")
        return [VmRequested(
            vm_id=command.vm_id, owner=command.owner, name=command.name, cores=command.cores,
            ram=command.ram, disk=command.disk, image=command.image, ssh_keys=command.ssh_keys,
            restart_policy=command.restart_policy, image_id=command.image_id, image_store=command.image_store,
            user_data=command.user_data,
        )]
    vm = _require(vm, command.vm_id)  # type: ignore[attr-defined]
    match command:
        case StartVm():
            if vm.status in (Status.RUNNING, Status.STARTING, Status.SCHEDULED, Status.REQUESTED,
                             Status.UNSCHEDULABLE) and vm.desired is Desired.RUNNING:
                return []  # already on its way: starting twice is not an error
            if vm.status in (Status.STOPPED, Status.CRASHED, Status.FAILED):
                return [VmStartRequested(vm_id=vm.id)]
            raise Rejected(f"cannot start a VM that is {vm.status}")
        case StopVm():
            if vm.status in (Status.STOPPED, Status.STOPPING):
                return []
            if vm.status in (Status.RUNNING, Status.STARTING, Status.SCHEDULED, Status.CRASHED):
                return [VmStopRequested(vm_id=vm.id)]
            raise Rejected(f"cannot stop a VM that is {vm.status}")
        case RebootVm():
            if vm.status is not Status.RUNNING:
                raise Rejected(f"cannot reboot a VM that is {vm.status}")
            return [VmRebootRequested(vm_id=vm.id)]
        case DeleteVm():
            if vm.status is Status.DELETING:
                return []
            if vm.host_id is None:
                # Not placed (never, or its host was lost): nothing runs anywhere, so it is gone at once.
                return [VmDeleteRequested(vm_id=vm.id), VmDeleted(vm_id=vm.id)]
            return [VmDeleteRequested(vm_id=vm.id)]
        case PlaceVm():
            if vm.status is not Status.REQUESTED and vm.status is not Status.UNSCHEDULABLE:
                raise Rejected(f"VM {vm.id} is {vm.status}, not waiting for a host")
            return [VmScheduled(vm_id=vm.id, host_id=command.host_id)]
        case MarkUnschedulable():
            if vm.status is not Status.REQUESTED:
                raise Rejected(f"VM {vm.id} is {vm.status}, not waiting for a host")
            return [VmUnschedulable(vm_id=vm.id, reason=command.reason)]
        case ReportStarted():
            _from_host(vm, command.host_id, "a start")
            if vm.status is Status.RUNNING:
                return []
            if vm.status is Status.DELETING:
                raise Rejected(f"VM {vm.id} is being deleted")
            return [VmStarted(vm_id=vm.id, host_id=command.host_id, accelerator=command.accelerator)]
        case ReportStopped():
            _from_host(vm, command.host_id, "a stop")
            if vm.status is Status.STOPPED:
                return []
            return [VmStopped(vm_id=vm.id, host_id=command.host_id, reason=command.reason)]
        case ReportRebooted():
            _from_host(vm, command.host_id, "a reboot")
            return [VmRebooted(vm_id=vm.id, host_id=command.host_id)]
        case ReportCrashed():
            _from_host(vm, command.host_id, "a crash")
            if vm.status is Status.CRASHED:
                return []
            return [VmCrashed(vm_id=vm.id, host_id=command.host_id, reason=command.reason)]
        case ReportFailed():
            _from_host(vm, command.host_id, "a failure")
            return [VmFailed(vm_id=vm.id, host_id=command.host_id, reason=command.reason)]
        case ResizeVm():
            return _resize(vm, command)
        case ReportDiskResized():
            _from_host(vm, command.host_id, "a disk resize")
            if command.disk == vm.disk_on_host:
                return []
            return [VmDiskResized(vm_id=vm.id, host_id=command.host_id, disk=command.disk, online=command.online)]
        case ReportDeleted():
            _from_host(vm, command.host_id, "a deletion")
            if vm.status is not Status.DELETING:
                raise Rejected(f"VM {vm.id} is {vm.status}, not being deleted")
            return [VmDeleted(vm_id=vm.id, host_id=command.host_id)]
        case EvictVm():
            if vm.host_id != command.host_id:
                return []  # moved already (a retry, or a second detector)
            return [VmHostLost(vm_id=vm.id, host_id=command.host_id, reason=command.reason)]
        case AddNic():
            if vm.status is Status.DELETING:
                raise Rejected(f"VM {vm.id} is being deleted")
            if vm.nic(command.nic_id) is not None:
                return []
            if any(n.network_id == command.network_id for n in vm.nics):
                raise Rejected(f"VM {vm.name!r} is already on network {command.network_id}", "networks")
            if len(vm.nics) >= MAX_NICS:
                raise Rejected(f"VM {vm.name!r} has {len(vm.nics)} NICs; at most {MAX_NICS} are allowed", "networks")
            return [VmNicAdded(vm_id=vm.id, nic_id=command.nic_id, network_id=command.network_id)]
        case AllocateNic():
            nic = vm.nic(command.nic_id)
            if nic is None or nic.mac == command.mac:
                return []  # removed meanwhile, or already given
            if nic.mac:
                raise Rejected(f"NIC {nic.id} already has MAC {nic.mac}")
            return [VmNicAllocated(vm_id=vm.id, nic_id=nic.id, mac=command.mac)]
        case RemoveNic():
            nic = next((n for n in vm.nics if n.network_id == command.network_id), None)
            if nic is None:
                raise NotFound(f"VM {vm.name!r} has no NIC on network {command.network_id}")
            return [VmNicRemoved(vm_id=vm.id, nic_id=nic.id)]
    raise Rejected(f"{type(command).__name__} is not a VM command")


# Where cores and RAM may change: no guest runs or is about to (a stopped VM keeps its claim).
_RESIZABLE = (Status.STOPPED, Status.REQUESTED, Status.UNSCHEDULABLE)


def _resize(vm: Vm, command: ResizeVm) -> list[Event]:
    if vm.status is Status.DELETING:
        raise Rejected(f"VM {vm.id} is being deleted")
    if command.disk < vm.disk:
        raise Rejected(f"disk: a disk only grows: {command.disk} bytes is less than its {vm.disk}", "disk")
    if (command.cores, command.ram) != (vm.cores, vm.ram) and vm.status not in _RESIZABLE:
        raise Rejected(f"cores and ram change only while the VM is stopped; it is {vm.status} (stop it first)",
                       "cores" if command.cores != vm.cores else "ram")
    if (command.cores, command.ram, command.disk) == (vm.cores, vm.ram, vm.disk):
        return []
    return [VmResized(vm_id=vm.id, cores=command.cores, ram=command.ram, disk=command.disk)]


def stream_name(vm_id: UUID) -> str:
    return f"vm-{vm_id}"


def slices(vm: Vm | None) -> tuple[str, ...]:
    """A VM's events belong to the slice of the host it is placed on. The command side
    tags each event with the slices of the state before and after it, so the host a VM
    leaves sees the event that moves it away, and the host it goes to the one that
    brings it."""
    return (f"host-{vm.host_id}",) if vm is not None and vm.host_id is not None else ()
