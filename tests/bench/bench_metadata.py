"""The metadata server under a boot storm: one `ucloud metadata` process with 10,000 VMs
in its projection, asked by guests on its bridge at fe80::a9fe:a9fe.

    .venv/bin/python -m tests.bench.bench_metadata [--vms 10000] [--guests 20] [--connections 10]
                                                   [--seconds 10] [--path /] [--quick]

The log (SQLite) gets one automatic network with 10,000 VMs on it, each with a NIC, a
MAC and user data, and 100 owners with an SSH key each. The server runs in a network
namespace with the network's bridge; each guest is a namespace of its own plugged into
the bridge by a veth with a VM's MAC (so its link-local address is that NIC's EUI-64
address, and the neighbour check holds). In every guest, `wrk` (Debian) keeps
``--connections`` connections busy for ``--seconds``: 20 guests x 10 = 200 concurrent
clients. Printed: requests per second in total and per CPU-second of the server process
(its utime+stime over the run), the latency percentiles wrk reports (worst guest), and
every non-200 answer or socket error (there must be none).

Over IPv6 loopback the server could not tell who asks (::1 is no NIC), so the load comes
over the bridge, the path guests use. Needs root (namespaces).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tests.support.nslab import Lab, http_get, lab
from ucloud.domain import network as net
from ucloud.domain import sshkey as sshkey_domain
from ucloud.domain import vm as vm_domain
from ucloud.domain.catalogue import build_codec
from ucloud.domain.events import Event
from ucloud.eventstore.records import NewEvent, StreamAppend
from ucloud.eventstore.sqlite import SqliteEventStore

VNI, PREFIX = 0xBE4C, "fd00:bec:4c:1::/64"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICvYBsl/DgCvGh/DMo+nY6kmlyPI24+sT5OvcdsYbW6Q bench@key"
OWNERS = 100


def mac_of(index: int) -> str:
    return net.mac_from_int(0x02_00_5E_00_00_00 + index)


async def populate(path: Path, vms: int) -> None:
    """The events the command side writes for a network, keys and VMs with NICs."""
    store = SqliteEventStore(path)
    codec = build_codec()
    versions: dict[str, int] = {}
    batch: dict[str, tuple[int, list[NewEvent]]] = {}  # a stream once per append

    async def flush() -> None:
        await store.append(*(StreamAppend(stream, expected, news) for stream, (expected, news) in batch.items()))
        batch.clear()

    async def record(stream: str, *events: Event) -> None:
        _, news = batch.setdefault(stream, (versions.get(stream, 0), []))
        for event in events:
            tag, schema, data = codec.encode(event)
            news.append(NewEvent(type=tag, schema=schema, data=data))
        versions[stream] = versions.get(stream, 0) + len(events)
        if len(batch) >= 500:
            await flush()

    network_id = net.network_id_for("owner0", "bench")
    network_stream = net.stream_name(network_id)
    await record(network_stream, net.NetworkRequested(network_id=network_id, owner="owner0", name="bench",
                                                      ipam=net.Ipam.AUTO),
                 net.NetworkAllocated(network_id=network_id, vni=VNI, group=net.multicast_group(VNI), prefix=PREFIX))
    for owner in range(OWNERS):
        key_id = sshkey_domain.key_id_for(f"owner{owner}", "key")
        await record(sshkey_domain.stream_name(key_id), sshkey_domain.SshKeyAdded(
            key_id=key_id, owner=f"owner{owner}", name="key", public_key=KEY, fingerprint="SHA256:bench"))
    for index in range(vms):
        vm_id, nic_id = uuid.uuid4(), uuid.uuid4()
        await record(vm_domain.stream_name(vm_id),
                     vm_domain.VmRequested(vm_id=vm_id, owner=f"owner{index % OWNERS}", name=f"vm{index}", cores=1,
                                           ram=256 * 2**20, disk=2**30, image="tiny",
                                           user_data=f"#!/bin/sh\necho vm{index}\n"),
                     vm_domain.VmNicAdded(vm_id=vm_id, nic_id=nic_id, network_id=network_id),
                     vm_domain.VmNicAllocated(vm_id=vm_id, nic_id=nic_id, mac=mac_of(index)))
        await record(network_stream, net.NetworkPortAdded(network_id=network_id, vm_id=vm_id, nic_id=nic_id))
    if batch:
        await flush()
    await store.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_wrk(output: str) -> dict[str, float]:
    """Requests, latency percentiles (ms), non-2xx answers and socket errors from wrk --latency."""
    def ms(text: str) -> float:
        value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    found: dict[str, float] = {"non2xx": 0, "errors": 0}
    for percent in ("50", "90", "99"):
        match = re.search(rf"^\s+{percent}%\s+(\S+)", output, re.M)
        if match:
            found[f"p{percent}"] = ms(match.group(1))
    found["requests"] = float(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", output):
        found["non2xx"] = float(match.group(1))
    if match := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output):
        found["errors"] = float(sum(int(g) for g in match.groups()))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=10000)
    parser.add_argument("--guests", type=int, default=20)
    parser.add_argument("--connections", type=int, default=10, help="per guest")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--path", default="/")
    parser.add_argument("--quick", action="store_true", help="1,000 VMs, 4 guests, 3 s: a smoke test")
    parser.add_argument("--no-neighbour-check", action="store_true", help="run the server without it")
    args = parser.parse_args()
    args.server_options = ["--no-neighbour-check"] if args.no_neighbour_check else []
    if args.quick:
        args.vms, args.guests, args.seconds = 1000, 4, 3
    if os.geteuid() != 0 or shutil.which("wrk") is None:
        print("needs root (network namespaces) and wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-metadata-") as scratch:
        log = Path(scratch) / "events.sqlite"
        started = time.perf_counter()
        asyncio.run(populate(log, args.vms))
        print(f"log: {args.vms} VMs with a NIC each, {OWNERS} owners with a key "
              f"({time.perf_counter() - started:.1f} s to write)")
        with lab() as built:
            return run(built, log, args)


def run(built: Lab, log: Path, args: argparse.Namespace) -> int:
    bridge = net.bridge_name(VNI)
    built.bridge(bridge, f"{net.router_address(PREFIX)}/64")
    ucloud = str(Path(sys.executable).with_name("ucloud"))
    server = subprocess.Popen(["ip", "netns", "exec", built.host, ucloud, "metadata", "--store", f"sqlite://{log}",
                               "--port", "80", *args.server_options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        guests = [built.guest(bridge, mac_of(index)) for index in range(args.guests)]
        started = time.perf_counter()
        for ns in guests:
            while True:
                status, _, body = http_get(ns, "fe80::a9fe:a9fe%eth0", args.path, python=sys.executable)
                if status == 200:
                    break
                if time.perf_counter() - started > 120:
                    print(f"no answer from the server in {ns}: {status} {body}", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        print(f"server ready (projection read, address on the bridge) after {time.perf_counter() - started:.1f} s")
        url = f"http://[fe80::a9fe:a9fe%eth0]{args.path}"
        before = cpu_seconds(server.pid)
        wall = time.perf_counter()
        runs = [subprocess.Popen(["ip", "netns", "exec", ns, "wrk", "-t1", f"-c{args.connections}",
                                  f"-d{args.seconds}s", "--latency", url], stdout=subprocess.PIPE, text=True)
                for ns in guests]
        outputs = [r.communicate()[0] for r in runs]
        wall = time.perf_counter() - wall
        used = cpu_seconds(server.pid) - before
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    results = [parse_wrk(o) for o in outputs]
    total = sum(r["requests"] for r in results)
    bad = sum(r["non2xx"] + r["errors"] for r in results)
    clients = args.guests * args.connections
    print(f"{args.guests} guests x {args.connections} connections = {clients} concurrent clients, "
          f"GET {args.path} for {args.seconds} s, neighbour check {'off' if args.no_neighbour_check else 'on'}")
    print(f"  {total:.0f} requests: {total / wall:.0f} req/s; server CPU {used:.1f} s "
          f"-> {total / used:.0f} req per CPU-second")
    for percent in ("50", "90", "99"):
        values = sorted(r[f"p{percent}"] for r in results if f"p{percent}" in r)
        if values:
            print(f"  p{percent} latency: median guest {values[len(values) // 2]:.2f} ms, worst guest {values[-1]:.2f} ms")
    print(f"  non-200 answers and socket errors: {bad:.0f}")
    if bad:
        print(outputs[0], file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
