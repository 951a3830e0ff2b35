"""The command side's one entry point: every user or system intent goes through here.

Handlers are short: load, decide (pure domain), record. Validation of what users
write happens in the domain (units, names, keys) so the gateway and CLI stay thin.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

import msgspec

from ucloud.domain import file as file_domain
from ucloud.domain import host as host_domain
from ucloud.domain import image as image_domain
from ucloud.domain import operators as operators_domain
from ucloud.domain import sshkey as sshkey_domain
from ucloud.domain import vm as vm_domain
from ucloud.domain.catalogue import build_codec
from ucloud.domain.errors import Forbidden, InvalidValue, NotFound, OutOfBounds, Rejected
from ucloud.domain.events import Command, Event, EventCodec
from ucloud.domain.limits import DEFAULT_LIMITS, Limits, MiB, check_at_most, vm_request
from ucloud.domain.names import check_hostname, check_name, check_user_name
from ucloud.domain.units import format_size, parse_cores, parse_size
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.records import Tracking

from .aggregates import ADMIN, FILE, HOST, IMAGE, SSHKEY, VM
from .networks import add_nic, check_network_names
from .unit_of_work import Actor, Loaded, Outcome, Repository, Session

NIC_ATTEMPTS = 100  # see create_vm
IDEMPOTENCY_NAMESPACE = uuid.UUID("6f1f1d2e-8d53-4c1e-9a0e-4b2f5bd0c003")
# Names the hosts may provide themselves, outside the catalogue: the fallback for a log in
# which they are not catalogued (yet). ``tiny`` is registered as an ordinary public image
# of the catalogue by `ucloud up` (with its host agent) and by `ucloud image builtin tiny`;
# once it is, the catalogue's image is the one used. ``debian-12`` is still placed on hosts
# by the operator (docs/operations.md). Every other name must be a ready image of the
# catalogue (the owner's, or a public one).
HOST_IMAGES = frozenset({"tiny", "debian-12"})
DEFAULT_STORE = "local"


class CommandService:
    def __init__(self, store: EventStore, codec: EventCodec | None = None,
                 overcommit: host_domain.Overcommit | None = None, limits: Limits | None = None, *,
                 host_images: frozenset[str] = HOST_IMAGES,
                 image_stores: tuple[str, ...] = (DEFAULT_STORE,)) -> None:
        """``host_images``: names the hosts may provide when the catalogue has no image of
        the name (see HOST_IMAGES; empty: the catalogue only); ``image_stores``:
        the stores images may be imported into, the first the default."""
        self.host_images = host_images
        self.image_stores = image_stores
        self.store = store
        self.limits = limits or DEFAULT_LIMITS
        self.codec = codec or build_codec()
        self.repository = Repository(store, self.codec)
        self.overcommit = overcommit or host_domain.Overcommit()

    # -- VMs --------------------------------------------------------------------

    async def create_vm(
        self,
        actor: Actor,
        *,
        name: str,
        cores: int | str,
        ram: int | str,
        disk: int | str,
        image: str,
        ssh_keys: tuple[str, ...] | list[str] = (),
        restart_policy: str = "always",
        owner: str | None = None,
        idempotency_key: str | None = None,
        user_data: str = "",
        networks: Sequence[str] = (),
    ) -> Outcome[UUID]:
        """``networks``: names of the owner's networks, one NIC on each, in this order."""
        owner = self._owner(actor, owner)
        network_names = check_network_names(networks)
        limits = self.limits
        check_name(name, "name")
        check_name(image, "image")
        try:
            policy = vm_domain.RestartPolicy(restart_policy)
        except ValueError:
            raise InvalidValue("restart_policy", f"must be one of {[p.value for p in vm_domain.RestartPolicy]}") from None
        # Bounded before anything looks at the entries; repeated names are collapsed
        # (a set of keys: naming one twice installs it once), first occurrence first.
        if len(ssh_keys) > limits.vm_ssh_keys:
            raise OutOfBounds("ssh_keys", f"{len(ssh_keys)} names; at most {limits.vm_ssh_keys} are allowed")
        for index, key_name in enumerate(ssh_keys):
            check_name(key_name, f"ssh_keys[{index}]")
        keys = tuple(dict.fromkeys(ssh_keys))
        vm_domain.check_user_data(user_data, limits.vm_user_data)
        cores_count, ram_bytes, disk_bytes = vm_request(limits, cores, ram, disk)
        vm_id = uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"{owner}\0{idempotency_key}") if idempotency_key else uuid.uuid4()

        async def work(session: Session) -> UUID:
            command = vm_domain.CreateVm(
                vm_id=vm_id, owner=owner, name=name, cores=cores_count, ram=ram_bytes, disk=disk_bytes, image=image,
                ssh_keys=keys, restart_policy=policy, user_data=user_data,
            )
            # The catalogue first (the owner's image, else a public one: `tiny` once it is
            # registered); a host-provided name only when the catalogue has no such image.
            catalogued = await self._visible_image(session, owner, image)
            if catalogued is None and image not in self.host_images:
                raise Rejected(f"image: no image named {image!r} (see 'ucloud image list')", "image")
            if catalogued is not None:
                if catalogued.status is image_domain.ImageStatus.READY and disk_bytes < catalogued.virtual_size:
                    raise OutOfBounds("disk", f"{format_size(disk_bytes)} is smaller than the image {image!r} "
                                              f"({format_size(catalogued.virtual_size)})")
                session.record(IMAGE, catalogued.id, image_domain.decide(
                    catalogued, image_domain.UseImage(image_id=catalogued.id, vm_id=vm_id, vm_name=name)))
                command = msgspec.structs.replace(command, image_id=catalogued.id, image_store=catalogued.store)
            for key_name in command.ssh_keys:
                key = await session.load(SSHKEY, sshkey_domain.key_id_for(owner, key_name))
                if key is None or key.deleted:
                    raise Rejected(f"ssh_keys: no SSH key named {key_name!r}", "ssh_keys")
            existing = await session.load(VM, command.vm_id)
            if existing is not None and idempotency_key:
                same = (existing.name, existing.cores, existing.ram, existing.disk, existing.image,
                        existing.user_data) == (
                    command.name, command.cores, command.ram, command.disk, command.image, command.user_data)
                if not same:
                    raise Rejected("this Idempotency-Key was already used for a different request")
                return command.vm_id  # a retry of the same request: answer as before
            events = vm_domain.decide(existing, command)
            session.record(VM, command.vm_id, events)
            vm = existing
            for event in events:
                vm = vm_domain.evolve(vm, event)
            for network_name in network_names:
                assert vm is not None
                await add_nic(session, vm, network_name)
                vm = vm_domain.evolve(vm, session.recorded[vm_domain.stream_name(vm.id)][-1])
            return command.vm_id

        # A NIC is a port on its network's stream too: many VMs created on one network at
        # once conflict there and are decided again, so they get more attempts.
        return await self.repository.transact(work, actor, attempts=NIC_ATTEMPTS if network_names else 10)

    async def vm_command(self, actor: Actor, command: vm_domain.VmLifecycleCommand) -> Outcome[None]:
        """start, stop, reboot, delete: on one's own VM (admins: on any)."""
        vm_id = command.vm_id

        async def work(session: Session) -> None:
            vm = await session.load(VM, vm_id)
            if vm is not None and not actor.is_admin and vm.owner != actor.name:
                vm = None  # another tenant's VM does not exist for you
            events = vm_domain.decide(vm, command)
            session.record(VM, vm_id, events)
            await self._release_image(session, vm, events)

        return await self.repository.transact(work, actor)

    async def resize_vm(self, actor: Actor, vm_id: UUID, *, cores: int | str | None = None,
                        ram: int | str | None = None, disk: int | str | None = None) -> Outcome[None]:
        """Change a VM's size (None: keep). The disk only grows, at any time; cores and RAM
        only while it is stopped. A placed VM's claim on its host changes in the same append,
        refused when the host has no room for the new size."""
        limits = self.limits
        new_cores = check_at_most(parse_cores(cores), limits.vm_cores, "cores", "a VM's cores") if cores is not None else None
        new_ram = check_at_most(parse_size(ram, "ram"), limits.vm_ram, "ram", "a VM's RAM") if ram is not None else None
        new_disk = check_at_most(parse_size(disk, "disk"), limits.vm_disk, "disk", "a VM's disk") if disk is not None else None
        if new_ram is not None and (new_ram < limits.vm_min_ram or new_ram % MiB):
            raise OutOfBounds("ram", f"must be a whole number of MiB and at least {format_size(limits.vm_min_ram)}")
        if new_cores is None and new_ram is None and new_disk is None:
            raise Rejected("give at least one of cores, ram, disk to change")

        async def work(session: Session) -> None:
            vm = await session.load(VM, vm_id)
            if vm is not None and not actor.is_admin and vm.owner != actor.name:
                vm = None
            if vm is None:
                raise NotFound(f"VM {vm_id} does not exist")
            command = vm_domain.ResizeVm(vm_id=vm_id, cores=vm.cores if new_cores is None else new_cores,
                                         ram=vm.ram if new_ram is None else new_ram,
                                         disk=vm.disk if new_disk is None else new_disk)
            events = vm_domain.decide(vm, command)
            session.record(VM, vm_id, events)
            if events and vm.host_id is not None:
                host = await session.load(HOST, vm.host_id)
                if host is not None and vm_id in host.claims:
                    session.record(HOST, vm.host_id, host_domain.decide(host, host_domain.ChangeClaim(
                        host_id=vm.host_id, vm_id=vm_id, cores=command.cores, ram=command.ram, disk=command.disk),
                        self.overcommit))

        return await self.repository.transact(work, actor)

    # -- SSH keys -----------------------------------------------------------------

    async def add_ssh_key(self, actor: Actor, name: str, public_key: str, owner: str | None = None) -> Outcome[UUID]:
        owner = self._owner(actor, owner)
        key_id = sshkey_domain.key_id_for(owner, name)
        command = sshkey_domain.AddSshKey(owner=owner, name=name, public_key=public_key)

        async def work(session: Session) -> UUID:
            key = await session.load(SSHKEY, key_id)
            session.record(SSHKEY, key_id, sshkey_domain.decide(key, command))
            return key_id

        return await self.repository.transact(work, actor)

    async def delete_ssh_key(self, actor: Actor, name: str, owner: str | None = None) -> Outcome[None]:
        owner = self._owner(actor, owner)
        check_name(name)
        key_id = sshkey_domain.key_id_for(owner, name)
        command = sshkey_domain.DeleteSshKey(owner=owner, name=name)

        async def work(session: Session) -> None:
            key = await session.load(SSHKEY, key_id)
            session.record(SSHKEY, key_id, sshkey_domain.decide(key, command))

        return await self.repository.transact(work, actor)

    # -- operators ------------------------------------------------------------------

    async def record_admin_recovery(self, actor: Actor, command: operators_domain.RecordAdminRecovery) -> Outcome[UUID]:
        """Record that root on the server enrolled a fresh admin identity (the seed itself
        is in the secret store, never here). ``actor`` is who ran it, e.g. ``root@local``."""
        admin_id = operators_domain.admin_id_for(command.name)

        async def work(session: Session) -> UUID:
            account = await session.load(ADMIN, admin_id)
            session.record(ADMIN, admin_id, operators_domain.decide(account, command))
            return admin_id

        return await self.repository.transact(work, actor)

    # -- hosts ----------------------------------------------------------------------

    async def register_host(self, actor: Actor, hostname: str, cores: int | str, ram: int | str,
                            disk: int | str, hypervisor: str = "qemu",
                            stores: tuple[str, ...] | None = None) -> Outcome[UUID]:
        if not actor.is_admin:
            raise NotFound("hosts are managed in the admin realm")
        limits = self.limits
        check_hostname(hostname)
        check_name(hypervisor, "hypervisor")
        command = host_domain.RegisterHost(
            hostname=hostname,
            cores=check_at_most(parse_cores(cores, "cores"), limits.host_cores, "cores", "a host's cores"),
            ram=check_at_most(parse_size(ram, "ram"), limits.host_ram, "ram", "a host's RAM"),
            disk=check_at_most(parse_size(disk, "disk"), limits.host_disk, "disk", "a host's disk"),
            hypervisor=hypervisor, stores=tuple(check_name(s, "stores") for s in stores) if stores is not None else None)
        host_id = host_domain.host_id_for(hostname)

        async def work(session: Session) -> UUID:
            current = await session.load(HOST, host_id)
            session.record(HOST, host_id, host_domain.decide(current, command))
            return host_id

        return await self.repository.transact(work, actor)

    async def issue_host_credential(self, actor: Actor, host_id: UUID) -> Outcome[str]:
        """A new credential for a registered host's agent (admins only): returned once, its
        sha256 recorded (host.credential_issued), the host's previous credential revoked."""
        if not actor.is_admin:
            raise NotFound("hosts are managed in the admin realm")
        credential = host_domain.credential_for(host_id, secrets.token_bytes(32))

        async def work(session: Session) -> str:
            host = await session.load(HOST, host_id)
            session.record(HOST, host_id, host_domain.decide(host, host_domain.IssueCredential(
                host_id=host_id, digest=host_domain.credential_digest(credential), by=str(actor))))
            return credential

        return await self.repository.transact(work, actor)

    async def host_command(self, actor: Actor, command: host_domain.SetMaintenance | host_domain.Evacuate
                           | host_domain.RemoveHost) -> Outcome[None]:
        """maintenance on/off, evacuate, remove: admins only."""
        if not actor.is_admin:
            raise NotFound("hosts are managed in the admin realm")

        async def work(session: Session) -> None:
            host = await session.load(HOST, command.host_id)
            session.record(HOST, command.host_id, host_domain.decide(host, command))

        return await self.repository.transact(work, actor)

    # -- heartbeat and failure ----------------------------------------------------------

    async def mark_host_up(self, actor: Actor, host_id: UUID, session_id: int, lease_ttl: float) -> Outcome[None]:
        """A host agent took its heartbeat lease (session ``session_id``)."""

        async def work(session: Session) -> None:
            host = await session.load(HOST, host_id)
            session.record(HOST, host_id, host_domain.decide(
                host, host_domain.MarkUp(host_id=host_id, session=session_id, lease_ttl=lease_ttl)))

        return await self.repository.transact(work, actor)

    async def declare_host_dead(self, actor: Actor, host_id: UUID, session_id: int, evidence: str, *,
                                known: Mapping[str, Loaded[Any]] | None = None) -> Outcome[None]:
        """The failure detector's verdict on one session of a host. Refused (Rejected) when
        the host came up again in a newer session meanwhile: the host stream's version
        orders the agent's ``host.up`` and this declaration, so exactly one of them wins."""

        async def work(session: Session) -> None:
            host = await session.load(HOST, host_id)
            session.record(HOST, host_id, host_domain.decide(host, host_domain.DeclareDead(
                host_id=host_id, session=session_id, evidence=evidence, by=actor.name)))

        return await self.repository.transact(work, actor, known=known)

    async def evict(self, actor: Actor, host_id: UUID, vm_ids: Sequence[UUID], reason: str,
                    tracking: Tracking | None = None, *, evacuated: bool = False,
                    only_if_evacuating: bool = False) -> Outcome[None]:
        """Take VMs off a host (declared dead, or evacuated): ``vm.host_lost`` on each VM and
        its claim released on the host, in one append. A VM that already left is skipped.
        ``evacuated``: the last batch of an evacuation (``host.evacuated`` in the same append).
        ``only_if_evacuating``: refused unless an admin asked the host to evacuate (a host
        agent reporting through the gateway)."""

        async def work(session: Session) -> None:
            host = await session.load(HOST, host_id)
            if only_if_evacuating and (host is None or not host.evacuating):
                raise Rejected(f"host {host.hostname if host else host_id} was not asked to evacuate")
            if evacuated and host is not None:
                finished = host_domain.decide(host, host_domain.FinishEvacuation(host_id=host_id, vms=len(vm_ids)))
                for event in finished:
                    host = host_domain.evolve(host, event)
                session.record(HOST, host_id, finished)
            for vm_id in vm_ids:
                vm = await session.load(VM, vm_id)
                if vm is None or vm.host_id != host_id:
                    events = []
                else:
                    events = vm_domain.decide(vm, vm_domain.EvictVm(vm_id=vm_id, host_id=host_id, reason=reason))
                session.record(VM, vm_id, events)
                if host is not None and vm_id in host.claims:
                    released = host_domain.decide(host, host_domain.ReleaseCapacity(host_id=host_id, vm_id=vm_id))
                    for event in released:
                        host = host_domain.evolve(host, event)
                    session.record(HOST, host_id, released)

        return await self.repository.transact(work, actor, tracking=tracking)

    # -- the scheduler and host agents ------------------------------------------------

    async def place_vm(self, actor: Actor, vm_id: UUID, host_id: UUID,
                       tracking: Tracking | None = None, *,
                       known: Mapping[str, Loaded[Any]] | None = None) -> Outcome[None]:
        """Place a VM and claim its capacity on the host in one append. ``known``: the VM's
        and the host's state at their versions as the caller (the scheduler) sees them;
        the append is at those versions, so a stale view conflicts and is decided again on
        fresh state (Repository.transact). A VM seen as already placed stays a no-op: a VM
        never goes back to waiting for a host."""

        async def work(session: Session) -> None:
            vm = await session.load(VM, vm_id)
            host = await session.load(HOST, host_id)
            if vm is None or vm.status not in (vm_domain.Status.REQUESTED, vm_domain.Status.UNSCHEDULABLE):
                return  # already placed, or deleted meanwhile: nothing to do
            _check_reaches(vm, host)
            claim = host_domain.ClaimCapacity(host_id=host_id, vm_id=vm_id, cores=vm.cores, ram=vm.ram, disk=vm.disk)
            session.record(HOST, host_id, host_domain.decide(host, claim, self.overcommit))
            session.record(VM, vm_id, vm_domain.decide(vm, vm_domain.PlaceVm(vm_id=vm_id, host_id=host_id)))

        return await self.repository.transact(work, actor, tracking=tracking, known=known)

    async def schedule(
        self,
        actor: Actor,
        *,
        releases: Sequence[tuple[UUID, UUID]] = (),
        placements: Sequence[tuple[UUID, UUID]] = (),
        unschedulable: Sequence[tuple[UUID, str]] = (),
        tracking: Tracking | None = None,
        known: Mapping[str, Loaded[Any]] | None = None,
    ) -> Outcome[None]:
        """A scheduler's decisions over a run of the log, in one atomic append with its
        tracking position: claims released (host, VM), VMs placed and their capacity
        claimed (VM, host), VMs that fit nowhere (VM, reason), in that order, each host's
        claims checked on top of the ones before it. Decided on ``known`` states once and
        never retried: a stale state (StreamConflict) or a decision the domain refuses
        (DomainError) writes nothing, and the caller decides again one event at a time."""

        async def work(session: Session) -> None:
            hosts: dict[UUID, host_domain.Host | None] = {}

            async def host_of(host_id: UUID) -> host_domain.Host | None:
                if host_id in hosts:
                    return hosts[host_id]
                return await session.load(HOST, host_id)

            async def record_host(host_id: UUID, command: Command) -> None:
                host: host_domain.Host | None
                if host_id in hosts:
                    host = hosts[host_id]
                else:
                    host = await session.load(HOST, host_id)
                events = host_domain.decide(host, command, self.overcommit)
                for event in events:
                    host = host_domain.evolve(host, event)
                hosts[host_id] = host
                session.record(HOST, host_id, events)

            for host_id, vm_id in releases:
                if host_id in hosts or await session.load(HOST, host_id) is not None:
                    await record_host(host_id, host_domain.ReleaseCapacity(host_id=host_id, vm_id=vm_id))
            for vm_id, host_id in placements:
                vm = await session.load(VM, vm_id)
                if vm is None or vm.status not in (vm_domain.Status.REQUESTED, vm_domain.Status.UNSCHEDULABLE):
                    raise Rejected(f"VM {vm_id} is not waiting for a host")
                _check_reaches(vm, await host_of(host_id))
                await record_host(host_id, host_domain.ClaimCapacity(
                    host_id=host_id, vm_id=vm_id, cores=vm.cores, ram=vm.ram, disk=vm.disk))
                session.record(VM, vm_id, vm_domain.decide(vm, vm_domain.PlaceVm(vm_id=vm_id, host_id=host_id)))
            for vm_id, reason in unschedulable:
                vm = await session.load(VM, vm_id)
                if vm is None or vm.status is not vm_domain.Status.REQUESTED:
                    raise Rejected(f"VM {vm_id} is not waiting for a host")
                session.record(VM, vm_id, vm_domain.decide(vm, vm_domain.MarkUnschedulable(vm_id=vm_id, reason=reason)))

        return await self.repository.transact(work, actor, tracking=tracking, known=known, attempts=1)

    async def mark_unschedulable(self, actor: Actor, vm_id: UUID, reason: str,
                                 tracking: Tracking | None = None, *,
                                 known: Mapping[str, Loaded[Any]] | None = None) -> Outcome[None]:
        async def work(session: Session) -> None:
            vm = await session.load(VM, vm_id)
            if vm is None or vm.status is not vm_domain.Status.REQUESTED:
                return
            session.record(VM, vm_id, vm_domain.decide(vm, vm_domain.MarkUnschedulable(vm_id=vm_id, reason=reason)))

        return await self.repository.transact(work, actor, tracking=tracking, known=known)

    async def release_capacity(self, actor: Actor, host_id: UUID, vm_id: UUID,
                               tracking: Tracking | None = None) -> Outcome[None]:
        async def work(session: Session) -> None:
            host = await session.load(HOST, host_id)
            if host is None:
                return
            session.record(HOST, host_id, host_domain.decide(
                host, host_domain.ReleaseCapacity(host_id=host_id, vm_id=vm_id)))

        return await self.repository.transact(work, actor, tracking=tracking)

    async def report(self, actor: Actor, command: vm_domain.VmReport, *,
                     reporter: UUID | None = None) -> Outcome[None]:
        """A host agent reports what it observed (started, stopped, crashed, ...).
        ``reporter``: the host a credential proved (the gateway's host routes): the report
        is accepted only about a VM placed on that host, judged in the same transaction as
        the append (Forbidden otherwise, naming the VM and where it is placed)."""
        vm_id = command.vm_id
        if reporter is not None:
            command = msgspec.structs.replace(command, host_id=reporter)

        async def work(session: Session) -> None:
            vm = await session.load(VM, vm_id)
            if reporter is not None:
                if vm is None:
                    raise NotFound(f"no VM {vm_id}")
                if vm.host_id != reporter:
                    where = f"on host {vm.host_id}" if vm.host_id is not None else "on no host"
                    raise Forbidden(f"VM {vm_id} is placed {where}, not on host {reporter} (this credential's): "
                                    f"a host reports only about the VMs placed on it")
            events = vm_domain.decide(vm, command)
            session.record(VM, vm_id, events)
            await self._release_image(session, vm, events)

        return await self.repository.transact(work, actor)

    # -- files and images ---------------------------------------------------------------

    async def record_file(self, actor: Actor, name: str, size: int, sha256: str,
                          owner: str | None = None, signature: str = "") -> Outcome[UUID]:
        """A file is in the owner's directory with this size and digest (scanner, upload);
        ``signature``: its stat signature when it was hashed (domain/file.py)."""
        owner = self._owner(actor, owner)
        file_domain.check_file_name(name)
        file_id = file_domain.file_id_for(owner, name)
        command = file_domain.RecordFile(owner=owner, name=name, size=size, sha256=sha256, signature=signature)

        async def work(session: Session) -> UUID:
            current = await session.load(FILE, file_id)
            session.record(FILE, file_id, file_domain.decide(current, command))
            return file_id

        return await self.repository.transact(work, actor)

    async def remove_file(self, actor: Actor, name: str, owner: str | None = None,
                          missing_ok: bool = False) -> Outcome[None]:
        owner = self._owner(actor, owner)
        file_domain.check_file_name(name)
        file_id = file_domain.file_id_for(owner, name)
        command = file_domain.RemoveFile(owner=owner, name=name, missing_ok=missing_ok)

        async def work(session: Session) -> None:
            current = await session.load(FILE, file_id)
            session.record(FILE, file_id, file_domain.decide(current, command))

        return await self.repository.transact(work, actor)

    async def create_image(self, actor: Actor, name: str, file: str, *, public: bool = False,
                           store: str | None = None, owner: str | None = None) -> Outcome[UUID]:
        """Ask for an image made from one of the owner's files; the image scanner imports it."""
        owner = self._owner(actor, owner)
        check_name(name, "name")
        file_domain.check_file_name(file, "file")
        store = self.image_stores[0] if store is None else store
        check_name(store, "store")
        if store not in self.image_stores:
            raise Rejected(f"store: no image store named {store!r}; this installation has "
                           f"{', '.join(self.image_stores)}", "store")
        if public and not actor.is_admin:
            raise Rejected("public: only the admin realm may make public images", "public")
        image_id = image_domain.image_id_for("" if public else owner, name)
        file_id = file_domain.file_id_for(owner, file)

        async def work(session: Session) -> UUID:
            source = await session.load(FILE, file_id)
            if source is None or source.removed:
                raise Rejected(f"file: no file named {file!r} (see 'ucloud file list')", "file")
            current = await session.load(IMAGE, image_id)
            session.record(IMAGE, image_id, image_domain.decide(current, image_domain.CreateImage(
                owner=owner, name=name, public=public, store=store, file_id=file_id, file_name=file,
                file_size=source.size, file_sha256=source.sha256, file_signature=source.signature)))
            return image_id

        return await self.repository.transact(work, actor)

    async def delete_image(self, actor: Actor, name: str, *, public: bool = False,
                           owner: str | None = None) -> Outcome[UUID]:
        """Delete an image no VM depends on (refused naming the VMs otherwise)."""
        owner = self._owner(actor, owner)
        check_name(name, "name")
        if public and not actor.is_admin:
            raise NotFound(f"no image named {name!r}")
        image_id = image_domain.image_id_for("" if public else owner, name)

        async def work(session: Session) -> UUID:
            current = await session.load(IMAGE, image_id)
            if current is None or current.status is image_domain.ImageStatus.DELETED:
                raise NotFound(f"no image named {name!r}")
            session.record(IMAGE, image_id, image_domain.decide(current, image_domain.DeleteImage(image_id=image_id)))
            return image_id

        return await self.repository.transact(work, actor)

    async def report_image(self, actor: Actor, command: image_domain.ReportImportProgress
                           | image_domain.ReportImported | image_domain.ReportImportFailed,
                           tracking: Tracking | None = None) -> Outcome[None]:
        """The image scanner reports an import's progress and outcome."""

        async def work(session: Session) -> None:
            current = await session.load(IMAGE, command.image_id)
            session.record(IMAGE, command.image_id, image_domain.decide(current, command))

        return await self.repository.transact(work, actor, tracking=tracking)

    async def _visible_image(self, session: Session, owner: str, name: str) -> image_domain.Image | None:
        """The owner's image of that name, else the public one; None if neither exists."""
        for key in (owner, ""):
            image = await session.load(IMAGE, image_domain.image_id_for(key, name))
            if image is not None and image.status is not image_domain.ImageStatus.DELETED:
                return image
        return None

    async def _release_image(self, session: Session, vm: vm_domain.Vm | None, events: list[Event]) -> None:
        """A deleted VM no longer holds its image (in the same append as vm.deleted)."""
        if vm is None or vm.image_id is None or not any(isinstance(e, vm_domain.VmDeleted) for e in events):
            return
        image = await session.load(IMAGE, vm.image_id)
        if image is not None and image.status is not image_domain.ImageStatus.DELETED:
            session.record(IMAGE, vm.image_id, image_domain.decide(
                image, image_domain.ReleaseImage(image_id=vm.image_id, vm_id=vm.id)))

    # -- helpers ----------------------------------------------------------------------

    @staticmethod
    def _owner(actor: Actor, owner: str | None) -> str:
        if owner is not None:
            check_user_name(owner)
        if owner is None or owner == actor.name:
            return actor.name
        if not actor.is_admin:
            raise NotFound("only the admin realm may act for another user")
        return owner


def _check_reaches(vm: vm_domain.Vm, host: host_domain.Host | None) -> None:
    """A VM whose disk is a clone of a catalogued image goes only to a host that reaches
    the image's store."""
    if host is not None and vm.image_store and vm.image_store not in host.stores:
        raise Rejected(f"host {host.hostname} does not reach image store {vm.image_store!r}")
