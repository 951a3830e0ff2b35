"""The Host aggregate: registered capacity, and the claims VMs hold on it.

A placement claims capacity on the host's stream in the same transaction that
places the VM, with optimistic concurrency on the host stream: two schedulers (or
two placements from one) can never both take the last free core.
"""

from __future__ import annotations

import enum
import functools
import uuid
from uuid import UUID

import msgspec

from .errors import InvalidValue, NotFound, Rejected
from .events import Command, Event

HOST_NAMESPACE = uuid.UUID("6f1f1d2e-8d53-4c1e-9a0e-4b2f5bd0c001")


def host_id_for(hostname: str) -> UUID:
    """A host's id follows from its name, so an agent and an admin agree on it."""
    return uuid.uuid5(HOST_NAMESPACE, hostname)


class HostStatus(enum.StrEnum):
    """What the log knows of a host's life. ``suspect`` (lease gone, not yet declared) is
    seen by the failure detector only; it is not a state of the log."""

    UNKNOWN = "unknown"  # registered, its agent never heard from
    UP = "up"  # its agent holds its heartbeat lease (session)
    DEAD = "dead"  # declared dead: its VMs were moved away
    REMOVED = "removed"  # taken out by an admin


class HostRegistered(Event, tag="host.registered", frozen=True):
    """A host joined with its capacity (by an admin or its own agent)."""

    host_id: UUID
    hostname: str
    cores: int
    ram: int
    disk: int
    hypervisor: str = "qemu"


class HostCapacityChanged(Event, tag="host.capacity_changed", frozen=True):
    """A host re-registered with a different capacity."""

    host_id: UUID
    cores: int
    ram: int
    disk: int


class CapacityClaimed(Event, tag="host.capacity_claimed", frozen=True):
    """A VM's share of a host, claimed atomically with vm.scheduled."""

    host_id: UUID
    vm_id: UUID
    cores: int
    ram: int
    disk: int


class CapacityReleased(Event, tag="host.capacity_released", frozen=True):
    """A deleted VM's claim is returned to the host."""

    host_id: UUID
    vm_id: UUID


class HostUp(Event, tag="host.up", frozen=True):
    """The host's agent took its heartbeat lease: a new session. Until its agent is up a
    host gets no placements; a host that was declared dead comes back with this."""

    host_id: UUID
    session: int  # the lease's own id: tells this life of the agent from the next
    lease_ttl: float


class HostDeclaredDead(Event, tag="host.declared_dead", frozen=True):
    """The failure detector saw the host's lease gone past the fence deadline: the host
    has stopped its guests (or was stopped), and its VMs may run elsewhere."""

    host_id: UUID
    session: int  # the session declared dead; a newer one refutes the declaration
    evidence: str
    by: str = ""  # the detector instance


class HostMaintenanceChanged(Event, tag="host.maintenance_changed", frozen=True):
    """An admin took the host out of placement (on) or back into it (off)."""

    host_id: UUID
    maintenance: bool


class HostEvacuationRequested(Event, tag="host.evacuation_requested", frozen=True):
    """An admin asked for every VM of the host to be restarted elsewhere now."""

    host_id: UUID


class HostEvacuated(Event, tag="host.evacuated", frozen=True):
    """The host's VMs were taken off it (appended with their vm.host_lost): by its agent
    after it stopped their guests, or by the scheduler when no agent was up to do it."""

    host_id: UUID
    vms: int


class HostRemoved(Event, tag="host.removed", frozen=True):
    """An admin removed a host that held no VM; registering it again brings it back."""

    host_id: UUID


class HostStoresDeclared(Event, tag="host.stores_declared", frozen=True):
    """The image stores this host reaches (a VM whose image is in a store goes only to
    hosts that reach it)."""

    host_id: UUID
    stores: tuple[str, ...]


class ClaimChanged(Event, tag="host.claim_changed", frozen=True):
    """A resized VM's claim, replaced atomically with vm.resized."""

    host_id: UUID
    vm_id: UUID
    cores: int
    ram: int
    disk: int


class HostCredentialIssued(Event, tag="host.credential_issued", frozen=True):
    """An admin issued the host's agent its own credential (``ucloud host join``). Only the
    credential's sha256 is recorded: the credential itself was shown once and is kept on
    the host. Issuing again revokes the one before; so does removing the host."""

    host_id: UUID
    digest: str  # sha256 of the credential, 64 lowercase hex digits
    by: str = ""  # the admin who issued it


HostEvent = (
    HostRegistered | HostCapacityChanged | CapacityClaimed | CapacityReleased | HostStoresDeclared | ClaimChanged
    | HostUp | HostDeclaredDead | HostMaintenanceChanged | HostEvacuationRequested | HostRemoved | HostEvacuated
    | HostCredentialIssued
)
HOST_EVENT_TYPES: tuple[type[Event], ...] = HostEvent.__args__


class RegisterHost(Command, tag="host.register", frozen=True):
    hostname: str
    cores: int
    ram: int
    disk: int
    hypervisor: str = "qemu"
    stores: tuple[str, ...] | None = None  # None: leave the declared stores as they are


class ClaimCapacity(Command, tag="host.claim", frozen=True):
    host_id: UUID
    vm_id: UUID
    cores: int
    ram: int
    disk: int


class ReleaseCapacity(Command, tag="host.release", frozen=True):
    host_id: UUID
    vm_id: UUID


class MarkUp(Command, tag="host.mark_up", frozen=True):
    host_id: UUID
    session: int
    lease_ttl: float


class DeclareDead(Command, tag="host.declare_dead", frozen=True):
    host_id: UUID
    session: int
    evidence: str
    by: str = ""


class SetMaintenance(Command, tag="host.set_maintenance", frozen=True):
    host_id: UUID
    maintenance: bool


class Evacuate(Command, tag="host.evacuate", frozen=True):
    host_id: UUID


class FinishEvacuation(Command, tag="host.finish_evacuation", frozen=True):
    host_id: UUID
    vms: int


class RemoveHost(Command, tag="host.remove", frozen=True):
    host_id: UUID


class IssueCredential(Command, tag="host.issue_credential", frozen=True):
    host_id: UUID
    digest: str
    by: str = ""
class ChangeClaim(Command, tag="host.change_claim", frozen=True):
    host_id: UUID
    vm_id: UUID
    cores: int
    ram: int
    disk: int


class Claim(msgspec.Struct, frozen=True, gc=False):
    cores: int
    ram: int
    disk: int


class Host(msgspec.Struct, frozen=True, kw_only=True, dict=True):
    """``dict=True`` only lets the usage totals below be cached per instance (a Host is
    immutable: evolve makes a new one). Summing the claims on every access made placement
    over 1,000 hosts cost ~15 ms per VM (docs/performance.md, scheduler benchmark)."""

    id: UUID
    hostname: str
    cores: int
    ram: int
    disk: int
    hypervisor: str
    claims: dict[UUID, Claim] = {}
    status: HostStatus = HostStatus.UNKNOWN
    session: int = 0
    lease_ttl: float = 0.0
    maintenance: bool = False
    reason: str = ""  # why it was declared dead
    evacuating: bool = False  # asked to give up its VMs; its agent stops them, then they move
    credential: str = ""  # sha256 of the agent's current credential; "" when none was issued

    @property
    def schedulable(self) -> bool:
        """Only a host whose agent is up, and not in maintenance, gets placements."""
        return self.status is HostStatus.UP and not self.maintenance
    stores: tuple[str, ...] = ()

    @functools.cached_property
    def used_cores(self) -> int:
        return sum(c.cores for c in self.claims.values())

    @functools.cached_property
    def used_ram(self) -> int:
        return sum(c.ram for c in self.claims.values())

    @functools.cached_property
    def used_disk(self) -> int:
        return sum(c.disk for c in self.claims.values())


def evolve(host: Host | None, event: Event) -> Host | None:
    match event:
        case HostRegistered() if host is not None and host.status is not HostStatus.REMOVED:
            # Events appended before removal existed; decide no longer produces this.
            return msgspec.structs.replace(host, cores=event.cores, ram=event.ram, disk=event.disk)
        case HostRegistered():
            return Host(id=event.host_id, hostname=event.hostname, cores=event.cores, ram=event.ram,
                        disk=event.disk, hypervisor=event.hypervisor)
    if host is None:
        return None
    match event:
        case HostCapacityChanged():
            return msgspec.structs.replace(host, cores=event.cores, ram=event.ram, disk=event.disk)
        case CapacityClaimed():
            claims = dict(host.claims)
            claims[event.vm_id] = Claim(event.cores, event.ram, event.disk)
            return msgspec.structs.replace(host, claims=claims)
        case CapacityReleased():
            claims = dict(host.claims)
            claims.pop(event.vm_id, None)
            return msgspec.structs.replace(host, claims=claims)
        case HostUp():
            return msgspec.structs.replace(host, status=HostStatus.UP, session=event.session,
                                           lease_ttl=event.lease_ttl, reason="")
        case HostDeclaredDead():
            return msgspec.structs.replace(host, status=HostStatus.DEAD, reason=event.evidence)
        case HostMaintenanceChanged():
            return msgspec.structs.replace(host, maintenance=event.maintenance)
        case HostEvacuationRequested():
            return msgspec.structs.replace(host, maintenance=True, evacuating=True)
        case HostEvacuated():
            return msgspec.structs.replace(host, evacuating=False)
        case HostRemoved():
            return msgspec.structs.replace(host, status=HostStatus.REMOVED, claims={}, credential="")
        case HostCredentialIssued():
            return msgspec.structs.replace(host, credential=event.digest)
        case ClaimChanged():
            claims = dict(host.claims)
            claims[event.vm_id] = Claim(event.cores, event.ram, event.disk)
            return msgspec.structs.replace(host, claims=claims)
        case HostStoresDeclared():
            return msgspec.structs.replace(host, stores=event.stores)
    return host


class Overcommit(msgspec.Struct, frozen=True):
    """How far each resource may be booked beyond the physical amount."""

    cpu: float = 4.0
    ram: float = 1.0
    disk: float = 1.0


def fits(host: Host, cores: int, ram: int, disk: int, overcommit: Overcommit) -> str | None:
    """None if the claim fits, else the reason it does not."""
    if host.used_cores + cores > host.cores * overcommit.cpu:
        return f"cores: {host.used_cores}+{cores} > {host.cores}x{overcommit.cpu:g}"
    if host.used_ram + ram > host.ram * overcommit.ram:
        return f"ram: {host.used_ram}+{ram} > {host.ram}x{overcommit.ram:g}"
    if host.used_disk + disk > host.disk * overcommit.disk:
        return f"disk: {host.used_disk}+{disk} > {host.disk}x{overcommit.disk:g}"
    return None


def decide(host: Host | None, command: Command, overcommit: Overcommit | None = None) -> list[Event]:
    match command:
        case RegisterHost():
            for field in ("cores", "ram", "disk"):
                if getattr(command, field) <= 0:
                    raise InvalidValue(field, "must be positive")
            if not command.hostname or len(command.hostname) > 253:
                raise InvalidValue("hostname", "must be 1 to 253 characters")
            host_id = host_id_for(command.hostname)
            stores: list[Event] = []
            if command.stores is not None and command.stores != (host.stores if host else ()):
                stores = [HostStoresDeclared(host_id=host_id, stores=command.stores)]
            if host is None or host.status is HostStatus.REMOVED:
                return [HostRegistered(host_id=host_id, hostname=command.hostname, cores=command.cores,
                                       ram=command.ram, disk=command.disk, hypervisor=command.hypervisor), *stores]
            if (host.cores, host.ram, host.disk) == (command.cores, command.ram, command.disk):
                return stores  # registering again with the same capacity changes nothing more
            return [HostCapacityChanged(host_id=host_id, cores=command.cores, ram=command.ram, disk=command.disk),
                    *stores]
        case ClaimCapacity():
            if host is None:
                raise NotFound(f"host {command.host_id} does not exist")
            if command.vm_id in host.claims:
                return []
            if not host.schedulable:
                raise Rejected(f"host {host.hostname} takes no placements: it is {display_status(host)}")
            reason = fits(host, command.cores, command.ram, command.disk, overcommit or Overcommit())
            if reason is not None:
                raise Rejected(f"host {host.hostname} has no room: {reason}")
            return [CapacityClaimed(host_id=host.id, vm_id=command.vm_id, cores=command.cores,
                                    ram=command.ram, disk=command.disk)]
        case ChangeClaim():
            if host is None:
                raise NotFound(f"host {command.host_id} does not exist")
            old = host.claims.get(command.vm_id)
            if old is None:
                raise Rejected(f"VM {command.vm_id} holds no claim on host {host.hostname}")
            if (old.cores, old.ram, old.disk) == (command.cores, command.ram, command.disk):
                return []
            without = msgspec.structs.replace(host, claims={k: v for k, v in host.claims.items() if k != command.vm_id})
            reason = fits(without, command.cores, command.ram, command.disk, overcommit or Overcommit())
            if reason is not None:
                raise Rejected(f"host {host.hostname} has no room for the new size: {reason}")
            return [ClaimChanged(host_id=host.id, vm_id=command.vm_id, cores=command.cores, ram=command.ram,
                                 disk=command.disk)]
        case ReleaseCapacity():
            if host is None:
                raise NotFound(f"host {command.host_id} does not exist")
            if command.vm_id not in host.claims:
                return []
            return [CapacityReleased(host_id=host.id, vm_id=command.vm_id)]
    if host is None or host.status is HostStatus.REMOVED:
        raise NotFound(f"host {getattr(command, 'host_id', '?')} does not exist")
    match command:
        case MarkUp():
            if host.status is HostStatus.UP and host.session == command.session:
                return []
            return [HostUp(host_id=host.id, session=command.session, lease_ttl=command.lease_ttl)]
        case DeclareDead():
            if host.status is HostStatus.DEAD and host.session == command.session:
                return []  # declared already (another detector, a retry)
            if host.status is not HostStatus.UP or host.session != command.session:
                raise Rejected(f"host {host.hostname} is {host.status} in session {host.session}, "
                               f"not up in session {command.session}: nothing to declare")
            return [HostDeclaredDead(host_id=host.id, session=command.session, evidence=command.evidence,
                                     by=command.by)]
        case SetMaintenance():
            if host.maintenance == command.maintenance:
                return []
            return [HostMaintenanceChanged(host_id=host.id, maintenance=command.maintenance)]
        case Evacuate():
            if host.evacuating:
                return []
            return [HostEvacuationRequested(host_id=host.id)]
        case FinishEvacuation():
            if not host.evacuating:
                return []
            return [HostEvacuated(host_id=host.id, vms=command.vms)]
        case RemoveHost():
            if host.claims:
                names = ", ".join(sorted(str(vm_id) for vm_id in host.claims)[:10])
                more = f" and {len(host.claims) - 10} more" if len(host.claims) > 10 else ""
                raise Rejected(f"host {host.hostname} still holds {len(host.claims)} VM(s): {names}{more}; "
                               f"evacuate or delete them first")
            return [HostRemoved(host_id=host.id)]
        case IssueCredential():
            if len(command.digest) != 64 or not all(c in "0123456789abcdef" for c in command.digest):
                raise InvalidValue("digest", "must be a sha256 in 64 lowercase hex digits")
            return [HostCredentialIssued(host_id=host.id, digest=command.digest, by=command.by)]
    raise Rejected(f"{type(command).__name__} is not a host command")


def display_status(host: Host) -> str:
    """The state an operator reads: maintenance shows over up and unknown."""
    if host.evacuating and host.status is HostStatus.UP:
        return "evacuating"
    if host.maintenance and host.status in (HostStatus.UP, HostStatus.UNKNOWN):
        return "maintenance"
    return host.status.value


def stream_name(host_id: UUID) -> str:
    return f"host-{host_id}"


# A host credential: ``uch1.<host id, 32 hex digits>.<43 base64url characters: 256 random
# bits>``. The host id in it says whose digest to compare with; the random part is what
# proves it. Only the sha256 of the whole text is recorded (host.credential_issued).
CREDENTIAL_PREFIX = "uch1."
CREDENTIAL_LENGTH = len(CREDENTIAL_PREFIX) + 32 + 1 + 43
_BASE64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def credential_for(host_id: UUID, secret: bytes) -> str:
    """The credential text for ``host_id`` with 32 random bytes (the caller draws them)."""
    import base64

    if len(secret) != 32:
        raise ValueError("a host credential takes 32 random bytes")
    return f"{CREDENTIAL_PREFIX}{host_id.hex}.{base64.urlsafe_b64encode(secret).decode().rstrip('=')}"


def credential_host(text: str) -> UUID | None:
    """The host a credential names, or None when ``text`` is not a host credential."""
    if len(text) != CREDENTIAL_LENGTH or not text.startswith(CREDENTIAL_PREFIX):
        return None
    host_hex, dot, secret = text[len(CREDENTIAL_PREFIX):].partition(".")
    if not dot or len(host_hex) != 32 or not all(c in "0123456789abcdef" for c in host_hex) or not (
            set(secret) <= _BASE64URL):
        return None
    return UUID(hex=host_hex)


def credential_digest(text: str) -> str:
    """What the log records of a credential: its sha256, in hex."""
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def slice_name(host_id: UUID) -> str:
    """The read slice of one host: every event its agent needs, and no other."""
    return f"host-{host_id}"


def slices(host: Host | None) -> tuple[str, ...]:
    """A host's own events are in its slice."""
    return (slice_name(host.id),) if host is not None else ()
