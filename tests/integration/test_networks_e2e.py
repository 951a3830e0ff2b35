"""Networks end to end: two hosts as network namespaces joined by an IPv6 underlay (a
bridge in a third, "core" namespace, where etcd and `ucloud up --no-agent` run), each
running its own `ucloud-host` inside its namespace and reaching etcd over the underlay.
Everything is driven through the `ucloud` CLI; the guests are real TCG tiny guests.

Proves: two guests on one automatic network on different hosts get SLAAC addresses in the
network's /64 (read from their consoles) and ping each other across the VXLAN; the router
host pings both; a guest on another network reaches neither, until it is attached to the
network (hot-plugged through QMP) and then reaches them; detached, its NIC is gone again;
an agent restart flaps no device, address or rule."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.netns import Namespaces, namespaces, sh
from tests.support.qemu import TINY_CACHE, console_send
from ucloud.domain import network as net
from ucloud.domain.host import host_id_for
from ucloud.hostagent.images import ImageCatalogue
from ucloud.hostagent.tinyguest import ensure_tiny_guest

pytestmark = [pytest.mark.netns, pytest.mark.qemu, pytest.mark.etcd, pytest.mark.slow]

BIN = Path(sys.executable).parent
CORE, HOST_A, HOST_B = "fd99::1", "fd99::a", "fd99::b"
ETCD_PORT, API_PORT = 2379, 8080
POOL = "fd00:77::/48"


@dataclass
class Lab:
    ns: Namespaces
    tmp: Path
    core: str = ""
    hosts: dict[str, str] = field(default_factory=dict)  # hostname -> namespace
    state: dict[str, Path] = field(default_factory=dict)  # hostname -> state dir
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def ucloud(self, *args: str, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["ip", "netns", "exec", self.core, str(BIN / "ucloud"), "--api",
                               f"http://[{CORE}]:{API_PORT}", "--user", "alice", *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"ucloud {' '.join(args)}: {done.stderr}\n{self.logs()}")
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.ucloud(*args, "--json").stdout)

    def start_agent(self, hostname: str, *extra: str) -> None:
        log = open(self.tmp / f"agent-{hostname}.log", "ab")
        address = HOST_A if hostname == "ha" else HOST_B
        self.agents[hostname] = subprocess.Popen(
            ["ip", "netns", "exec", self.hosts[hostname], str(BIN / "ucloud-host"), "--store",
             f"etcd://[{CORE}]:{ETCD_PORT}/nets/v1", "--state-dir", str(self.state[hostname]), "--hostname",
             hostname, "--accel", "tcg", "--no-tiny", "--underlay", "ul0", "--underlay-address", address,
             # A restart within the heartbeat lease resumes it: the host is not declared dead.
             "--lease-ttl", "20", "--lease-margin", "2", *extra],
            stdout=log, stderr=log, env=self.env)

    def kill_agent(self, hostname: str) -> None:
        """As a crash or an upgrade in place would: the heartbeat lease stays, the next agent
        resumes it (a SIGTERM releases it, and the host's VMs move elsewhere)."""
        agent = self.agents.pop(hostname)
        agent.kill()
        agent.wait(30)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(self.tmp.glob("*.log")))

    def run_dir(self, vm: dict[str, Any]) -> Path:
        hostname = next(h for h in self.state if str(host_id_for(h)) == vm["host_id"])
        return self.state[hostname] / "run" / vm["id"]

    def serial(self, vm: dict[str, Any]) -> str:
        path = self.run_dir(vm) / "serial.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def console(self, vm: dict[str, Any], command: str, timeout: float = 60) -> str:
        """Run a shell command on the guest's console; its output up to a fresh end mark."""
        tag = uuid.uuid4().hex[:8]
        before = len(self.serial(vm))
        # The shell computes the mark: the echo of the typed line never contains it.
        console_send(self.run_dir(vm) / "console.sock", f"{command}; echo DONE-$((6*7))-{tag}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.serial(vm)[before:]
            if f"DONE-42-{tag}" in text:
                return text
            time.sleep(0.3)
        raise AssertionError(f"no answer to {command!r} from {vm['name']}: {self.serial(vm)[-1500:]}")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    guest = ensure_tiny_guest(TINY_CACHE)
    with namespaces() as ns:
        lab = Lab(ns, tmp_path)
        lab.env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_STATE_HOME": str(tmp_path / "st")}
        lab.core = ns.add("core")
        sh(lab.core, "ip", "link", "add", "ul", "type", "bridge", "mcast_snooping", "0")
        sh(lab.core, "ip", "-6", "addr", "add", f"{CORE}/64", "dev", "ul", "nodad")
        sh(lab.core, "ip", "link", "set", "ul", "up")
        for hostname, address in (("ha", HOST_A), ("hb", HOST_B)):
            host = ns.add(hostname)
            ns.link(lab.core, f"ul-{hostname}", host, "ul0")
            sh(lab.core, "ip", "link", "set", f"ul-{hostname}", "master", "ul")
            sh(host, "ip", "-6", "addr", "add", f"{address}/64", "dev", "ul0", "nodad")
            lab.hosts[hostname] = host
            # Short: QMP and console socket paths under it must fit 107 bytes.
            state = Path(tempfile.mkdtemp(prefix=f"ucn{hostname}-", dir="/tmp"))
            ImageCatalogue(state / "images").install_tiny(TINY_CACHE)
            lab.state[hostname] = state
        assert guest.kernel.exists()
        etcd_log = open(tmp_path / "etcd.log", "ab")
        etcd = subprocess.Popen(
            ["ip", "netns", "exec", lab.core, shutil.which("etcd") or "/usr/bin/etcd", "--name", "core",
             "--data-dir", str(tmp_path / "etcd"), "--listen-client-urls", f"http://[{CORE}]:{ETCD_PORT}",
             "--advertise-client-urls", f"http://[{CORE}]:{ETCD_PORT}", "--listen-peer-urls", "http://127.0.0.1:2380",
             "--initial-advertise-peer-urls", "http://127.0.0.1:2380", "--initial-cluster",
             "core=http://127.0.0.1:2380", "--max-txn-ops", "1024"], stdout=etcd_log, stderr=etcd_log)
        control_log = open(tmp_path / "control.log", "ab")
        control = subprocess.Popen(
            ["ip", "netns", "exec", lab.core, str(BIN / "ucloud"), "up", "--no-agent", "--store",
             f"etcd://[{CORE}]:{ETCD_PORT}/nets/v1", "--listen", CORE, "--port", str(API_PORT), "--state-dir",
             str(tmp_path / "control"), "--insecure-header-auth", "--no-metadata", "--ipv6-pool", POOL],
            stdout=control_log, stderr=control_log, env=lab.env)
        try:
            deadline = time.monotonic() + 60
            while lab.ucloud("network", "list", check=False).returncode != 0:
                assert control.poll() is None and etcd.poll() is None, lab.logs()
                assert time.monotonic() < deadline, lab.logs()
                time.sleep(0.5)
            lab.start_agent("ha", "--router")
            lab.start_agent("hb")
            deadline = time.monotonic() + 60
            while True:
                hosts = lab.ucloud("--realm", "ucloud-admin", "host", "list", "--json", check=False)
                if hosts.returncode == 0 and len(json.loads(hosts.stdout)) == 2:
                    break
                assert time.monotonic() < deadline, lab.logs()
                time.sleep(0.5)
            yield lab
        finally:
            for agent in lab.agents.values():
                agent.send_signal(signal.SIGTERM)
            for agent in lab.agents.values():
                try:
                    agent.wait(20)
                except subprocess.TimeoutExpired:
                    agent.kill()
            for process in (control, etcd):
                process.kill()
                process.wait(10)
            # QEMU and radvd run in the host namespaces: the namespaces' cleanup kills them.
    for state in lab.state.values():
        shutil.rmtree(state, ignore_errors=True)


def wait_for(probe: Any, what: str, lab: Lab, timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"{what}: not within {timeout}s\n{lab.logs()}")


def nic_addresses(serial: str) -> dict[str, str]:
    """The guest's latest UCLOUD-NET line as {address: interface}."""
    lines = re.findall(r"UCLOUD-NET([^\r\n]*)", serial)
    if not lines:
        return {}
    return {item.split("=")[1].split("/")[0]: item.split("=")[0] for item in lines[-1].split()}


def pings(lab: Lab, vm: dict[str, Any], address: str, source: str = "") -> bool:
    """Whether the guest gets answers (the result words are computed by the guest's shell,
    so the console's echo of the typed line cannot be mistaken for them)."""
    via = f"-I {source} " if source else ""
    answer = lab.console(vm, f"ping -6 -c 2 -W 3 {via}{address} >/dev/null && echo R-$((6*7))-OK || echo R-$((6*7))-NO")
    assert ("R-42-OK" in answer) != ("R-42-NO" in answer), answer
    return "R-42-OK" in answer


def vm_show(lab: Lab, vm_id: str) -> dict[str, Any]:
    result: dict[str, Any] = lab.json("vm", "show", vm_id)
    return result


def test_guests_on_two_hosts_reach_each_other_over_vxlan_and_hot_plug_joins_a_third(lab: Lab) -> None:
    lan = lab.json("network", "create", "lan", "--ipam", "auto")
    lab.json("network", "create", "other", "--ipam", "auto")
    assert lan["status"] == "ready" and lan["prefix"].startswith("fd00:77:")
    created = [lab.json("vm", "create", name, "--image", "tiny", "--cores", "1", "--ram", "192MB", "--disk", "1GB",
                        "--network", network, "--wait", "--timeout", "200")
               for name, network in (("a", "lan"), ("b", "lan"), ("c", "other"))]
    a, b, c = (vm_show(lab, vm["id"]) for vm in created)
    assert a["host_id"] != b["host_id"], "the scheduler spreads: a and b are on different hosts"
    address = {vm["name"]: vm["nics"][0]["address"] for vm in (a, b, c)}
    assert net.eui64_address(lan["prefix"], a["nics"][0]["mac"]) == address["a"]

    # SLAAC from the router host's radvd, read from each guest's console.
    for vm in (a, b, c):
        wait_for(lambda vm=vm: address[vm["name"]] in nic_addresses(lab.serial(vm)), f"{vm['name']}'s SLAAC", lab)
    assert pings(lab, a, address["b"]) and pings(lab, b, address["a"])
    router = lab.hosts["ha"]
    for target in (address["a"], address["b"]):
        assert subprocess.run(["ip", "netns", "exec", router, "busybox", "ping", "-6", "-c", "2", "-W", "3", target],
                              capture_output=True, timeout=30, check=False).returncode == 0
    # c is on another network: it reaches neither.
    assert not pings(lab, c, address["a"]) and not pings(lab, c, address["b"])

    # Hot-plug: c joins lan on the running guest and reaches a and b; detached, it is gone.
    lab.ucloud("vm", "attach-network", c["id"], "lan")
    c = wait_for(lambda: (v := vm_show(lab, c["id"])) and len(v["nics"]) == 2 and v["nics"][1]["mac"] and v,
                 "c's second NIC", lab)
    second = c["nics"][1]["address"]
    wait_for(lambda: second in nic_addresses(lab.serial(c)), "c's SLAAC address on lan", lab)
    assert pings(lab, c, address["a"]) and pings(lab, c, address["b"])
    lab.ucloud("vm", "detach-network", c["id"], "lan")
    wait_for(lambda: second not in nic_addresses(lab.serial(c)), "c's lan NIC unplugged", lab)
    assert not pings(lab, c, address["a"])

    # An agent restart (killed, started again within its lease) adopts everything as it
    # is: same links, rules, radvd, guests.
    def snapshot(hostname: str) -> tuple[str, str]:
        links = json.loads(sh(lab.hosts[hostname], "ip", "-j", "link", "show"))
        ours = sorted((link["ifname"], link["ifindex"]) for link in links if link["ifname"].startswith("uc"))
        rules = re.sub(r"packets \d+ bytes \d+", "", sh(lab.hosts[hostname], "nft", "-a", "list", "table", "bridge",
                                                        "ucloud"))
        return json.dumps(ours), rules

    before = {h: snapshot(h) for h in ("ha", "hb")}
    radvd = sorted((lab.state["ha"] / "net" / "radvd").glob("*.pid"))
    pids = {p.name: p.read_text() for p in radvd}
    assert pids, "the router host runs radvd"
    for hostname in ("ha", "hb"):
        lab.kill_agent(hostname)
        lab.start_agent(hostname, *(("--router",) if hostname == "ha" else ()))
    time.sleep(10)  # a few reconcile passes
    assert {h: snapshot(h) for h in ("ha", "hb")} == before
    assert {p.name: p.read_text() for p in radvd} == pids
    assert pings(lab, a, address["b"])

    # Spoofing from a real guest: c answers from the router (its network's prefix::1), but
    # not from an address of the /64 that is not its own, nor with a MAC not its own.
    other = lab.json("network", "show", "other")
    gateway = net.router_address(other["prefix"])
    c = vm_show(lab, c["id"])
    assert pings(lab, c, gateway)
    forged = net.eui64_address(other["prefix"], "02:00:00:00:ee:ee")
    # (busybox ip knows no "nodad": duplicate address detection takes its second first.)
    lab.console(c, f"ip -6 addr add {forged}/64 dev eth0; sleep 3; ip -6 addr show dev eth0")
    assert not pings(lab, c, gateway, source=forged)
    lab.console(c, "ip link set eth0 down; ip link set eth0 address 02:00:00:00:ee:ee; ip link set eth0 up")
    assert not pings(lab, c, gateway)
    host_c = next(h for h in lab.hosts if str(host_id_for(h)) == c["host_id"])
    chain = f"port-uct{c['nics'][0]['id'].replace('-', '')[:12]}"
    counted = sh(lab.hosts[host_c], "nft", "list", "chain", "bridge", "ucloud", chain)
    for rule in ("ip6-source-spoof", "mac-spoof"):
        line = next(line for line in counted.splitlines() if f'"{rule}"' in line)
        assert int(re.search(r"packets (\d+)", line).group(1)) > 0, counted  # type: ignore[union-attr]
