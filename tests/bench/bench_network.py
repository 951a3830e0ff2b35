"""Host networking: bring-up of a network for its first VM, and the port firewall at scale.

    .venv/bin/python -m tests.bench.run network
    .venv/bin/python -m tests.bench.bench_network [--networks 50] [--ports 1000] [--seconds 5]

Everything runs in network namespaces made for the run (root needed), with the real Linux
network driver (hostagent/network/linux.py) inside them.

1. Bring-up: in a "host" namespace with an underlay (a veth to another namespace), for
   each of ``--networks`` networks the driver makes what a host needs for the first VM of
   a network: VXLAN + bridge (``ensure_network``), then the VM's tap with its firewall
   chain (``ensure_port``). Reported: p50 and p99 of network + port, and of each part.
2. Firewall at scale: two "VMs" (guest namespaces on veth ports of one bridge) and iperf3
   (TCP, ``--seconds`` each) plus a UDP ping-pong for latency between them, three times in
   one run: no firewall table at all; the two ports' rules only; then with the chains of
   ``--ports`` ports loaded (the other ports' interfaces need not exist: the verdict map
   is keyed by name). The goal: 1,000 ports' throughput at least 90 % of 1 port's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.netns import PYTHON, ROOT, namespaces, py, sh
from ucloud.domain import network as net
from ucloud.hostagent.network import firewall
from ucloud.hostagent.network.driver import PortSpec

MAC_1, MAC_2 = "02:00:00:00:01:01", "02:00:00:00:01:02"
PREFIX = "fd00:1::/64"

LATENCY = """
import socket, sys, time
role, address, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
if role == "server":
    sock.bind((address, 9999))
    for _ in range(count):
        data, peer = sock.recvfrom(64)
        sock.sendto(data, peer)
else:
    sock.settimeout(2)
    times = []
    for i in range(count):
        start = time.perf_counter()
        sock.sendto(b"x" * 32, (address, 9999))
        sock.recvfrom(64)
        times.append(time.perf_counter() - start)
    times.sort()
    print(times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6)
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bring_up(networks: int, state: Path) -> None:
    with namespaces() as ns:
        host, peer = ns.add("bh"), ns.add("bp")
        ns.link(host, "ul0", peer, "ul0")  # the underlay: a veth to another "host"
        sh(host, "ip", "-6", "addr", "add", "fd99::a/64", "dev", "ul0", "nodad")
        ops = []
        for vni in range(1, networks + 1):
            mac = net.mac_from_int(vni)
            ops.append(["network", {"vni": vni, "group": net.multicast_group(vni), "ipam": "manual",
                                    "prefix": PREFIX}])
            ops.append(["port", {"name": f"uctb{vni:011d}", "mac": mac, "vni": vni,
                                 "addresses": [net.link_local_address(mac), net.eui64_address(PREFIX, mac)]}])
        times = py(host, "tests.support.netdriver", str(state), "ul0", "fd99::a", stdin=ops, timeout=600)
    network_times, port_times = times[0::2], times[1::2]
    total = [a + b for a, b in zip(network_times, port_times, strict=True)]
    ms = 1000
    print(f"bring-up of a network for its first VM ({networks} networks, one after another):")
    print(f"  network + port  p50 {percentile(total, 0.5) * ms:.1f} ms  p99 {percentile(total, 0.99) * ms:.1f} ms")
    print(f"  network (VXLAN, bridge)  p50 {percentile(network_times, 0.5) * ms:.1f} ms  "
          f"p99 {percentile(network_times, 0.99) * ms:.1f} ms")
    print(f"  port (tap, firewall chain)  p50 {percentile(port_times, 0.5) * ms:.1f} ms  "
          f"p99 {percentile(port_times, 0.99) * ms:.1f} ms", flush=True)


def firewall_at_scale(ports: int, seconds: int, state: Path) -> bool:
    with namespaces() as ns:
        host = ns.add("fh")
        guest_1 = ns.guest(host, "uctf00000000001", "f1", MAC_1, accept_ra=False)
        guest_2 = ns.guest(host, "uctf00000000002", "f2", MAC_2, accept_ra=False)
        eui_1, eui_2 = net.eui64_address(PREFIX, MAC_1), net.eui64_address(PREFIX, MAC_2)
        sh(guest_1, "ip", "-6", "addr", "add", f"{eui_1}/64", "dev", "eth0", "nodad")
        sh(guest_2, "ip", "-6", "addr", "add", f"{eui_2}/64", "dev", "eth0", "nodad")
        ops = [["network", {"vni": 1, "group": net.multicast_group(1), "ipam": "manual", "prefix": PREFIX}]]
        for name, mac in (("uctf00000000001", MAC_1), ("uctf00000000002", MAC_2)):
            ops.append(["port", {"name": name, "mac": mac, "vni": 1,
                                 "addresses": [net.link_local_address(mac), net.eui64_address(PREFIX, mac)]}])
        py(host, "tests.support.netdriver", str(state), stdin=ops)
        sh(guest_1, "busybox", "ping", "-6", "-c", "2", eui_2)
        server = subprocess.Popen(["ip", "netns", "exec", guest_2, "iperf3", "-s", "-B", eui_2],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

        def measure(label: str) -> float:
            out = json.loads(sh(guest_1, "iperf3", "-c", eui_2, "-t", str(seconds), "-J", timeout=seconds + 60))
            gbits = out["end"]["sum_received"]["bits_per_second"] / 1e9
            count = 5000
            echo = subprocess.Popen(["ip", "netns", "exec", guest_2, PYTHON, "-c", LATENCY, "server", eui_2,
                                     str(count)], cwd=ROOT)
            time.sleep(0.3)
            p50, p99 = map(float, sh(guest_1, PYTHON, "-c", LATENCY, "client", eui_2, str(count)).split())
            echo.wait(30)
            print(f"  {label:28} {gbits:6.2f} Gbit/s   round trip p50 {p50:.0f} us  p99 {p99:.0f} us", flush=True)
            return gbits

        print(f"firewall at scale: iperf3 TCP {seconds} s and 5,000 UDP round trips between two VM ports:")
        saved = sh(host, "nft", "list", "table", "bridge", "ucloud")
        sh(host, "nft", "delete", "table", "bridge", "ucloud")
        measure("no firewall")
        load = tempfile.NamedTemporaryFile("w", suffix=".nft", delete=False)
        load.write(saved)
        load.close()
        sh(host, "nft", "-f", load.name)
        one = measure("2 ports' rules (these two)")
        script = "".join(firewall.port_script(PortSpec(
            name=f"uctx{i:011d}", mac=net.mac_from_int(i + 10), vni=1,
            addresses=(net.link_local_address(net.mac_from_int(i + 10)),)), exists=False) for i in range(ports - 2))
        started = time.perf_counter()
        subprocess.run(["ip", "netns", "exec", host, "nft", "-f", "-"], input=script.encode(), check=True)
        loaded = time.perf_counter() - started
        chains = sh(host, "nft", "list", "table", "bridge", "ucloud").count("chain port-")
        print(f"  (loaded {ports - 2} more ports' chains in one nft -f: {loaded:.2f} s; {chains} port chains)")
        many = measure(f"{chains} ports' rules")
        server.kill()
        ratio = many / one
        print(f"  {chains} ports / 2 ports: {ratio * 100:.0f} % of the throughput (goal: at least 90 %)", flush=True)
        return chains == ports


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--networks", type=int, default=50)
    parser.add_argument("--ports", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.networks, args.ports, args.seconds = 5, 50, 1
    with tempfile.TemporaryDirectory() as tmp:
        bring_up(args.networks, Path(tmp) / "a")
        ok = firewall_at_scale(args.ports, args.seconds, Path(tmp) / "b")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
