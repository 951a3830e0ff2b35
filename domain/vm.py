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

from .errors import NotFound, Rejected
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


VmEvent = (
    VmRequested | VmScheduled | VmUnschedulable | VmStartRequested | VmStarted | VmStopRequested
    | VmStopped | VmRebootRequested | VmRebooted | VmCrashed | VmFailed | VmDeleteRequested | VmDeleted
    | VmHostLost
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


class StartVm(Command, tag="vm.start", frozen=True):
    vm_id: UUID


class StopVm(Command, tag="vm.stop", frozen=True):
    vm_id: UUID


class RebootVm(Command, tag="vm.reboot", frozen=True):
    vm_id: UUID


class DeleteVm(Command, tag="vm.delete", frozen=True):
    vm_id: UUID


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


# What a user may ask of an existing VM, and what a host agent may report about one.
VmLifecycleCommand = StartVm | StopVm | RebootVm | DeleteVm
VmReport = ReportStarted | ReportStopped | ReportRebooted | ReportCrashed | ReportFailed | ReportDeleted

VmCommand = (
    CreateVm | StartVm | StopVm | RebootVm | DeleteVm | PlaceVm | MarkUnschedulable | ReportStarted
    | ReportStopped | ReportRebooted | ReportCrashed | ReportFailed | ReportDeleted | EvictVm
)


# -- state ----------------------------------------------------------------------


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


def evolve(vm: Vm | None, event: Event) -> Vm | None:
    """Fold one event into the state. Total: it never raises for a recorded event."""
    match event:
        case VmRequested():
            return Vm(
                id=event.vm_id, owner=event.owner, name=event.name, cores=event.cores, ram=event.ram,
                disk=event.disk, image=event.image, ssh_keys=event.ssh_keys,
                restart_policy=event.restart_policy, status=Status.REQUESTED, desired=Desired.RUNNING,
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
    return vm


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
            restart_policy=command.restart_policy,
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
        case ReportDeleted():
            _from_host(vm, command.host_id, "a deletion")
            if vm.status is not Status.DELETING:
                raise Rejected(f"VM {vm.id} is {vm.status}, not being deleted")
            return [VmDeleted(vm_id=vm.id, host_id=command.host_id)]
        case EvictVm():
            if vm.host_id != command.host_id:
                return []  # moved already (a retry, or a second detector)
            return [VmHostLost(vm_id=vm.id, host_id=command.host_id, reason=command.reason)]
    raise Rejected(f"{type(command).__name__} is not a VM command")


def stream_name(vm_id: UUID) -> str:
    return f"vm-{vm_id}"


def slices(vm: Vm | None) -> tuple[str, ...]:
    """A VM's events belong to the slice of the host it is placed on. The command side
    tags each event with the slices of the state before and after it, so the host a VM
    leaves sees the event that moves it away, and the host it goes to the one that
    brings it."""
    return (f"host-{vm.host_id}",) if vm is not None and vm.host_id is not None else ()
