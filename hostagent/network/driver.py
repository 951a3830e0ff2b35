"""The network driver port of the host agent.

On a host with a VM in a network the driver holds that network's layer 2: a VXLAN
device (the VNI, IPv6 multicast to the network's group over the underlay), a bridge,
and per NIC a port (tap) with its firewall chain. A router host of an automatic network
also holds the /64's first address on the bridge and runs radvd for the prefix.
Linux is the first driver (``linux.py``); FreeBSD and OpenBSD drivers can follow behind
the same five calls. Every call is idempotent and leaves what is already right untouched,
so a restarted agent adopts its devices, addresses and rules without a flap.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from ucloud.domain.network import bridge_name, vni_of_bridge

__all__ = ["NetworkDriver", "NetworkError", "NetworkSpec", "PortSpec", "bridge_name", "tap_name", "vni_of_bridge",
           "vxlan_name"]


@dataclass(frozen=True)
class NetworkSpec:
    vni: int
    group: str  # the IPv6 multicast group of the VXLAN
    ipam: str  # none | manual | auto
    prefix: str = ""  # the /64 (manual, auto)
    router: bool = False  # this host routes the /64: prefix::1 on the bridge, radvd when auto
    rdnss: tuple[str, ...] = ()  # DNS servers announced with the prefix (auto)


@dataclass(frozen=True)
class PortSpec:
    name: str  # the tap (or any link of that name already there) that joins the bridge
    mac: str  # the only source MAC the port may send from
    vni: int
    addresses: tuple[str, ...]  # the only IPv6 sources: its link-local and its EUI-64 address in the /64


def vxlan_name(vni: int) -> str:
    """The VXLAN device of a network, beside its bridge (``bridge_name``: ``ucbr42``)."""
    return f"ucvx{vni}"


def tap_name(nic_hex: str) -> str:
    """A NIC's tap: 'uct' and 12 hex digits of its id (15 characters, the kernel's limit)."""
    return f"uct{nic_hex[:12]}"


class NetworkError(Exception):
    """A network device, rule or daemon could not be set up; the message says which."""


class NetworkDriver(ABC):
    name: ClassVar[str]

    @abstractmethod
    async def ensure_network(self, spec: NetworkSpec) -> None:
        """VXLAN, bridge (and router address, radvd) as spec says; what matches stays."""

    @abstractmethod
    async def remove_network(self, vni: int) -> None:
        """Remove the network's devices, address and radvd (its ports first)."""

    @abstractmethod
    async def networks(self) -> set[int]:
        """VNIs of the networks present on this host."""

    @abstractmethod
    async def ensure_port(self, spec: PortSpec) -> None:
        """The port on its network's bridge, with its firewall chain (one atomic change)."""

    @abstractmethod
    async def remove_port(self, name: str) -> None:
        """The port's firewall chain and the port itself."""

    @abstractmethod
    async def ports(self) -> set[str]:
        """Names of the ports present on this host."""
