"""Network namespaces as hosts and guests for network tests: real veth, bridges, VXLAN,
nftables and radvd, each namespace with its own stack. Names carry a random tag so that
parallel runs do not meet; everything made is deleted at the end."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parents[2]


def sh(ns: str | None, *argv: str, check: bool = True, timeout: float = 60) -> str:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    done = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(full)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def py(ns: str, module: str, *args: str, stdin: Any = None, timeout: float = 120) -> Any:
    """Run ``python -m module args`` inside ``ns``; its stdout is JSON."""
    done = subprocess.run(["ip", "netns", "exec", ns, PYTHON, "-m", module, *args], cwd=ROOT,
                          input=json.dumps(stdin) if stdin is not None else None,
                          capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} in {ns} exited {done.returncode}: {done.stderr[-3000:]}")
    return json.loads(done.stdout) if done.stdout.strip() else None


class Namespaces:
    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:5]
        self.made: list[str] = []

    def add(self, name: str) -> str:
        ns = f"uc{self.tag}{name}"
        sh(None, "ip", "netns", "add", ns)
        self.made.append(ns)
        sh(ns, "ip", "link", "set", "lo", "up")
        return ns

    def link(self, a: str, a_if: str, b: str, b_if: str, b_mac: str | None = None) -> None:
        """A veth pair between two namespaces (``b_mac``: the b end's MAC, set before it is up)."""
        tmp_a, tmp_b = f"v{uuid.uuid4().hex[:10]}", f"v{uuid.uuid4().hex[:10]}"
        sh(None, "ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b,
           *(("address", b_mac) if b_mac else ()))
        sh(None, "ip", "link", "set", tmp_a, "netns", a, "name", a_if)
        sh(None, "ip", "link", "set", tmp_b, "netns", b, "name", b_if)
        sh(a, "ip", "link", "set", a_if, "up")
        sh(b, "ip", "link", "set", b_if, "up")

    def guest(self, host: str, port: str, name: str, mac: str, accept_ra: bool = True) -> str:
        """A namespace standing in for a VM: its eth0 is the peer of ``port`` in ``host``
        (which the network driver adopts as the VM's port), with the NIC's MAC."""
        ns = self.add(name)
        sh(ns, "sysctl", "-qw", f"net.ipv6.conf.default.accept_ra={int(accept_ra)}")
        sh(ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        self.link(host, port, ns, "eth0", b_mac=mac)
        sh(host, "ip", "link", "set", port, "down")  # the driver brings it up once filtered
        return ns

    def cleanup(self) -> None:
        for ns in reversed(self.made):
            # radvd daemons started inside a namespace die with their namespace's processes.
            for pid in sh(None, "ip", "netns", "pids", ns, check=False).split():
                subprocess.run(["kill", "-9", pid], check=False)
            sh(None, "ip", "netns", "del", ns, check=False)


@contextlib.contextmanager
def namespaces() -> Iterator[Namespaces]:
    made = Namespaces()
    try:
        yield made
    finally:
        made.cleanup()
