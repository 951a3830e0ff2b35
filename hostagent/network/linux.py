"""The Linux network driver: pyroute2 for links and addresses, nftables for the port
firewall (firewall.py), radvd for router advertisements (radvd.py).

Per network: ``ucbr<vni>`` (decimal, as the metadata server expects) (a bridge, multicast snooping off: with snooping on, a bridge
that never hears an MLD querier drops the multicast NDP and RAs need, lxc/incus#3294) and
``ucvx<vni>`` (VXLAN: the VNI, the network's IPv6 multicast group, the underlay device and
local address, UDP 4789) as its port. Per NIC a tap ``uct<nic>`` with the network's MTU.
MTU: the underlay's minus the VXLAN overhead (70 bytes over IPv6), so nothing fragments.
The host itself takes no part in a network it does not route: IPv6 is off on its bridge,
VXLAN and taps. A router host holds ``<prefix>::1/64`` on the bridge (no DAD), does not
accept RAs there, and runs radvd for an automatic network.

Everything is compared before it is changed, so a restarted agent adopts what it finds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ucloud.domain.network import VXLAN_OVERHEAD, router_address

from . import radvd as radvd_config
from .driver import (
    NetworkDriver,
    NetworkError,
    NetworkSpec,
    PortSpec,
    bridge_name,
    vni_of_bridge,
    vxlan_name,
)
from .firewall import Firewall
from .radvd import Radvd

log = logging.getLogger(__name__)

VXLAN_PORT = 4789
IFA_F_NODAD = 0x02


def _sysctl(path: str, value: str) -> None:
    target = Path("/proc/sys/net/ipv6/conf") / path
    try:
        if target.read_text().strip() != value:
            target.write_text(value)
    except OSError as error:
        raise NetworkError(f"cannot set {target} to {value}: {error}") from error


def _info_data(link: Any) -> dict[str, Any]:
    info = link.get_attr("IFLA_LINKINFO")
    data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
    if data is None:
        return {}
    return {name: value for name, value in data["attrs"]}


class LinuxNetworkDriver(NetworkDriver):
    name = "linux"

    def __init__(self, state_dir: Path, *, underlay: str | None = None, local: str | None = None,
                 mtu: int | None = None, radvd_binary: str = "radvd") -> None:
        """``underlay``: the device VXLAN traffic leaves by (None: networks stay on this host:
        a bridge without VXLAN); ``local``: the source address on it; ``mtu``: the underlay
        MTU (default: the device's)."""
        self.underlay = underlay
        self.local = str(ipaddress.IPv6Address(local)) if local else None
        self.underlay_mtu = mtu
        self.firewall = Firewall()
        self.radvd = Radvd(Path(state_dir) / "radvd", radvd_binary)
        self._lock = asyncio.Lock()
        # What was made or checked, and when: the agent asks every pass (every 2 s); the
        # devices and rules are read back and repaired at most every ``recheck`` seconds.
        self.recheck = 30.0
        self._checked: dict[object, tuple[object, float]] = {}

    def _fresh(self, key: object, spec: object) -> bool:
        seen = self._checked.get(key)
        return seen is not None and seen[0] == spec and time.monotonic() - seen[1] < self.recheck

    def _mark(self, key: object, spec: object | None) -> None:
        if spec is None:
            self._checked.pop(key, None)
        else:
            self._checked[key] = (spec, time.monotonic())

    # -- sync netlink work (run in a thread) --------------------------------------------------

    def _index(self, ipr: IPRoute, name: str) -> int | None:
        found = ipr.link_lookup(ifname=name)
        return found[0] if found else None

    def mtu(self) -> int:
        if self.underlay_mtu is None:
            if self.underlay is None:
                self.underlay_mtu = 1500
            else:
                with IPRoute() as ipr:
                    index = self._index(ipr, self.underlay)
                    if index is None:
                        raise NetworkError(f"the underlay device {self.underlay} does not exist")
                    self.underlay_mtu = int(ipr.get_links(index)[0].get_attr("IFLA_MTU"))
        return self.underlay_mtu - VXLAN_OVERHEAD

    def _set(self, ipr: IPRoute, index: int, **wanted: Any) -> None:
        link = ipr.get_links(index)[0]
        changes: dict[str, Any] = {}
        if "mtu" in wanted and link.get_attr("IFLA_MTU") != wanted["mtu"]:
            changes["mtu"] = wanted["mtu"]
        if "master" in wanted and link.get_attr("IFLA_MASTER") != wanted["master"]:
            changes["master"] = wanted["master"]
        if changes:
            ipr.link("set", index=index, **changes)
        if wanted.get("up") and not link["flags"] & 1:
            ipr.link("set", index=index, state="up")

    def _ensure_network(self, spec: NetworkSpec) -> None:
        mtu = self.mtu()
        bridge, vxlan = bridge_name(spec.vni), vxlan_name(spec.vni)
        with IPRoute() as ipr:
            bridge_index = self._index(ipr, bridge)
            if bridge_index is None:
                ipr.link("add", ifname=bridge, kind="bridge", br_mcast_snooping=0)
                bridge_index = self._index(ipr, bridge)
                assert bridge_index is not None
            elif _info_data(ipr.get_links(bridge_index)[0]).get("IFLA_BR_MCAST_SNOOPING", 0):
                ipr.link("set", index=bridge_index, kind="bridge", br_mcast_snooping=0)
            if spec.router:
                _sysctl(f"{bridge}/accept_ra", "0")
                _sysctl(f"{bridge}/disable_ipv6", "0")
            else:
                _sysctl(f"{bridge}/disable_ipv6", "1")
            if self.underlay is not None:
                self._ensure_vxlan(ipr, spec, vxlan, bridge_index, mtu)
            self._set(ipr, bridge_index, mtu=mtu, up=True)
            if spec.router and spec.prefix:
                self._ensure_router_address(ipr, bridge_index, spec.prefix)

    def _ensure_vxlan(self, ipr: IPRoute, spec: NetworkSpec, name: str, bridge_index: int, mtu: int) -> None:
        assert self.underlay is not None
        underlay = self._index(ipr, self.underlay)
        if underlay is None:
            raise NetworkError(f"the underlay device {self.underlay} does not exist")
        index = self._index(ipr, name)
        if index is not None:
            data = _info_data(ipr.get_links(index)[0])
            same = (data.get("IFLA_VXLAN_ID") == spec.vni and data.get("IFLA_VXLAN_GROUP6") == spec.group
                    and data.get("IFLA_VXLAN_LINK") == underlay
                    and (self.local is None or data.get("IFLA_VXLAN_LOCAL6") == self.local))
            if not same:
                log.info("VXLAN %s differs from VNI %d group %s: replacing it", name, spec.vni, spec.group)
                ipr.link("del", index=index)
                index = None
        if index is None:
            options: dict[str, Any] = {"vxlan_id": spec.vni, "vxlan_group6": spec.group, "vxlan_link": underlay,
                                       "vxlan_port": VXLAN_PORT, "vxlan_learning": 1}
            if self.local is not None:
                options["vxlan_local6"] = self.local
            ipr.link("add", ifname=name, kind="vxlan", **options)
            index = self._index(ipr, name)
            assert index is not None
        _sysctl(f"{name}/disable_ipv6", "1")
        self._set(ipr, index, mtu=mtu, master=bridge_index, up=True)

    def _ensure_router_address(self, ipr: IPRoute, index: int, prefix: str) -> None:
        address = router_address(prefix)
        present = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index, family=10)}
        if address not in present:
            ipr.addr("add", index=index, address=address, prefixlen=64, flags=IFA_F_NODAD)

    def _remove_network(self, vni: int) -> None:
        with IPRoute() as ipr:
            for name in (vxlan_name(vni), bridge_name(vni)):
                index = self._index(ipr, name)
                if index is not None:
                    ipr.link("del", index=index)

    def _networks(self) -> set[int]:
        with IPRoute() as ipr:
            names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
        return {vni for vni in map(vni_of_bridge, names) if vni is not None}

    def _ensure_link(self, spec: PortSpec) -> int:
        with IPRoute() as ipr:
            index = self._index(ipr, spec.name)
            if index is None:
                try:
                    ipr.link("add", ifname=spec.name, kind="tuntap", mode="tap")
                except NetlinkError as error:
                    raise NetworkError(f"cannot create tap {spec.name}: {error}") from error
                index = self._index(ipr, spec.name)
                assert index is not None
            return index

    def _plug(self, spec: PortSpec) -> None:
        with IPRoute() as ipr:
            index = self._index(ipr, spec.name)
            bridge = self._index(ipr, bridge_name(spec.vni))
            if index is None or bridge is None:
                raise NetworkError(f"port {spec.name}: the port or the bridge of VNI {spec.vni} is missing")
            _sysctl(f"{spec.name}/disable_ipv6", "1")
            self._set(ipr, index, mtu=self.mtu(), master=bridge, up=True)

    def _remove_link(self, name: str) -> None:
        with IPRoute() as ipr:
            index = self._index(ipr, name)
            if index is not None:
                ipr.link("del", index=index)

    def _port_links(self) -> set[str]:
        with IPRoute() as ipr:
            names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
        return {n for n in names if n.startswith("uct")}

    # -- the port --------------------------------------------------------------------------------

    async def ensure_network(self, spec: NetworkSpec) -> None:
        if self._fresh(("network", spec.vni), spec):
            return
        async with self._lock:
            if spec.router:  # before forwarding is on: it never routes between networks
                await self.firewall.ensure_router(bridge_name(spec.vni))
            if spec.router and spec.ipam == "auto":
                _sysctl("all/forwarding", "1")  # radvd advertises only with forwarding on
            await asyncio.to_thread(self._ensure_network, spec)
            bridge = bridge_name(spec.vni)
            if spec.router and spec.ipam == "auto" and spec.prefix:
                await self.radvd.ensure(bridge, radvd_config.config(bridge, spec.prefix, self.mtu(), spec.rdnss))
            elif self.radvd.pid(bridge) is not None:
                await self.radvd.stop(bridge)
            self._mark(("network", spec.vni), spec)

    async def remove_network(self, vni: int) -> None:
        self._mark(("network", vni), None)
        async with self._lock:
            await self.radvd.stop(bridge_name(vni))
            await asyncio.to_thread(self._remove_network, vni)
            await self.firewall.remove_router(bridge_name(vni))

    async def networks(self) -> set[int]:
        """Every network with anything left on this host: its bridge, or (a removal cut
        short, say by a stop in the middle of it) only its radvd or its routing guard, so
        that the agent's clean-up finds and removes those too."""
        leftovers = self.radvd.bridges() | await self.firewall.routers()
        return await asyncio.to_thread(self._networks) | {
            vni for vni in map(vni_of_bridge, leftovers) if vni is not None}

    async def ensure_port(self, spec: PortSpec) -> None:
        """Link first (down), its chain second, then onto the bridge and up: no frame of the
        port is ever forwarded unfiltered."""
        if self._fresh(("port", spec.name), spec):
            return
        async with self._lock:
            await asyncio.to_thread(self._ensure_link, spec)
            await self.firewall.ensure_port(spec)
            await asyncio.to_thread(self._plug, spec)
            self._mark(("port", spec.name), spec)

    async def remove_port(self, name: str) -> None:
        self._mark(("port", name), None)
        async with self._lock:
            await asyncio.to_thread(self._remove_link, name)
            await self.firewall.remove_port(name)

    async def ports(self) -> set[str]:
        return await asyncio.to_thread(self._port_links) | await self.firewall.ports()
