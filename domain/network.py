"""Networks: layer-2 segments carried as VXLAN over IPv6 multicast, with their IPAM.

A network belongs to its owner and has one of three kinds of address management:
``none`` (layer 2 only), ``manual`` (a /64 is assigned; no router advertisements) and
``auto`` (a /64 and router advertisements, so guests configure themselves by SLAAC).
The IPAM allocator (processes/ipam.py) gives a requested network its VNI and, for the
IPAM kinds, its /64; it gives every NIC a locally administered MAC. A NIC's address in
the /64 is its EUI-64 address, so the MAC alone names it.

Uniqueness is held by the log: every VNI, /64 and MAC in use has a claim stream
(``ipam-vni-42``, ``ipam-prefix-fd12:3456:789a:1::``, ``ipam-mac-02:..``) that the
allocation appends to at the version it read, so two allocators can never hand out the
same value (one of them conflicts). Deleting a network or a NIC releases its claims.

Value types (MAC, EUI-64, multicast group, prefixes) live here too: pure functions.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import uuid
from uuid import UUID

import msgspec

from .errors import InvalidValue, NotFound, Rejected
from .events import Command, Event

NETWORK_NAMESPACE = uuid.UUID("6f1f1d2e-8d53-4c1e-9a0e-4b2f5bd0c0a1")
VNI_MIN, VNI_MAX = 1, 2**24 - 1
# Inner Ethernet (14) + VXLAN (8) + UDP (8) + outer IPv6 (40): what a guest's frame gains
# on the underlay. A NIC's MTU is the underlay's minus this, so nothing is fragmented.
VXLAN_OVERHEAD = 70
MAX_NICS_PER_VM = 16
MAC_PATTERN = r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$"
_MAC = re.compile(MAC_PATTERN[1:-1], re.ASCII)


def network_id_for(owner: str, name: str) -> UUID:
    """One stream per (owner, name): two networks of one name conflict."""
    return uuid.uuid5(NETWORK_NAMESPACE, f"{owner}\0{name}")


class Ipam(enum.StrEnum):
    NONE = "none"      # layer 2 only
    MANUAL = "manual"  # a /64, no router advertisements
    AUTO = "auto"      # a /64 and router advertisements (SLAAC)


class NetworkStatus(enum.StrEnum):
    REQUESTED = "requested"  # waiting for the IPAM allocator
    READY = "ready"
    FAILED = "failed"        # the allocator could not give it a VNI or a /64 (reason says why)
    DELETED = "deleted"


# -- value types -------------------------------------------------------------------------


def check_mac(value: object, field: str = "mac") -> str:
    if not isinstance(value, str) or len(value) != 17 or not _MAC.fullmatch(value):
        raise InvalidValue(field, "must be a MAC address like 02:00:5e:10:00:01 (lower case)")
    return value


def mac_from_int(bits: int) -> str:
    """A unicast, locally administered MAC from any integer (its low 48 bits): the
    I/G bit is cleared and the U/L bit set, so it never collides with a vendor's MAC."""
    value = (bits & (2**48 - 1) & ~(0x01 << 40)) | (0x02 << 40)
    raw = value.to_bytes(6, "big")
    return ":".join(f"{b:02x}" for b in raw)


def is_local_unicast(mac: str) -> bool:
    first = int(mac[:2], 16)
    return bool(first & 0x02) and not first & 0x01


def interface_id(mac: str) -> int:
    """The modified EUI-64 interface identifier of a MAC (RFC 4291 appendix A)."""
    raw = bytes(int(part, 16) for part in check_mac(mac).split(":"))
    eui = bytes([raw[0] ^ 0x02]) + raw[1:3] + b"\xff\xfe" + raw[3:]
    return int.from_bytes(eui, "big")


def eui64_address(prefix: str, mac: str) -> str:
    """The NIC's address in a /64: the prefix and the MAC's interface identifier."""
    network = ipaddress.IPv6Network(prefix)
    if network.prefixlen != 64:
        raise InvalidValue("prefix", f"{prefix} is not a /64")
    return str(ipaddress.IPv6Address(int(network.network_address) | interface_id(mac)))


def link_local_address(mac: str) -> str:
    return eui64_address("fe80::/64", mac)


def mac_of_eui64(address: str) -> str | None:
    """The MAC an EUI-64 address was made from, or None if it is not one (no ff:fe)."""
    iid = int(ipaddress.IPv6Address(address)) & (2**64 - 1)
    raw = iid.to_bytes(8, "big")
    if raw[3:5] != b"\xff\xfe":
        return None
    mac = bytes([raw[0] ^ 0x02]) + raw[1:3] + raw[5:]
    return ":".join(f"{b:02x}" for b in mac)


def multicast_group(vni: int) -> str:
    """The IPv6 multicast group a network's VXLAN floods to: site-local scope, the VNI
    in the low bits (ff05::2a for VNI 42), so every host derives it from the VNI alone."""
    if not VNI_MIN <= vni <= VNI_MAX:
        raise InvalidValue("vni", f"{vni} is not a VNI ({VNI_MIN}..{VNI_MAX})")
    return str(ipaddress.IPv6Address((0xFF05 << 112) | vni))


def ula_pool(random40: int) -> str:
    """A unique local /48 (RFC 4193: fd00::/8 and a 40-bit global ID chosen at random)."""
    global_id = random40 & (2**40 - 1)
    return str(ipaddress.IPv6Network(((0xFD << 120) | (global_id << 80), 48)))


def check_pool(value: object, field: str = "ipv6_pool") -> ipaddress.IPv6Network:
    """A pool the /64s are cut from: an IPv6 prefix of length 1 to 64, not multicast,
    not link-local, host bits clear."""
    if not isinstance(value, str) or len(value) > 64:
        raise InvalidValue(field, "must be an IPv6 prefix like fd12:3456:789a::/48")
    try:
        network = ipaddress.IPv6Network(value, strict=True)
    except ValueError as error:
        raise InvalidValue(field, f"{value!r} is not an IPv6 prefix: {error}") from None
    if not 1 <= network.prefixlen <= 64:
        raise InvalidValue(field, f"{value} must be /64 or shorter")
    if network.is_multicast or network.is_link_local or network.is_loopback:
        raise InvalidValue(field, f"{value} is not a unicast prefix a network can use")
    return network


def nth_prefix(pool: str, index: int) -> str:
    """The index-th /64 of a pool."""
    network = ipaddress.IPv6Network(pool)
    size = 2 ** (64 - network.prefixlen)
    if not 0 <= index < size:
        raise InvalidValue("prefix", f"{pool} has {size} /64s; {index} is not one of them")
    return str(ipaddress.IPv6Network((int(network.network_address) + (index << 64), 64)))


def prefixes_in(pool: str) -> int:
    return 2 ** (64 - ipaddress.IPv6Network(pool).prefixlen)


def prefix_index(pool: str, prefix: str) -> int | None:
    """Where a /64 lies in a pool, or None if outside it."""
    network = ipaddress.IPv6Network(pool)
    sub = ipaddress.IPv6Network(prefix)
    if not sub.subnet_of(network):
        return None
    return (int(sub.network_address) - int(network.network_address)) >> 64


def router_address(prefix: str) -> str:
    """The first address of a /64 (``prefix::1``), held by the network's router host."""
    return str(ipaddress.IPv6Network(prefix).network_address + 1)


# -- the network aggregate -------------------------------------------------------------


class NetworkRequested(Event, tag="network.requested", frozen=True):
    """A user asked for a network; it waits for the IPAM allocator."""

    network_id: UUID
    owner: str
    name: str
    ipam: Ipam


class NetworkAllocated(Event, tag="network.allocated", frozen=True):
    """The IPAM allocator gave the network its VNI, multicast group and (IPAM kinds) /64."""

    network_id: UUID
    vni: int
    group: str
    prefix: str = ""


class NetworkAllocationFailed(Event, tag="network.allocation_failed", frozen=True):
    """The IPAM allocator could not serve the network (an exhausted pool); `reason` says why."""

    network_id: UUID
    reason: str


class NetworkPortAdded(Event, tag="network.port_added", frozen=True):
    """A VM's NIC joined the network (appended with vm.nic_added)."""

    network_id: UUID
    vm_id: UUID
    nic_id: UUID


class NetworkPortRemoved(Event, tag="network.port_removed", frozen=True):
    """A VM's NIC left the network (detached, or its VM deleted)."""

    network_id: UUID
    vm_id: UUID
    nic_id: UUID


class NetworkDeleted(Event, tag="network.deleted", frozen=True):
    """The owner deleted the network; its VNI and /64 go back to the pool."""

    network_id: UUID


NetworkEvent = (NetworkRequested | NetworkAllocated | NetworkAllocationFailed | NetworkPortAdded
                | NetworkPortRemoved | NetworkDeleted)
NETWORK_EVENT_TYPES: tuple[type[Event], ...] = NetworkEvent.__args__


class CreateNetwork(Command, tag="network.create", frozen=True):
    network_id: UUID
    owner: str
    name: str
    ipam: Ipam


class AllocateNetwork(Command, tag="network.allocate", frozen=True):
    network_id: UUID
    vni: int
    prefix: str = ""


class FailNetwork(Command, tag="network.fail", frozen=True):
    network_id: UUID
    reason: str


class AddPort(Command, tag="network.add_port", frozen=True):
    network_id: UUID
    vm_id: UUID
    nic_id: UUID


class RemovePort(Command, tag="network.remove_port", frozen=True):
    network_id: UUID
    vm_id: UUID
    nic_id: UUID


class DeleteNetwork(Command, tag="network.delete", frozen=True):
    network_id: UUID


class Network(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    id: UUID
    owner: str
    name: str
    ipam: Ipam
    status: NetworkStatus
    vni: int = 0
    group: str = ""
    prefix: str = ""
    reason: str = ""
    ports: dict[UUID, UUID] = {}  # nic_id -> vm_id

    @property
    def vms(self) -> list[UUID]:
        return sorted(set(self.ports.values()), key=str)


def evolve(network: Network | None, event: Event) -> Network | None:
    match event:
        case NetworkRequested():
            return Network(id=event.network_id, owner=event.owner, name=event.name, ipam=event.ipam,
                           status=NetworkStatus.REQUESTED)
    if network is None:
        return None
    match event:
        case NetworkAllocated():
            return msgspec.structs.replace(network, status=NetworkStatus.READY, vni=event.vni, group=event.group,
                                           prefix=event.prefix, reason="")
        case NetworkAllocationFailed():
            return msgspec.structs.replace(network, status=NetworkStatus.FAILED, reason=event.reason)
        case NetworkPortAdded():
            return msgspec.structs.replace(network, ports={**network.ports, event.nic_id: event.vm_id})
        case NetworkPortRemoved():
            ports = dict(network.ports)
            ports.pop(event.nic_id, None)
            return msgspec.structs.replace(network, ports=ports)
        case NetworkDeleted():
            return msgspec.structs.replace(network, status=NetworkStatus.DELETED, ports={})
    return network


def _live(network: Network | None, network_id: UUID) -> Network:
    if network is None or network.status is NetworkStatus.DELETED:
        raise NotFound(f"network {network_id} does not exist")
    return network


def decide(network: Network | None, command: Command) -> list[Event]:
    """What ``command`` does to ``network``. Pure; raises Rejected or NotFound."""
    match command:
        case CreateNetwork():
            if network is not None and network.status is not NetworkStatus.DELETED:
                raise Rejected(f"a network named {command.name!r} already exists", "name")
            return [NetworkRequested(network_id=command.network_id, owner=command.owner, name=command.name,
                                     ipam=command.ipam)]
        case AllocateNetwork():
            network = _live(network, command.network_id)
            if network.status is NetworkStatus.READY:
                if (network.vni, network.prefix) == (command.vni, command.prefix):
                    return []
                raise Rejected(f"network {network.id} already has VNI {network.vni}")
            if network.status is not NetworkStatus.REQUESTED:
                raise Rejected(f"network {network.id} is {network.status}, not waiting for IPAM")
            if bool(command.prefix) != (network.ipam is not Ipam.NONE):
                raise Rejected(f"a network with IPAM {network.ipam} cannot get prefix {command.prefix!r}")
            return [NetworkAllocated(network_id=network.id, vni=command.vni, group=multicast_group(command.vni),
                                     prefix=command.prefix)]
        case FailNetwork():
            network = _live(network, command.network_id)
            if network.status is not NetworkStatus.REQUESTED:
                return []
            return [NetworkAllocationFailed(network_id=network.id, reason=command.reason)]
        case AddPort():
            network = _live(network, command.network_id)
            if network.status is not NetworkStatus.READY:
                raise Rejected(f"network {network.name!r} is {network.status}"
                               + (f": {network.reason}" if network.reason else ""), "networks")
            if command.nic_id in network.ports:
                return []
            return [NetworkPortAdded(network_id=network.id, vm_id=command.vm_id, nic_id=command.nic_id)]
        case RemovePort():
            if network is None or command.nic_id not in network.ports:
                return []
            return [NetworkPortRemoved(network_id=network.id, vm_id=command.vm_id, nic_id=command.nic_id)]
        case DeleteNetwork():
            network = _live(network, command.network_id)
            if network.ports:
                names = ", ".join(str(v) for v in network.vms)
                raise Rejected(f"network {network.name!r} has VMs attached: {names}; detach them first")
            return [NetworkDeleted(network_id=network.id)]
    raise Rejected(f"{type(command).__name__} is not a network command")


def stream_name(network_id: UUID) -> str:
    return f"network-{network_id}"


def slices(network: Network | None) -> tuple[str, ...]:
    """Every network event is in the ``networks`` slice: router hosts follow it to serve
    every automatic network, without reading the rest of the log."""
    return ("networks",) if network is not None else ()


# -- IPAM claims: one stream per value in use -----------------------------------------------


class IpamPoolConfigured(Event, tag="ipam.pool_configured", frozen=True):
    """The IPv6 pool the /64s are cut from (a ULA /48 generated at the first start, or the
    operator's ``--ipv6-pool``). Networks keep the /64 they have when it changes."""

    pool: str


class IpamClaimed(Event, tag="ipam.claimed", frozen=True):
    """A value (``vni:42``, ``prefix:fd..::/64``, ``mac:02:..``) is held by `holder` (a network
    or a NIC). Appended to the value's own stream with the allocation, at the version read."""

    resource: str
    holder: UUID


class IpamReleased(Event, tag="ipam.released", frozen=True):
    """The value is free again (its network or NIC is gone)."""

    resource: str
    holder: UUID


IPAM_EVENT_TYPES: tuple[type[Event], ...] = (IpamPoolConfigured, IpamClaimed, IpamReleased)


class Claim(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    resource: str
    holder: UUID | None = None  # None: free


class ClaimValue(Command, tag="ipam.claim", frozen=True):
    resource: str
    holder: UUID


class ReleaseValue(Command, tag="ipam.release", frozen=True):
    resource: str
    holder: UUID


def evolve_claim(claim: Claim | None, event: Event) -> Claim | None:
    match event:
        case IpamClaimed():
            return Claim(resource=event.resource, holder=event.holder)
        case IpamReleased():
            return Claim(resource=event.resource, holder=None)
    return claim


class Taken(Rejected):
    """The value is held by another: the allocator picks another one."""


def decide_claim(claim: Claim | None, command: Command) -> list[Event]:
    match command:
        case ClaimValue():
            if claim is not None and claim.holder is not None:
                if claim.holder == command.holder:
                    return []
                raise Taken(f"{command.resource} is held by {claim.holder}")
            return [IpamClaimed(resource=command.resource, holder=command.holder)]
        case ReleaseValue():
            if claim is None or claim.holder != command.holder:
                return []
            return [IpamReleased(resource=command.resource, holder=command.holder)]
    raise Rejected(f"{type(command).__name__} is not an IPAM command")


def claim_stream(resource: str) -> str:
    return f"ipam-{resource.replace(':', '-', 1)}"


def vni_resource(vni: int) -> str:
    return f"vni:{vni}"


def prefix_resource(prefix: str) -> str:
    """``prefix:fd12:3456:789a:1::`` (a stream name holds no '/'; every claimed prefix is a /64)."""
    return f"prefix:{prefix.removesuffix('/64')}"


def mac_resource(mac: str) -> str:
    return f"mac:{mac}"


POOL_STREAM = "ipam-pool"


class Pool(msgspec.Struct, frozen=True, gc=False):
    pool: str


def evolve_pool(pool: Pool | None, event: Event) -> Pool | None:
    return Pool(event.pool) if isinstance(event, IpamPoolConfigured) else pool


# -- names on a host -----------------------------------------------------------------------

BRIDGE_PREFIX = "ucbr"  # + the VNI in hex: at most 10 characters, under Linux's 15


def bridge_name(vni: int) -> str:
    """The bridge a network has on every host it reaches: ``ucbr2a`` for VNI 42 (as the
    host agent's network driver names it). The metadata server knows a request's network
    from the bridge it came in on."""
    return f"{BRIDGE_PREFIX}{vni:x}"


def vni_of_bridge(name: str) -> int | None:
    """The VNI of a bridge named by ``bridge_name``, or None for any other interface."""
    digits = name.removeprefix(BRIDGE_PREFIX)
    if digits == name or not 1 <= len(digits) <= 6 or digits.strip("0123456789abcdef"):
        return None
    vni = int(digits, 16)
    return vni if VNI_MIN <= vni <= VNI_MAX and bridge_name(vni) == name else None
