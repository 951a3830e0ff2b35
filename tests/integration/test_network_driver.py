"""The Linux network driver on real namespaces: two hosts joined by an IPv6 underlay, a
VXLAN network over multicast between them, radvd on the router host, and VM ports whose
far ends are guest namespaces. Proves: SLAAC from radvd across the VXLAN, ping between
guests on two hosts and from the router host, isolation of another network, each
anti-spoofing rule (the frame is missing on the far side and counted by its rule), and
adoption without a flap when the driver runs again."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import frames
from tests.support.netns import PYTHON, ROOT, Namespaces, namespaces, py, sh
from ucloud.domain import network as net
from ucloud.hostagent.network.driver import bridge_name, vxlan_name

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PREFIX = "fd00:42::/64"
MAC_A, MAC_B, MAC_C = "02:00:00:00:0a:01", "02:00:00:00:0b:01", "02:00:00:00:0c:01"
PORT_A, PORT_B, PORT_C = "uct0000000000a1", "uct0000000000b1", "uct0000000000c1"


def addresses(mac: str, prefix: str | None = PREFIX) -> list[str]:
    return [net.link_local_address(mac)] + ([net.eui64_address(prefix, mac)] if prefix else [])


def network(vni: int, ipam: str, router: bool = False) -> list[Any]:
    prefix = PREFIX if ipam != "none" else ""
    return ["network", {"vni": vni, "group": net.multicast_group(vni), "ipam": ipam, "prefix": prefix,
                        "router": router}]


def port(name: str, mac: str, vni: int, prefix: str | None = PREFIX) -> list[Any]:
    return ["port", {"name": name, "mac": mac, "vni": vni, "addresses": addresses(mac, prefix)}]


class Hosts:
    def __init__(self, ns: Namespaces, tmp: Path) -> None:
        self.ns = ns
        self.a, self.b = ns.add("ha"), ns.add("hb")
        ns.link(self.a, "ul0", self.b, "ul0")
        for host, address in ((self.a, "fd99::a"), (self.b, "fd99::b")):
            sh(host, "ip", "-6", "addr", "add", f"{address}/64", "dev", "ul0", "nodad")
        self.state = {self.a: tmp / "a", self.b: tmp / "b"}
        self.local = {self.a: "fd99::a", self.b: "fd99::b"}

    def drive(self, host: str, *ops: list[Any]) -> list[Any]:
        return py(host, "tests.support.netdriver", str(self.state[host]), "ul0", self.local[host], stdin=list(ops))

    def link_index(self, host: str, name: str) -> int:
        return int(json.loads(sh(host, "ip", "-j", "link", "show", name))[0]["ifindex"])


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    with namespaces() as ns:
        yield Hosts(ns, tmp_path)


def wait_for(probe: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout}s")


def global_addresses(ns: str) -> list[str]:
    out = json.loads(sh(ns, "ip", "-j", "-6", "addr", "show", "dev", "eth0", "scope", "global"))
    return [a["local"] for link in out for a in link.get("addr_info", []) if "local" in a]


def pings(ns: str, address: str, count: int = 2) -> bool:
    done = subprocess.run(["ip", "netns", "exec", ns, "busybox", "ping", "-6", "-c", str(count), "-W", "2", address],
                          capture_output=True, timeout=30, check=False)
    return done.returncode == 0


def test_guests_on_two_hosts_get_slaac_and_reach_each_other_over_vxlan_and_spoofing_is_dropped(hosts: Hosts) -> None:
    ns = hosts.ns
    guest_a = ns.guest(hosts.a, PORT_A, "ga", MAC_A)
    guest_b = ns.guest(hosts.b, PORT_B, "gb", MAC_B)
    guest_c = ns.guest(hosts.b, PORT_C, "gc", MAC_C)
    hosts.drive(hosts.a, network(42, "auto", router=True), port(PORT_A, MAC_A, 42))
    hosts.drive(hosts.b, network(42, "auto"), network(43, "none"), port(PORT_B, MAC_B, 42),
                port(PORT_C, MAC_C, 43, prefix=None))

    # Devices as specified: VXLAN on the underlay with the group, MTU for VXLAN, snooping off.
    details = json.loads(sh(hosts.b, "ip", "-d", "-j", "link", "show", vxlan_name(42)))[0]
    info = details["linkinfo"]["info_data"]
    assert info["id"] == 42 and info["group6"] == "ff05::2a" and info["link"] == "ul0"
    assert details["mtu"] == 1500 - 70 and details["master"] == bridge_name(42)
    bridge = json.loads(sh(hosts.b, "ip", "-d", "-j", "link", "show", bridge_name(42)))[0]
    assert bridge["linkinfo"]["info_data"]["mcast_snooping"] == 0

    # radvd on the router host: both guests configure their EUI-64 address by SLAAC.
    eui_a, eui_b = net.eui64_address(PREFIX, MAC_A), net.eui64_address(PREFIX, MAC_B)
    wait_for(lambda: eui_a in global_addresses(guest_a), "guest A's SLAAC address")
    wait_for(lambda: eui_b in global_addresses(guest_b), "guest B's SLAAC address (RA over the VXLAN)")
    assert global_addresses(guest_c) == []  # another network: no RA reaches it
    assert pings(guest_a, eui_b) and pings(guest_b, eui_a)
    assert pings(hosts.a, eui_b)  # the router host holds prefix::1 and reaches the guests
    assert not pings(guest_c, f"{net.link_local_address(MAC_B)}%eth0", count=1)
    assert not pings(guest_c, eui_a, count=1)

    # From guest B towards guest A: one legitimate frame and one of each kind the port
    # firewall must drop. A sniffer on guest A counts what arrives.
    ll_b, ll_a = net.link_local_address(MAC_B), net.link_local_address(MAC_A)
    sent = {
        "OKAYOK": frames.ipv6(MAC_B, MAC_A, eui_b, eui_a, 58, frames.echo_request("OKAYOK")),
        "RADVRA": frames.ipv6(MAC_B, "33:33:00:00:00:01", ll_b, "ff02::1", 58,
                              frames.router_advertisement("fd66::", "RADVRA")),
        "DHCP6R": frames.ipv6(MAC_B, MAC_A, ll_b, ll_a, 17, frames.udp(547, 546, "DHCP6R")),
        "MACSPF": frames.ipv6("02:00:00:00:ee:ee", MAC_A, eui_b, eui_a, 58, frames.echo_request("MACSPF")),
        "IP6SPF": frames.ipv6(MAC_B, MAC_A, "fd00:42::dead", eui_a, 58, frames.echo_request("IP6SPF")),
        "NATGTS": frames.ipv6(MAC_B, MAC_A, ll_b, ll_a, 58, frames.neighbor_advertisement(eui_a, MAC_B, "NATGTS")),
        "ETHTYP": frames.mac_bytes(MAC_A) + frames.mac_bytes(MAC_B) + b"\x88\xb5" + b"ETHTYP".ljust(50, b"\0"),
    }
    arrived = exchange(guest_a, guest_b, sent)
    assert arrived["OKAYOK"] >= 1, arrived  # the sniffer sees what the firewall lets through
    assert {m: n for m, n in arrived.items() if m != "OKAYOK"} == dict.fromkeys(set(sent) - {"OKAYOK"}, 0), arrived
    counters = hosts.drive(hosts.b, ["counters", PORT_B])[0]
    for rule in ("router-advertisement", "dhcpv6-server", "mac-spoof", "ip6-source-spoof", "nd-target-spoof",
                 "ethertype"):
        assert counters[rule] >= 1, (rule, counters)
    # Guest A never took the advertised bogus prefix.
    assert not any(a.startswith("fd66:") for a in global_addresses(guest_a))

    # Running the driver again (an agent restart) changes nothing: same links, same rules
    # with their counters, the same radvd.
    before = {name: hosts.link_index(hosts.b, name) for name in (bridge_name(42), vxlan_name(42), PORT_B)}
    radvd_pid = (Path(hosts.state[hosts.a]) / "radvd" / f"{bridge_name(42)}.pid").read_text()
    rules_before = rules_of(hosts.b, PORT_B)
    counters_before = hosts.drive(hosts.b, ["counters", PORT_B])[0]
    hosts.drive(hosts.a, network(42, "auto", router=True), port(PORT_A, MAC_A, 42))
    hosts.drive(hosts.b, network(42, "auto"), network(43, "none"), port(PORT_B, MAC_B, 42),
                port(PORT_C, MAC_C, 43, prefix=None))
    assert {name: hosts.link_index(hosts.b, name) for name in before} == before
    assert rules_of(hosts.b, PORT_B) == rules_before  # same rules, same handles
    counters_after = hosts.drive(hosts.b, ["counters", PORT_B])[0]
    assert all(counters_after[rule] >= n for rule, n in counters_before.items())  # never reset
    assert (Path(hosts.state[hosts.a]) / "radvd" / f"{bridge_name(42)}.pid").read_text() == radvd_pid

    # The last port leaves, then the network: nothing stays behind.
    listed = hosts.drive(hosts.b, ["remove_port", PORT_B], ["remove_network", 42], ["ports"], ["networks"])
    assert listed[2] == [PORT_C] and listed[3] == [43]
    assert f"port-{PORT_B}" not in sh(hosts.b, "nft", "list", "table", "bridge", "ucloud")
    hosts.drive(hosts.a, ["remove_port", PORT_A], ["remove_network", 42])
    assert not (Path(hosts.state[hosts.a]) / "radvd" / f"{bridge_name(42)}.pid").exists()
    assert not Path(f"/proc/{radvd_pid.strip()}").exists()  # the router's radvd is gone, not only its pid file
    assert f"from-{bridge_name(42)}" not in sh(hosts.a, "nft", "list", "ruleset")  # and its routing guard


def rules_of(host: str, port_name: str) -> str:
    """A port chain's rules with their handles, counters left out (traffic moves them)."""
    text = sh(host, "nft", "-a", "list", "chain", "bridge", "ucloud", f"port-{port_name}")
    return re.sub(r"packets \d+ bytes \d+", "", text)


def exchange(receiver: str, sender: str, sent: dict[str, bytes]) -> dict[str, int]:
    sniffer = subprocess.Popen(["ip", "netns", "exec", receiver, PYTHON, "-m", "tests.support.frames", "sniff",
                                "eth0", "4", *sent], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert sniffer.stderr is not None
    assert sniffer.stderr.readline().strip() == "ready"
    py(sender, "tests.support.frames", "send", "eth0", *(f.hex() for f in sent.values()))
    out, _ = sniffer.communicate(timeout=30)
    counts: dict[str, int] = json.loads(out)
    return counts


def test_a_removal_cut_short_is_found_and_finished(hosts: Hosts) -> None:
    """A stop in the middle of removing a router's network (its links gone, its radvd and
    routing guard not yet): the network is still listed, so the agent's clean-up pass
    removes what is left; nothing of it stays on the host."""
    hosts.drive(hosts.a, network(46, "auto", router=True))
    pidfile = Path(hosts.state[hosts.a]) / "radvd" / f"{bridge_name(46)}.pid"
    radvd_pid = wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), "radvd started")
    sh(hosts.a, "ip", "link", "del", vxlan_name(46))
    sh(hosts.a, "ip", "link", "del", bridge_name(46))
    assert hosts.drive(hosts.a, ["networks"]) == [[46]]
    assert hosts.drive(hosts.a, ["remove_network", 46], ["networks"])[1] == []
    assert not pidfile.exists() and not Path(f"/proc/{radvd_pid}").exists()
    assert f"from-{bridge_name(46)}" not in sh(hosts.a, "nft", "list", "ruleset")


def test_a_manual_network_sends_no_ra_and_a_hand_configured_eui64_address_works(hosts: Hosts) -> None:
    ns = hosts.ns
    guest_a = ns.guest(hosts.a, PORT_A, "ga", MAC_A)
    guest_b = ns.guest(hosts.b, PORT_B, "gb", MAC_B)
    hosts.drive(hosts.a, network(7, "manual", router=True), port(PORT_A, MAC_A, 7))
    hosts.drive(hosts.b, network(7, "manual"), port(PORT_B, MAC_B, 7))
    assert not (Path(hosts.state[hosts.a]) / "radvd" / f"{bridge_name(7)}.pid").exists()
    time.sleep(3)  # an RA would have come by now (radvd sends one at start)
    assert global_addresses(guest_a) == [] and global_addresses(guest_b) == []
    eui_a, eui_b = net.eui64_address(PREFIX, MAC_A), net.eui64_address(PREFIX, MAC_B)
    sh(guest_a, "ip", "-6", "addr", "add", f"{eui_a}/64", "dev", "eth0", "nodad")
    sh(guest_b, "ip", "-6", "addr", "add", f"{eui_b}/64", "dev", "eth0", "nodad")
    assert pings(guest_a, eui_b) and pings(hosts.a, eui_a)
    # Another address in the /64 is not the NIC's: dropped at the port.
    other = str(ipaddress.IPv6Address(eui_b) + 1)
    sh(guest_b, "ip", "-6", "addr", "add", f"{other}/64", "dev", "eth0", "nodad")
    done = subprocess.run(["ip", "netns", "exec", guest_b, "busybox", "ping", "-6", "-c", "1", "-W", "2", "-I", other, eui_a],
                          capture_output=True, timeout=30, check=False)
    assert done.returncode != 0
    assert hosts.drive(hosts.b, ["counters", PORT_B])[0]["ip6-source-spoof"] >= 1


def test_an_automatic_network_announces_its_prefix_and_the_configured_dns_servers(hosts: Hosts) -> None:
    guest = hosts.ns.guest(hosts.a, PORT_A, "gr", MAC_A)
    spec = network(44, "auto", router=True)
    spec[1]["rdnss"] = ["fd99::53", "fd99::54"]
    hosts.drive(hosts.a, spec, port(PORT_A, MAC_A, 44))
    # radvd sends an RA at start and then every 3-10 s: one arrives within 15 s.
    heard = py(guest, "tests.support.frames", "ra", "eth0", "15")
    assert heard == {"prefixes": [PREFIX], "rdnss": ["fd99::53", "fd99::54"]}, heard
