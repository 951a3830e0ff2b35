"""The port firewall: one nftables bridge-family table ``ucloud``.

The base chains (forward: frames between ports; input: frames to the host on the bridge)
hold a single rule, ``iifname vmap @ports``: a frame from a VM port jumps straight to that
port's chain, so its cost does not grow with the number of ports on the host (Incus
filters its bridged NICs the same way). Frames from the VXLAN (other hosts' VMs, already
filtered there) and to VMs pass untouched.

A port's chain drops, each rule with a counter:
- a source MAC other than the NIC's; ARP whose sender MAC is another;
- ethertypes other than IPv6, IPv4 and ARP (VLAN tags, anything else);
- router advertisements and redirects; DHCPv6 and DHCPv4 server replies;
- IPv6 from a source other than the NIC's link-local and /64 addresses (and ``::``, which
  duplicate address detection and MLD use);
- neighbour advertisements for a target that is not one of those addresses;
and accepts the rest. On a router host an ``inet ucloud`` table drops packets routed from
one network's bridge to another's: networks reach the world beyond, not each other.
The last rule's comment carries a digest of the port's spec: a
chain that already says the same digest is left alone (no counter reset, no flap).
Every change is one ``nft -f`` transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
from typing import Any

from .driver import NetworkError, PortSpec

TABLE = "ucloud"
FAMILY = "bridge"
DIGEST_PREFIX = "ucloud-port:"

BASE = f"""add table {FAMILY} {TABLE}
add map {FAMILY} {TABLE} ports {{ type ifname : verdict; }}
add chain {FAMILY} {TABLE} forward {{ type filter hook forward priority 0; policy accept; }}
add rule {FAMILY} {TABLE} forward iifname vmap @ports
add chain {FAMILY} {TABLE} input {{ type filter hook input priority 0; policy accept; }}
add rule {FAMILY} {TABLE} input iifname vmap @ports
"""


# On a router host: networks are routed to the world beyond, never to each other (each is
# its owner's layer 2). A packet routed from one network's bridge to another's is dropped:
# the forward chain sends what comes from a ucloud bridge to that network's chain, which
# drops it unless it leaves by the same bridge. (With br_netfilter loaded, frames bridged
# within a network pass these IP hooks too, with the same bridge in and out: they pass.)
ROUTER_BASE = """add table inet ucloud
add map inet ucloud networks { type ifname : verdict; }
add chain inet ucloud forward { type filter hook forward priority 0; policy accept; }
add rule inet ucloud forward iifname "ucbr*" oifname "ucbr*" iifname vmap @networks
"""


def router_script(bridge: str) -> str:
    return (f"add chain inet {TABLE} from-{bridge}\n"
            f'add rule inet {TABLE} from-{bridge} oifname != "{bridge}" counter drop comment "between-networks"\n'
            f'add element inet {TABLE} networks {{ "{bridge}" : jump from-{bridge} }}\n')


def chain_name(port: str) -> str:
    return f"port-{port}"


def digest(spec: PortSpec) -> str:
    text = json.dumps([spec.mac, sorted(spec.addresses)])
    return DIGEST_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:16]


def _hex128(address: str) -> str:
    return f"0x{int(ipaddress.IPv6Address(address)):032x}"


def port_rules(spec: PortSpec) -> list[tuple[str, str]]:
    """(rule, comment) of a port's chain, in order."""
    mac = spec.mac
    sources = ", ".join(["::", *spec.addresses])
    targets = ", ".join(_hex128(a) for a in spec.addresses)
    rules = [
        (f"ether saddr != {mac}", "mac-spoof"),
        (f"ether type arp arp saddr ether != {mac}", "arp-mac-spoof"),
        ("ether type != { ip6, ip, arp }", "ethertype"),
        ("icmpv6 type nd-router-advert", "router-advertisement"),
        ("icmpv6 type nd-redirect", "redirect"),
        ("udp sport 547", "dhcpv6-server"),
        ("udp sport 67", "dhcpv4-server"),
        (f"ip6 saddr != {{ {sources} }}", "ip6-source-spoof"),
    ]
    if targets:
        rules.append((f"icmpv6 type nd-neighbor-advert @th,64,128 != {{ {targets} }}", "nd-target-spoof"))
    return rules


def port_script(spec: PortSpec, *, exists: bool) -> str:
    chain = chain_name(spec.name)
    lines = [] if exists else [f"add chain {FAMILY} {TABLE} {chain}"]
    if exists:
        lines.append(f"flush chain {FAMILY} {TABLE} {chain}")
    lines += [f'add rule {FAMILY} {TABLE} {chain} {rule} counter drop comment "{comment}"'
              for rule, comment in port_rules(spec)]
    lines.append(f'add rule {FAMILY} {TABLE} {chain} counter accept comment "{digest(spec)}"')
    lines.append(f'add element {FAMILY} {TABLE} ports {{ "{spec.name}" : jump {chain} }}')
    return "\n".join(lines) + "\n"


def remove_script(port: str, *, mapped: bool) -> str:
    lines = [f'delete element {FAMILY} {TABLE} ports {{ "{port}" }}'] if mapped else []
    lines += [f"flush chain {FAMILY} {TABLE} {chain_name(port)}", f"delete chain {FAMILY} {TABLE} {chain_name(port)}"]
    return "\n".join(lines) + "\n"


async def nft(script: str | None = None, *args: str) -> str:
    """Run nft (a script on stdin with ``-f -``, else the arguments); NetworkError on failure."""
    argv = ["nft", *(("-f", "-") if script is not None else args)]
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate(script.encode() if script is not None else None)
    if process.returncode != 0:
        raise NetworkError(f"nft {' '.join(args) or '-f -'} failed: {err.decode(errors='replace').strip()[-1500:]}"
                           + (f"\n--- script ---\n{script}" if script else ""))
    return out.decode()


class Firewall:
    """The table's current state (read once per change) and the changes to it."""

    async def state(self) -> dict[str, Any]:
        """{'table': bool, 'mapped': set of ports in the map, 'chains': {port: digest or ''}}."""
        try:
            raw = await nft(None, "-j", "list", "table", FAMILY, TABLE)
        except NetworkError:
            return {"table": False, "mapped": set(), "chains": {}}
        mapped: set[str] = set()
        chains: dict[str, str] = {}
        for item in json.loads(raw).get("nftables", []):
            if "map" in item and item["map"]["name"] == "ports":
                for element in item["map"].get("elem", []):
                    mapped.add(element[0] if isinstance(element, list) else element)
            elif "chain" in item and item["chain"]["name"].startswith("port-"):
                chains.setdefault(item["chain"]["name"][len("port-"):], "")
            elif "rule" in item and item["rule"]["chain"].startswith("port-"):
                comment = item["rule"].get("comment", "")
                if comment.startswith(DIGEST_PREFIX):
                    chains[item["rule"]["chain"][len("port-"):]] = comment
        return {"table": True, "mapped": mapped, "chains": chains}

    async def ensure_router(self, bridge: str) -> bool:
        """A router host's rule that keeps ``bridge``'s network from being routed to any
        other network; True if loaded now."""
        try:
            raw = await nft(None, "-j", "list", "table", "inet", TABLE)
        except NetworkError:
            await nft(ROUTER_BASE + router_script(bridge))
            return True
        chains = {item["chain"]["name"] for item in json.loads(raw).get("nftables", []) if "chain" in item}
        if f"from-{bridge}" in chains:
            return False
        await nft(router_script(bridge))
        return True

    async def routers(self) -> set[str]:
        """The bridges that have a routing guard (the inet table's ``from-<bridge>`` chains)."""
        try:
            raw = await nft(None, "-j", "list", "table", "inet", TABLE)
        except NetworkError:
            return set()
        return {item["chain"]["name"][len("from-"):] for item in json.loads(raw).get("nftables", [])
                if "chain" in item and item["chain"]["name"].startswith("from-")}

    async def remove_router(self, bridge: str) -> None:
        try:
            raw = await nft(None, "-j", "list", "table", "inet", TABLE)
        except NetworkError:
            return
        chains = {item["chain"]["name"] for item in json.loads(raw).get("nftables", []) if "chain" in item}
        if f"from-{bridge}" in chains:
            await nft(f'delete element inet {TABLE} networks {{ "{bridge}" }}\n'
                      f"flush chain inet {TABLE} from-{bridge}\ndelete chain inet {TABLE} from-{bridge}\n")

    async def ensure_port(self, spec: PortSpec) -> bool:
        """Load the port's chain unless it is there with the same digest; True if changed."""
        state = await self.state()
        if state["chains"].get(spec.name) == digest(spec) and spec.name in state["mapped"]:
            return False
        script = ("" if state["table"] else BASE) + port_script(spec, exists=spec.name in state["chains"])
        await nft(script)
        return True

    async def remove_port(self, port: str) -> None:
        state = await self.state()
        if port in state["chains"]:
            await nft(remove_script(port, mapped=port in state["mapped"]))

    async def ports(self) -> set[str]:
        return set((await self.state())["chains"])

    async def counters(self, port: str) -> dict[str, int]:
        """Packets each rule of a port's chain counted, by the rule's comment."""
        raw = await nft(None, "-j", "list", "chain", FAMILY, TABLE, chain_name(port))
        result: dict[str, int] = {}
        for item in json.loads(raw).get("nftables", []):
            rule = item.get("rule")
            if not rule:
                continue
            packets = next((e["counter"]["packets"] for e in rule.get("expr", []) if "counter" in e), 0)
            result[rule.get("comment", "")] = packets
        return result
