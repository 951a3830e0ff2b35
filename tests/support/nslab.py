"""Network namespaces for tests: a "host" namespace with a ucloud bridge, and "guest"
namespaces each plugged into it by a veth whose MAC is a NIC's MAC, so its link-local
address is that NIC's EUI-64 address. Everything is removed at the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def needs_netns() -> pytest.MarkDecorator:
    usable = os.geteuid() == 0 and shutil.which("ip") is not None
    return pytest.mark.skipif(not usable, reason="needs root and iproute2 for network namespaces")


def run(*argv: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def in_ns(ns: str, *argv: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return run("ip", "netns", "exec", ns, *argv, check=check, timeout=timeout)


@dataclass
class Lab:
    tag: str
    host: str  # the host namespace (bridge, servers)
    guests: list[str] = field(default_factory=list)
    links: int = 0

    def bridge(self, name: str, *addresses: str) -> None:
        in_ns(self.host, "ip", "link", "add", name, "type", "bridge")
        in_ns(self.host, "sysctl", "-qw", f"net.ipv6.conf.{name}.accept_dad=0")
        for address in addresses:
            in_ns(self.host, "ip", "addr", "add", address, "dev", name, "nodad")
        in_ns(self.host, "ip", "link", "set", name, "up")

    def guest(self, bridge: str, mac: str, *addresses: str) -> str:
        """A namespace with eth0 (MAC ``mac``) on ``bridge``; returns its name."""
        self.links += 1
        ns = f"{self.tag}-g{self.links}"
        run("ip", "netns", "add", ns)
        self.guests.append(ns)
        in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
        outside = f"{self.tag[-6:]}v{self.links}"
        run("ip", "link", "add", outside, "netns", self.host, "type", "veth", "peer", "name", "eth0", "netns", ns)
        in_ns(ns, "ip", "link", "set", "eth0", "address", mac)
        in_ns(ns, "ip", "link", "set", "eth0", "up")
        in_ns(ns, "ip", "link", "set", "lo", "up")
        for address in addresses:
            in_ns(ns, "ip", "addr", "add", address, "dev", "eth0", "nodad")
        in_ns(self.host, "ip", "link", "set", outside, "master", bridge)
        in_ns(self.host, "ip", "link", "set", outside, "up")
        return ns

    def radvd(self, bridge: str, prefix: str, directory: Path) -> subprocess.Popen[bytes]:
        """radvd in the host namespace advertising ``prefix`` on ``bridge`` (SLAAC); the caller stops it."""
        config = directory / f"radvd-{bridge}.conf"
        config.write_text(f"interface {bridge} {{\n  AdvSendAdvert on;\n  MinRtrAdvInterval 3;\n"
                          f"  MaxRtrAdvInterval 10;\n  prefix {prefix} {{\n    AdvOnLink on;\n"
                          f"    AdvAutonomous on;\n  }};\n}};\n")
        return subprocess.Popen(["ip", "netns", "exec", self.host, "radvd", "-n", "-C", str(config),
                                 "-p", str(directory / f"radvd-{bridge}.pid"), "-m", "stderr"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def remove_guest(self, ns: str) -> None:
        run("ip", "netns", "del", ns, check=False)
        if ns in self.guests:
            self.guests.remove(ns)


@contextmanager
def lab(namespaces: Sequence[str] = ()) -> Iterator[Lab]:
    tag = f"uct{uuid.uuid4().hex[:6]}"
    host = f"{tag}-h"
    run("ip", "netns", "add", host)
    in_ns(host, "ip", "link", "set", "lo", "up")
    in_ns(host, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    built = Lab(tag=tag, host=host)
    try:
        yield built
    finally:
        for ns in [*built.guests, host]:
            run("ip", "netns", "del", ns, check=False)


GET_SCRIPT = r"""
import http.client, json, socket, sys
host, path, source = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""
bind = None
if source:  # a link-local source binds with its scope: (address, port, flow, scope id)
    address, _, scope = source.partition("%")
    bind = (address, 0, 0, socket.if_nametoindex(scope)) if scope else (address, 0)
try:
    conn = http.client.HTTPConnection(host, 80, timeout=5, source_address=bind)
    conn.request("GET", path)
    response = conn.getresponse()
    print(json.dumps({"status": response.status, "type": response.getheader("Content-Type", ""),
                      "body": response.read().decode("utf-8", "replace")}))
except OSError as error:
    print(json.dumps({"status": 0, "type": "", "body": f"{type(error).__name__}: {error}"}))
"""


def http_get(ns: str, host: str, path: str, source: str = "", python: str = "python3") -> tuple[int, str, str]:
    """GET http://[host]/path from inside ``ns`` (optionally from a given source address):
    (status, content type, body); status 0 when no connection was made."""
    import json

    done = in_ns(ns, python, "-c", GET_SCRIPT, host, path, source, timeout=30)
    answer = json.loads(done.stdout)
    return answer["status"], answer["type"], answer["body"]
