"""Network intents: create, delete, attach to and detach from VMs; and the IPAM
allocator's decisions (VNI, /64, MAC), each appended with the claim streams that make
the value unique. Load, decide (domain), append; retries live in Repository."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from uuid import UUID

from ucloud.domain import network as net
from ucloud.domain import vm as vm_domain
from ucloud.domain.errors import InvalidValue, NotFound, Rejected
from ucloud.domain.names import check_name, check_user_name
from ucloud.eventstore.records import Tracking

from .aggregates import CLAIM, NETWORK, POOL, VM
from .unit_of_work import Actor, Outcome, Repository, Session


def check_network_names(names: Sequence[str], field: str = "networks") -> tuple[str, ...]:
    if len(names) > vm_domain.MAX_NICS:
        raise Rejected(f"{field}: {len(names)} networks; a VM has at most {vm_domain.MAX_NICS} NICs", field)
    for index, name in enumerate(names):
        check_name(name, f"{field}[{index}]")
    if len(set(names)) != len(names):
        raise InvalidValue(field, "names a network twice")
    return tuple(names)


async def add_nic(session: Session, vm: vm_domain.Vm, name: str, field: str = "networks") -> UUID:
    """Add a NIC on the VM owner's network ``name``: vm.nic_added and network.port_added in
    the same append, so a network with ports can never be deleted under them."""
    network_id = net.network_id_for(vm.owner, name)
    network = await session.load(NETWORK, network_id)
    if network is None or network.status is net.NetworkStatus.DELETED:
        raise Rejected(f"{field}: no network named {name!r}", field)
    nic_id = uuid.uuid4()
    session.record(VM, vm.id, vm_domain.decide(vm, vm_domain.AddNic(vm_id=vm.id, nic_id=nic_id,
                                                                     network_id=network_id)))
    session.record(NETWORK, network_id, net.decide(network, net.AddPort(network_id=network_id, vm_id=vm.id,
                                                                         nic_id=nic_id)))
    return nic_id


def _owner(actor: Actor, owner: str | None) -> str:
    if owner is not None:
        check_user_name(owner)
    if owner is None or owner == actor.name:
        return actor.name
    if not actor.is_admin:
        raise NotFound("only the admin realm may act for another user")
    return owner


class NetworkCommands:
    def __init__(self, repository: Repository) -> None:
        self.repository = repository

    # -- users ------------------------------------------------------------------------------

    async def create_network(self, actor: Actor, name: str, ipam: str, owner: str | None = None) -> Outcome[UUID]:
        owner = _owner(actor, owner)
        check_name(name, "name")
        try:
            kind = net.Ipam(ipam)
        except ValueError:
            raise InvalidValue("ipam", f"must be one of {[k.value for k in net.Ipam]}") from None
        network_id = net.network_id_for(owner, name)
        command = net.CreateNetwork(network_id=network_id, owner=owner, name=name, ipam=kind)

        async def work(session: Session) -> UUID:
            network = await session.load(NETWORK, network_id)
            session.record(NETWORK, network_id, net.decide(network, command))
            return network_id

        return await self.repository.transact(work, actor)

    async def delete_network(self, actor: Actor, name: str, owner: str | None = None) -> Outcome[None]:
        owner = _owner(actor, owner)
        check_name(name, "name")
        network_id = net.network_id_for(owner, name)

        async def work(session: Session) -> None:
            network = await session.load(NETWORK, network_id)
            if network is None or network.status is net.NetworkStatus.DELETED:
                raise NotFound(f"no network named {name!r}")
            session.record(NETWORK, network_id, net.decide(network, net.DeleteNetwork(network_id=network_id)))

        return await self.repository.transact(work, actor)

    async def _own_vm(self, session: Session, actor: Actor, vm_id: UUID) -> vm_domain.Vm:
        vm = await session.load(VM, vm_id)
        if vm is None or vm.status is vm_domain.Status.DELETED or (not actor.is_admin and vm.owner != actor.name):
            raise NotFound(f"VM {vm_id} does not exist")
        return vm

    async def attach_network(self, actor: Actor, vm_id: UUID, name: str) -> Outcome[UUID]:
        """A new NIC on the VM's owner's network ``name``; the result is the NIC's id."""
        check_name(name, "network")

        async def work(session: Session) -> UUID:
            vm = await self._own_vm(session, actor, vm_id)
            return await add_nic(session, vm, name, "network")

        # The network's stream is shared by every VM on it: concurrent attaches conflict there.
        return await self.repository.transact(work, actor, attempts=100)

    async def detach_network(self, actor: Actor, vm_id: UUID, name: str) -> Outcome[None]:
        check_name(name, "network")

        async def work(session: Session) -> None:
            vm = await self._own_vm(session, actor, vm_id)
            network_id = net.network_id_for(vm.owner, name)
            nic = next((n for n in vm.nics if n.network_id == network_id), None)
            if nic is None:
                raise NotFound(f"VM {vm.name!r} has no NIC on a network named {name!r}")
            network = await session.load(NETWORK, network_id)
            session.record(VM, vm_id, vm_domain.decide(vm, vm_domain.RemoveNic(vm_id=vm_id, network_id=network_id)))
            session.record(NETWORK, network_id, net.decide(network, net.RemovePort(
                network_id=network_id, vm_id=vm_id, nic_id=nic.id)))

        return await self.repository.transact(work, actor)

    # -- the IPAM allocator ----------------------------------------------------------------------

    async def configure_pool(self, actor: Actor, pool: str) -> Outcome[str]:
        """Record the pool unless it is already the current one; the result is the pool in force."""
        check_pool = net.check_pool(pool)

        async def work(session: Session) -> str:
            current = await session.load(POOL, net.POOL_STREAM)
            if current is not None and current.pool == str(check_pool):
                return current.pool
            session.record(POOL, net.POOL_STREAM, [net.IpamPoolConfigured(pool=str(check_pool))])
            return str(check_pool)

        return await self.repository.transact(work, actor)

    async def ensure_pool(self, actor: Actor, generated: str) -> Outcome[str]:
        """The pool in force; ``generated`` (a fresh ULA /48) is recorded only if there is none,
        so an installation generates its pool once."""

        async def work(session: Session) -> str:
            current = await session.load(POOL, net.POOL_STREAM)
            if current is not None:
                return current.pool
            session.record(POOL, net.POOL_STREAM, [net.IpamPoolConfigured(pool=generated)])
            return generated

        return await self.repository.transact(work, actor)

    async def allocate_network(self, actor: Actor, network_id: UUID, vni: int, prefix: str,
                               tracking: Tracking | None = None) -> Outcome[None]:
        """Claim the VNI (and the /64) and record network.allocated, in one append.
        Raises ``net.Taken`` if another holds one of them (the allocator picks again)."""

        async def work(session: Session) -> None:
            network = await session.load(NETWORK, network_id)
            if network is None or network.status is not net.NetworkStatus.REQUESTED:
                return  # deleted or served meanwhile
            resources = [net.vni_resource(vni)] + ([net.prefix_resource(prefix)] if prefix else [])
            for resource in resources:
                claim = await session.load(CLAIM, resource)
                session.record(CLAIM, resource, net.decide_claim(claim, net.ClaimValue(resource=resource,
                                                                                      holder=network_id)))
            session.record(NETWORK, network_id, net.decide(network, net.AllocateNetwork(
                network_id=network_id, vni=vni, prefix=prefix)))

        return await self.repository.transact(work, actor, tracking=tracking)

    async def fail_network(self, actor: Actor, network_id: UUID, reason: str,
                           tracking: Tracking | None = None) -> Outcome[None]:
        async def work(session: Session) -> None:
            network = await session.load(NETWORK, network_id)
            if network is None or network.status is not net.NetworkStatus.REQUESTED:
                return
            session.record(NETWORK, network_id, net.decide(network, net.FailNetwork(network_id=network_id,
                                                                                      reason=reason)))

        return await self.repository.transact(work, actor, tracking=tracking)

    async def allocate_nic(self, actor: Actor, vm_id: UUID, nic_id: UUID, mac: str,
                           tracking: Tracking | None = None) -> Outcome[None]:
        """Claim the MAC and record vm.nic_allocated in one append (``net.Taken`` if held)."""
        net.check_mac(mac)
        if not net.is_local_unicast(mac):
            raise InvalidValue("mac", f"{mac} is not a locally administered unicast MAC")

        async def work(session: Session) -> None:
            vm = await session.load(VM, vm_id)
            nic = vm.nic(nic_id) if vm is not None and vm.status is not vm_domain.Status.DELETED else None
            if vm is None or nic is None or nic.mac:
                return  # deleted, detached or served meanwhile
            resource = net.mac_resource(mac)
            claim = await session.load(CLAIM, resource)
            session.record(CLAIM, resource, net.decide_claim(claim, net.ClaimValue(resource=resource, holder=nic_id)))
            session.record(VM, vm_id, vm_domain.decide(vm, vm_domain.AllocateNic(vm_id=vm_id, nic_id=nic_id, mac=mac)))

        return await self.repository.transact(work, actor, tracking=tracking)

    async def release(self, actor: Actor, *, claims: Sequence[tuple[str, UUID]] = (),
                      ports: Sequence[tuple[UUID, UUID, UUID]] = (),
                      tracking: Tracking | None = None) -> Outcome[None]:
        """Free values (resource, holder) and take a deleted VM's NICs off their networks
        (network, VM, NIC), in one append with the allocator's tracking."""

        async def work(session: Session) -> None:
            for resource, holder in claims:
                claim = await session.load(CLAIM, resource)
                session.record(CLAIM, resource, net.decide_claim(claim, net.ReleaseValue(resource=resource,
                                                                                        holder=holder)))
            for network_id, vm_id, nic_id in ports:
                network = await session.load(NETWORK, network_id)
                session.record(NETWORK, network_id, net.decide(network, net.RemovePort(
                    network_id=network_id, vm_id=vm_id, nic_id=nic_id)))

        return await self.repository.transact(work, actor, tracking=tracking)
