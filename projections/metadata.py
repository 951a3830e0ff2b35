"""The metadata projection: each NIC (network, MAC) to what its guest may learn.

The metadata server answers only from this view. It follows VMs (their NICs, name,
owner, chosen keys, user data), SSH keys (so a key added or deleted after boot shows
up on the next fetch) and networks (their VNI, /64 and kind of address management,
which give the guest its network configuration and tell the server which network a
request came in on).
"""

from __future__ import annotations

import ipaddress
from typing import Any, cast
from uuid import UUID

import msgspec

from ucloud.domain import network as net
from ucloud.domain import sshkey as sshkey_domain
from ucloud.domain import vm as vm_domain
from ucloud.domain.events import Event, tag_of
from ucloud.eventstore.records import EventRecord

from .runner import Projection

NicKey = tuple[UUID, str]  # (network id, MAC)


class NicConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One NIC of a VM as its guest configures it."""

    name: str  # eth0, eth1, ...: the order the NICs were added in, which is the guest's order
    mac: str
    network: str
    network_id: UUID
    ipam: str  # none, manual, auto
    prefix: str = ""  # the /64, when the network has one
    address: str = ""  # the NIC's EUI-64 address in it
    link_local: str = ""
    gateway: str = ""  # the network's router address (prefix::1)


class Metadata(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a guest may learn about itself, and nothing about anyone else."""

    uuid: UUID
    name: str
    hostname: str
    owner: str
    ssh_keys: tuple[tuple[str, str], ...]  # (key name, public key line)
    user_data: str
    nics: tuple[NicConfig, ...]


class MetadataView(Projection):
    name = "metadata"
    handles = frozenset(tag_of(t) for t in (*vm_domain.VM_EVENT_TYPES, *sshkey_domain.SSHKEY_EVENT_TYPES,
                                            *net.NETWORK_EVENT_TYPES))

    def __init__(self) -> None:
        self.vms: dict[UUID, vm_domain.Vm] = {}
        self.nics: dict[NicKey, UUID] = {}  # -> vm id
        self.networks: dict[UUID, net.Network] = {}
        self.by_vni: dict[int, UUID] = {}
        self.by_prefix: dict[int, UUID] = {}  # the /64's first 64 bits -> network id
        self.keys: dict[str, dict[str, str]] = {}  # owner -> key name -> public key line
        self.key_names: dict[UUID, tuple[str, str]] = {}  # key id -> (owner, name)
        # What metadata() made, until the next event: a boot storm asks for the same VMs
        # again and again, and the addresses in a NIC's configuration cost ~100 us to work out.
        self._made: dict[UUID, Metadata] = {}

    # -- folding ---------------------------------------------------------------------------

    def apply(self, record: EventRecord, event: Event) -> None:
        if self._made:
            self._made.clear()
        if isinstance(event, vm_domain.VM_EVENT_TYPES):
            self._vm(cast(vm_domain.VmEvent, event))
        elif isinstance(event, net.NETWORK_EVENT_TYPES):
            self._network(cast(net.NetworkEvent, event))
        elif isinstance(event, sshkey_domain.SshKeyAdded):
            self.keys.setdefault(event.owner, {})[event.name] = event.public_key
            self.key_names[event.key_id] = (event.owner, event.name)
        elif isinstance(event, sshkey_domain.SshKeyDeleted):
            owner_name = self.key_names.pop(event.key_id, None)
            if owner_name is not None:
                self.keys.get(owner_name[0], {}).pop(owner_name[1], None)

    def _vm(self, event: vm_domain.VmEvent) -> None:
        old = self.vms.get(event.vm_id)
        state = vm_domain.evolve(old, event)
        if old is not None:
            for nic in old.nics:
                if nic.mac and self.nics.get((nic.network_id, nic.mac)) == old.id:
                    del self.nics[(nic.network_id, nic.mac)]
        if state is None or state.status is vm_domain.Status.DELETED:
            self.vms.pop(event.vm_id, None)
            return
        self.vms[state.id] = state
        self._index(state)

    def _index(self, vm: vm_domain.Vm) -> None:
        for nic in vm.nics:
            if nic.mac:
                self.nics[(nic.network_id, nic.mac)] = vm.id

    def _network(self, event: net.NetworkEvent) -> None:
        old = self.networks.get(event.network_id)
        state = net.evolve(old, event)
        if old is not None:
            self._unindex_network(old)
        if state is None or state.status is net.NetworkStatus.DELETED:
            self.networks.pop(event.network_id, None)
            return
        # The ports are the VMs' business (their NICs); kept empty so the view stays small.
        state = msgspec.structs.replace(state, ports={})
        self.networks[state.id] = state
        self._index_network(state)

    def _index_network(self, network: net.Network) -> None:
        if network.vni:
            self.by_vni[network.vni] = network.id
        if network.prefix:
            self.by_prefix[_prefix_key(network.prefix)] = network.id

    def _unindex_network(self, network: net.Network) -> None:
        if network.vni and self.by_vni.get(network.vni) == network.id:
            del self.by_vni[network.vni]
        if network.prefix and self.by_prefix.get(_prefix_key(network.prefix)) == network.id:
            del self.by_prefix[_prefix_key(network.prefix)]

    # -- queries ---------------------------------------------------------------------------

    def network_of_vni(self, vni: int) -> UUID | None:
        return self.by_vni.get(vni)

    def network_of_address(self, address: ipaddress.IPv6Address) -> UUID | None:
        """The network whose /64 holds a (global or unique local) address."""
        return self.by_prefix.get(int(address) >> 64)

    def vm_of(self, network_id: UUID, mac: str) -> vm_domain.Vm | None:
        vm_id = self.nics.get((network_id, mac))
        return self.vms.get(vm_id) if vm_id is not None else None

    def metadata(self, vm: vm_domain.Vm) -> Metadata:
        """The VM's own data: its owner's SSH keys (those chosen for the VM first, then the
        rest of the owner's keys, each once, as they are now), hostname, user data, NICs."""
        made = self._made.get(vm.id)
        if made is None:
            made = self._made[vm.id] = self._metadata(vm)
        return made

    def _metadata(self, vm: vm_domain.Vm) -> Metadata:
        owned = self.keys.get(vm.owner, {})
        names = [n for n in vm.ssh_keys if n in owned] + sorted(n for n in owned if n not in vm.ssh_keys)
        nics = []
        for index, nic in enumerate(vm.nics):
            network = self.networks.get(nic.network_id)
            if network is None or not nic.mac:
                continue
            prefix = network.prefix
            nics.append(NicConfig(
                name=f"eth{index}", mac=nic.mac, network=network.name, network_id=network.id,
                ipam=network.ipam.value, prefix=prefix, address=net.eui64_address(prefix, nic.mac) if prefix else "",
                link_local=net.link_local_address(nic.mac),
                gateway=net.router_address(prefix) if prefix and network.ipam is net.Ipam.AUTO else ""))
        return Metadata(uuid=vm.id, name=vm.name, hostname=vm.name, owner=vm.owner,
                        ssh_keys=tuple((n, owned[n]) for n in names), user_data=vm.user_data, nics=tuple(nics))

    # -- snapshots ---------------------------------------------------------------------------

    def dump(self) -> Any:
        return {"vms": [msgspec.to_builtins(vm) for vm in self.vms.values()],
                "networks": [msgspec.to_builtins(n) for n in self.networks.values()],
                "keys": self.keys,
                "key_names": {str(k): list(v) for k, v in self.key_names.items()}}

    def load(self, data: Any) -> None:
        self.__init__()  # type: ignore[misc]
        for raw in data["vms"]:
            vm = msgspec.convert(raw, vm_domain.Vm)
            self.vms[vm.id] = vm
            self._index(vm)
        for raw in data["networks"]:
            network = msgspec.convert(raw, net.Network)
            self.networks[network.id] = network
            self._index_network(network)
        self.keys = {owner: dict(keys) for owner, keys in data["keys"].items()}
        self.key_names = {UUID(k): (v[0], v[1]) for k, v in data["key_names"].items()}


def _prefix_key(prefix: str) -> int:
    return int(ipaddress.IPv6Network(prefix).network_address) >> 64
