"""Start-up over 100,000 VMs: each daemon from spawn to ready, with and without its snapshots.

    .venv/bin/python -m tests.bench.run startup                  # through the runner (both logs)
    .venv/bin/python -m tests.bench.run startup -- --backend etcd   # one of them: sqlite | etcd | both
    .venv/bin/python -m tests.bench.bench_startup [--runs 3] [--vms 100000] [--hosts 1000] [--backend both]
    .venv/bin/python -m tests.bench.bench_startup --quick        # 5,000 VMs on 50 hosts, 1 run
    .venv/bin/python -m tests.bench.bench_startup --only agent --keep   # one daemon; keep the logs in /tmp

The log (SQLite, a file in /tmp) is written first, not timed: real domain events encoded
by the domain codec, each indexed under the slices the command side gives it (the VM's
host), in appends of a few thousand events:
- 1,000 hosts: ``host.registered``, ``host.up`` (a session from a heartbeat lease this
  script takes for an hour, so the failure detector sees every host alive);
- 100,000 VMs, VM i on host i mod 1,000: requested, scheduled + ``host.capacity_claimed``,
  started; then one in ten stopped (stop requested, stopped), one in twenty deleted (delete
  requested, deleted, ``host.capacity_released``), one in ten rebooted (reboot requested,
  rebooted), by a hash of its number (every host gets the mix). About 4.6 events a VM.

Then the snapshots, as production leaves them: each daemon runs once on the log as its own
process until caught up and is stopped with SIGTERM (`ucloud gateway` saves its read
models' snapshot on the way out, `ucloud processes` each view it led, the host agent its
slice's). Then a tail: 1,000 more VMs requested, scheduled and started on other hosts, and
two stop requests for VMs of the measured host. That log is kept twice: as it is, and a
copy whose snapshots table is emptied (the baseline: the same log, no snapshots).

Measured, each as its own process, on a fresh copy of the log for every run (so every run
starts from the same snapshots and tail), clock from spawn (Python's start included):
- gateway: `ucloud gateway --store sqlite://… --insecure-header-auth`: "serving" = the
  first 200 from GET /healthz; "caught up" = /healthz says lag 0 at the log's head. Events
  read: the head minus the position its snapshot restored (from its log line; it reads
  every event after that).
- processes: `ucloud processes --store … --metrics-port P`: each process manager leading
  with its position at the newest event of a type it follows (from /metrics; a manager's
  position only moves on those). Events read: ``ucloud_process_read_total`` per manager.
- host agent: the real agent (``run_agent`` of `ucloud-host`) for one of the 1,000 hosts
  (about 100 VMs), in its own process, with the pretend hypervisor of
  tests/bench/fake_hypervisor.py (its ~90 running guests are in a file; it adopts them)
  and no network driver: "caught up" = its log line "is up in session" (lease held,
  registered, slice read to the head, host.up recorded); "reconciled" = its line
  "reconciled: first pass …", which gives the events it read (slice, VM streams, the
  networks slice). The pass stops the two VMs asked to stop in the tail and reports them.
CPU seconds are the process's own (/proc/PID/stat, all threads) at the moment it was seen
ready.

On etcd (``--backend etcd``, or ``both``: SQLite first, then etcd) the same log, snapshots,
tail and daemons, with ``--store etcd://127.0.0.1:PORT/v1``: one etcd member started as
tests/support/etcd.py starts it (data dir on /dev/shm, --max-txn-ops 4096,
--max-request-bytes 8 MiB) with --quota-backend-bytes 8 GiB. The log is written through
``EtcdEventStore.append`` in appends of 800 events (about 3,000 etcd operations each). The
member is stopped (SIGTERM) after the tail; its data dir, and a copy from which the
snapshot keys are deleted (the baseline), are copied afresh for every run, and the member
is started on that copy (on the same ports) before the clock starts. Also reported: the
etcd member's CPU seconds from the daemon's spawn to its readiness (the shared machine's
load shows in wall time, not in CPU time). The packages' bytecode is compiled first (compileall), as in an installed ucloud. Reported: the median of the runs (wall s, CPU s, events read) per daemon, with and
without snapshots. Figures: docs/performance.md, "Start-up over 100,000 VMs".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench.fake_hypervisor import FakeHypervisor
from tests.support.etcd import MAX_TXN_OPS, EtcdMember, _tmp_root, free_port
from ucloud.commands.aggregates import HOST, VM
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import AggregateType
from ucloud.domain import host as host_domain
from ucloud.domain import vm as vm_domain
from ucloud.domain.catalogue import build_codec
from ucloud.domain.events import Event
from ucloud.eventstore.etcd import EtcdEventStore
from ucloud.eventstore.etcd_client import prefix_end
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.leases import Grant, Leases, SqliteLeases, leases_for
from ucloud.eventstore.records import NewEvent, StreamAppend
from ucloud.eventstore.sqlite import SqliteEventStore
from ucloud.processes import daemon as processes

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
GiB = 1024**3
TICK = os.sysconf("SC_CLK_TCK")
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq3bX9bVtY5wJgV0k2mB8dQx5s7Zr3hYv1fJ0pLkq2a alice@laptop"
MEASURED = 7  # the host whose agent is measured
PACKAGES = ("auth", "cli", "commands", "domain", "eventstore", "gateway", "hostagent", "imagestore", "processes",
            "projections")


Server = Callable[[], float] | None  # the etcd member's CPU seconds, when the log is in etcd


def hostname(index: int) -> str:
    return f"bench-host-{index:04d}"


class Log:
    """Domain events into a log (SQLite or etcd), with the slices the command side would give them."""

    def __init__(self, store: EventStore, flush_at: int = 5000) -> None:
        self.store = store
        self.flush_at = flush_at  # events per append (etcd: bounded by --max-txn-ops)
        self.ask_versions = False  # look up the version of a stream not seen yet (the tail on etcd)
        self.codec = build_codec()
        self.states: dict[str, Any] = {}
        self.versions: dict[str, int] = {}
        self.batch: dict[str, list[NewEvent]] = {}
        self.pending = 0
        self.written = 0

    async def add(self, aggregate: AggregateType[Any], stream: str, event: Event, actor: str) -> None:
        before = self.states.get(stream)
        after = aggregate.evolve(before, event)
        assert aggregate.slices is not None
        had, has = aggregate.slices(before), aggregate.slices(after)
        self.states[stream] = after
        tag, schema, data = self.codec.encode(event)
        self.batch.setdefault(stream, []).append(NewEvent(
            type=tag, schema=schema, data=data, actor=actor, correlation_id=uuid.uuid4(),
            slices=had + tuple(s for s in has if s not in had)))
        self.pending += 1
        if self.pending >= self.flush_at:
            await self.flush()

    async def vm(self, event: Event, actor: str) -> None:
        await self.add(VM, vm_domain.stream_name(event.vm_id), event, actor)  # type: ignore[attr-defined]

    async def host(self, event: Event, actor: str) -> None:
        await self.add(HOST, host_domain.stream_name(event.host_id), event, actor)  # type: ignore[attr-defined]

    async def flush(self) -> None:
        if not self.batch:
            return
        if self.ask_versions:
            unknown = [stream for stream in self.batch if stream not in self.versions]
            found = await asyncio.gather(*(self.store.stream_version(stream) for stream in unknown))
            self.versions.update(zip(unknown, found, strict=True))
        appends = [StreamAppend(stream, self.versions.get(stream, 0), events) for stream, events in self.batch.items()]
        await self.store.append(*appends)
        for stream, events in self.batch.items():
            self.versions[stream] = self.versions.get(stream, 0) + len(events)
        self.written += self.pending
        self.batch.clear()
        self.pending = 0

    def vm_state(self, vm_id: uuid.UUID) -> vm_domain.Vm | None:
        state: vm_domain.Vm | None = self.states.get(vm_domain.stream_name(vm_id))
        return state


@dataclass
class Population:
    host_ids: list[uuid.UUID]
    vm_ids: list[uuid.UUID]
    grants: dict[uuid.UUID, Grant]


async def populate(store: EventStore, leases: Leases, vms: int, hosts: int, flush_at: int = 5000
                   ) -> tuple[Log, Population]:
    log = Log(store, flush_at)
    host_ids, grants = [], {}
    for index in range(hosts):
        name = hostname(index)
        host_id = host_domain.host_id_for(name)
        grant = await leases.acquire(host_domain.slice_name(host_id), name, 3600)
        assert grant is not None
        host_ids.append(host_id)
        grants[host_id] = grant
        actor = f"host/{name}@ucloud-system"
        await log.host(host_domain.HostRegistered(host_id=host_id, hostname=name, cores=256, ram=1024 * GiB,
                                                  disk=64 * 1024 * GiB), actor)
        await log.host(host_domain.HostUp(host_id=host_id, session=grant.token, lease_ttl=3600), actor)
    await leases.close()
    vm_ids = [uuid.UUID(int=(10**12 + i) << 64 | i) for i in range(vms)]
    for index, vm_id in enumerate(vm_ids):
        await lifecycle(log, vm_id, index, host_ids[index % hosts])
    await log.flush()
    return log, Population(host_ids, vm_ids, grants)


async def lifecycle(log: Log, vm_id: uuid.UUID, index: int, host_id: uuid.UUID, *, full: bool = True) -> None:
    owner = f"user{index % 10_000}@users"
    agent = f"host/{hostname(0)}@ucloud-system"  # who reports does not change what is read
    cores, ram, disk = 1 + index % 4, (1 + index % 8) * GiB, (10 + index % 90) * GiB
    await log.vm(vm_domain.VmRequested(vm_id=vm_id, owner=f"user{index % 10_000}", name=f"vm-{index}", cores=cores,
                                       ram=ram, disk=disk, image="tiny", ssh_keys=(SSH_KEY,)), owner)
    await log.vm(vm_domain.VmScheduled(vm_id=vm_id, host_id=host_id), "scheduler@ucloud-system")
    await log.host(host_domain.CapacityClaimed(host_id=host_id, vm_id=vm_id, cores=cores, ram=ram, disk=disk),
                   "scheduler@ucloud-system")
    await log.vm(vm_domain.VmStarted(vm_id=vm_id, host_id=host_id, accelerator="kvm"), agent)
    if not full:
        return
    fate = (index * 2654435761 >> 8) % 40  # not by host: every host gets the whole mix
    if fate % 10 == 3:
        await log.vm(vm_domain.VmStopRequested(vm_id=vm_id), owner)
        await log.vm(vm_domain.VmStopped(vm_id=vm_id, host_id=host_id), agent)
    elif fate % 20 == 7:
        await log.vm(vm_domain.VmDeleteRequested(vm_id=vm_id), owner)
        await log.vm(vm_domain.VmDeleted(vm_id=vm_id, host_id=host_id), agent)
        await log.host(host_domain.CapacityReleased(host_id=host_id, vm_id=vm_id), "scheduler@ucloud-system")
    elif fate % 8 == 5:
        await log.vm(vm_domain.VmRebootRequested(vm_id=vm_id), owner)
        await log.vm(vm_domain.VmRebooted(vm_id=vm_id, host_id=host_id), agent)


# -- the daemons -------------------------------------------------------------------------------


@dataclass
class Started:
    ready: float  # wall seconds from spawn
    cpu: float  # the process's CPU seconds then
    read: int  # events read
    server_cpu: float | None = None  # etcd's CPU seconds from the spawn to then
    first: float | None = None  # gateway: first 200 from /healthz; agent: caught up
    detail: dict[str, Any] = field(default_factory=dict)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class Daemon:
    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.began = time.perf_counter()
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                        start_new_session=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.began

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.process.args!r} ended ({self.process.returncode}):\n{self.output()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            code = self.process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            code = self.process.wait()
        self.log.close()
        if code != 0:
            raise RuntimeError(f"{self.process.args!r} stopped with {code}:\n{self.output()[-3000:]}")


def until(daemon: Daemon, ready: Callable[[], bool], timeout: float = 600.0) -> None:
    while not ready():
        daemon.check()
        if daemon.elapsed() > timeout:
            raise TimeoutError(f"{daemon.process.args!r} not ready after {timeout}s:\n{daemon.output()[-3000:]}")
        time.sleep(0.01)


def run_gateway(store: str, work: Path, head: int, server: Server = None) -> Started:
    port = free_port()
    began = server() if server else 0.0
    daemon = Daemon([str(BIN / "ucloud"), "gateway", "--store", store, "--insecure-header-auth",
                     "--listen", "127.0.0.1", "--port", str(port), "--state-dir", str(work / "gateway")],
                    work / "gateway.log")
    first: float | None = None
    seen: dict[str, Any] = {}

    def ready() -> bool:
        nonlocal first
        try:
            status, body = get(f"http://127.0.0.1:{port}/healthz")
        except OSError:
            return False
        if status != 200:
            return False
        at, cpu = daemon.elapsed(), cpu_seconds(daemon.process.pid)
        if first is None:
            first = at
        health = json.loads(body)
        if health["lag"] == 0 and health["position"] >= head:
            seen.update(at=at, cpu=cpu, server=server() - began if server else None)
            return True
        return False

    try:
        until(daemon, ready)
    finally:
        daemon.stop()
    restored = re.search(r"projections read-models restored at position (\d+)", daemon.output())
    read = head - (int(restored.group(1)) if restored else 0)
    return Started(seen["at"], seen["cpu"], read, seen["server"], first)


def figure(metrics: str, name: str, manager: str) -> int:
    found = re.search(rf'^{name}\{{name="{manager}"\}} (\d+)$', metrics, re.MULTILINE)
    if found is None:
        raise AssertionError(f"{name} of {manager} not in:\n{metrics}")
    return int(found.group(1))


def run_processes(store: str, work: Path, targets: dict[str, int], server: Server = None) -> Started:
    port = free_port()
    began = server() if server else 0.0
    daemon = Daemon([str(BIN / "ucloud"), "processes", "--store", store, "--instance", "bench",
                     "--metrics-listen", "127.0.0.1", "--metrics-port", str(port)], work / "processes.log")
    each: dict[str, float] = {}
    seen: dict[str, Any] = {}

    def ready() -> bool:
        try:
            _, metrics = get(f"http://127.0.0.1:{port}/metrics")
        except OSError:
            return False
        at, cpu = daemon.elapsed(), cpu_seconds(daemon.process.pid)
        for name, target in targets.items():
            if name not in each and figure(metrics, "ucloud_process_leader", name) and \
                    figure(metrics, "ucloud_process_position", name) >= target:
                each[name] = at
        if len(each) < len(targets):
            return False
        seen.update(at=at, cpu=cpu, metrics=metrics, server=server() - began if server else None)
        return True

    try:
        until(daemon, ready)
    finally:
        daemon.stop()
    reads = {name: figure(seen["metrics"], "ucloud_process_read_total", name) for name in targets}
    return Started(seen["at"], seen["cpu"], sum(reads.values()), seen["server"], detail={
        name: f"{each[name]:.2f} s, {reads[name]:,} read" for name in targets})


def run_agent(store: str, work: Path, state: Path, server: Server = None) -> Started:
    began = server() if server else 0.0
    daemon = Daemon([sys.executable, "-m", "tests.bench.fake_hypervisor", "--store", store,
                     "--state-dir", str(state), "--hostname", hostname(MEASURED)], work / "agent.log")
    up: float | None = None
    seen: dict[str, Any] = {}

    def ready() -> bool:
        nonlocal up
        output = daemon.output()
        if up is None and " is up in session " in output:
            up = daemon.elapsed()
        done = re.search(r"reconciled: first pass over the (\d+) VMs of this host done, (\d+) events read", output)
        if done is None:
            return False
        seen.update(at=daemon.elapsed(), cpu=cpu_seconds(daemon.process.pid), vms=int(done.group(1)),
                     read=int(done.group(2)), server=server() - began if server else None)
        return True

    try:
        until(daemon, ready)
    finally:
        daemon.stop()
    return Started(seen["at"], seen["cpu"], seen["read"], seen["server"], up, detail={"VMs": seen["vms"]})


# -- the log, its snapshots and its tail --------------------------------------------------------


def copy_log(source: Path, target: Path) -> None:
    """The log and its leases (every connection to the source is closed: no -wal file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", ".leases"):
        shutil.copyfile(str(source) + suffix, str(target) + suffix)


async def interests(store: EventStore) -> dict[str, frozenset[str] | None]:
    """Per process manager: the event types it follows (None: all)."""
    leases = leases_for(store)
    made = processes.build(CommandService(store), leases, processes.ProcessSettings(instance="bench"))
    found = {runner.manager.name: runner.manager.interested_in for runner in made.runners}
    await leases.close()
    await store.close()
    return found


def manager_targets(path: Path) -> dict[str, int]:
    """Per process manager: the newest position of an event of a type it follows."""
    targets = {}
    with sqlite3.connect(path) as conn:
        head = conn.execute("SELECT MAX(position) FROM events").fetchone()[0]
        for name, types in asyncio.run(interests(SqliteEventStore(path))).items():
            if types is None:
                targets[name] = head
                continue
            marks = ",".join("?" * len(types))
            targets[name] = conn.execute(f"SELECT MAX(position) FROM events WHERE type IN ({marks})",
                                         tuple(types)).fetchone()[0] or 0
    return targets


def head_of(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT MAX(position) FROM events").fetchone()[0])


def agent_host(log: Log, population: Population, agent_state: Path) -> list[uuid.UUID]:
    """The measured host's guests (the running ones) and heartbeat lease, in its agent's state dir."""
    measured = population.host_ids[MEASURED]
    mine = [v for v in population.vm_ids if (s := log.vm_state(v)) is not None and s.host_id == measured]
    running = [v for v in mine if (s := log.vm_state(v)) is not None and s.status is vm_domain.Status.RUNNING]
    FakeHypervisor.write(agent_state, running)
    grant = population.grants[measured]
    (agent_state / "heartbeat-lease").write_text(json.dumps(
        {"name": grant.name, "holder": grant.holder, "ttl": grant.ttl, "token": grant.token}))
    print(f"measured host {hostname(MEASURED)}: {len(mine)} VMs, {len(running)} running", flush=True)
    return running


def first_starts(work: Path, url: str, agent_state: Path, head: Callable[[], int],
                 targets: Callable[[], dict[str, int]]) -> None:
    """Each daemon once, until caught up, then SIGTERM: the snapshots production leaves."""
    work.mkdir()
    for what in ("gateway", "processes", "host agent"):
        if what == "gateway":
            first = run_gateway(url, work, head())
        elif what == "processes":
            first = run_processes(url, work, targets())
        else:
            first = run_agent(url, work, agent_state)
        print(f"  first start of the {what}, to save its snapshots: {first.ready:.2f} s, {first.read:,} read",
              flush=True)


async def write_tail(log: Log, population: Population, running: list[uuid.UUID], vms: int, hosts: int) -> int:
    """What happened while the daemons were down: 1,000 VMs placed elsewhere, two stop requests."""
    before = log.written
    for index in range(vms, vms + 1000):
        host_at = index % hosts if index % hosts != MEASURED else (MEASURED + 1) % hosts
        await lifecycle(log, uuid.UUID(int=(10**12 + index) << 64 | index), index, population.host_ids[host_at],
                        full=False)
    for vm_id in running[:2]:
        await log.vm(vm_domain.VmStopRequested(vm_id=vm_id), "user7")
    await log.flush()
    await log.store.close()
    return log.written - before


def prepare(root: Path, vms: int, hosts: int) -> tuple[Path, Path, Path, int]:
    """The log with snapshots, the same log without, and the measured agent's state dir."""
    log_path = root / "made" / "events.sqlite"
    log_path.parent.mkdir(parents=True)
    began = time.perf_counter()
    log, population = asyncio.run(populate(SqliteEventStore(log_path), SqliteLeases(str(log_path) + ".leases"),
                                           vms, hosts))
    asyncio.run(log.store.close())
    print(f"log: {log.written:,} events of {vms:,} VMs on {hosts:,} hosts written in "
          f"{time.perf_counter() - began:.1f} s ({log_path.stat().st_size / 2**20:.0f} MiB)", flush=True)
    agent_state = root / "made" / "agent"
    running = agent_host(log, population, agent_state)

    # The snapshots, as each daemon leaves them when stopped on purpose.
    url = f"sqlite://{log_path}"
    first_starts(root / "made" / "first", url, agent_state, lambda: head_of(log_path),
                 lambda: manager_targets(log_path))

    # The tail: what happened while they were down.
    async def tail() -> int:
        log.store = SqliteEventStore(log_path)
        log.versions = {}
        with sqlite3.connect(log_path) as conn:
            for stream, version in conn.execute("SELECT stream, MAX(version) FROM events GROUP BY stream"):
                log.versions[stream] = version
        return await write_tail(log, population, running, vms, hosts)

    print(f"tail: {asyncio.run(tail()):,} events after the snapshots", flush=True)
    with sqlite3.connect(str(log_path) + ".leases") as conn:
        conn.execute("DELETE FROM leases WHERE name LIKE 'pm-%'")  # no leader leases left over
    with sqlite3.connect(log_path) as conn:
        snapshots = conn.execute("SELECT stream, version, length(snapshot) FROM snapshots").fetchall()
    aggregates = 0
    for stream, version, size in snapshots:
        if stream.startswith(("projection-", "process-")):
            print(f"  snapshot {stream}: at {version:,}, {size / 2**20:.1f} MiB", flush=True)
        else:
            aggregates += 1
    print(f"  and {aggregates} snapshots of aggregates (the command side's)", flush=True)
    bare = root / "bare" / "events.sqlite"
    copy_log(log_path, bare)
    with sqlite3.connect(bare) as conn:
        conn.execute("DELETE FROM snapshots")
    conn.close()
    return log_path, bare, agent_state, head_of(log_path)


# -- the same on etcd ------------------------------------------------------------------------------

ETCD_PREFIX = "/v1"
ETCD_OPTIONS: dict[str, Any] = {"prefix": ETCD_PREFIX, "max_txn_ops": MAX_TXN_OPS, "max_txn_bytes": 6 << 20}
# Events per append while populating: ~3.5 etcd operations an event (the event, its stream
# key, one or two slice keys) plus 2 per stream, under the member's --max-txn-ops of 4,096.
ETCD_FLUSH_AT = 800


class EtcdServer:
    """One etcd member, started as tests/support/etcd.py starts it (data on /dev/shm, the
    test fixture's --max-txn-ops and --max-request-bytes), with a quota of 8 GiB instead of
    2: each run gets a fresh copy of a data dir, always on the same two ports."""

    def __init__(self) -> None:
        self.client_port, self.peer_port = free_port(), free_port()
        self.member: EtcdMember | None = None

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.client_port}{ETCD_PREFIX}"

    def store(self) -> EtcdEventStore:
        return EtcdEventStore([f"127.0.0.1:{self.client_port}"], **ETCD_OPTIONS)

    def start(self, data_dir: Path) -> None:
        self.member = EtcdMember("bench", data_dir, self.client_port, self.peer_port,
                                 f"bench=http://127.0.0.1:{self.peer_port}",
                                 extra_args=["--quota-backend-bytes", str(8 << 30)])
        self.member.start()
        self.member.wait_ready(120)

    def cpu(self) -> float:
        assert self.member is not None and self.member.process is not None
        return cpu_seconds(self.member.process.pid)

    def stop(self) -> None:
        """SIGTERM (a clean stop: its data dir is copied next)."""
        if self.member is None or self.member.process is None:
            return
        process = self.member.process
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.member = None


def etcd_targets(server: EtcdServer) -> tuple[int, dict[str, int]]:
    """The head, and per process manager the newest position of an event of a type it
    follows (read from the whole log: etcd has no index by type)."""
    async def scan() -> tuple[int, dict[str, int]]:
        store = server.store()
        head = await store.head()
        newest: dict[str, int] = {}
        after = 0
        while after < head:
            records = await store.read_all(after, limit=10_000)
            if not records:
                break
            for record in records:
                newest[record.type] = record.position
            after = records[-1].position
        await store.close()
        targets = {}
        for name, types in (await interests(server.store())).items():
            targets[name] = head if types is None else max((newest.get(t, 0) for t in types), default=0)
        return head, targets

    return asyncio.run(scan())


async def etcd_clear(server: EtcdServer, *prefixes: str) -> None:
    """Delete every key under the log's prefix + each of ``prefixes``."""
    store = server.store()
    for prefix in prefixes:
        start = store.prefix + prefix.encode()
        await store.client.delete(start, prefix_end(start))
    await store.close()


def prepare_etcd(root: Path, server: EtcdServer, vms: int, hosts: int) -> tuple[Path, Path, Path, int,
                                                                                  dict[str, int]]:
    """The etcd data dir with snapshots, the same without, the measured agent's state dir,
    the head and the process managers' targets (as ``prepare``, on etcd)."""
    made = root / "made"
    made.mkdir(parents=True)
    server.start(made / "etcd")
    began, cpu = time.perf_counter(), server.cpu()

    async def write() -> tuple[Log, Population, int]:
        store = server.store()
        log, population = await populate(store, leases_for(store), vms, hosts, ETCD_FLUSH_AT)
        size = int((await store.client.status()).dbSize)
        await store.close()
        return log, population, size

    log, population, size = asyncio.run(write())
    print(f"log: {log.written:,} events of {vms:,} VMs on {hosts:,} hosts written to etcd in "
          f"{time.perf_counter() - began:.1f} s (etcd {server.cpu() - cpu:.1f} CPU-s; db {size / 2**20:.0f} MiB)",
          flush=True)
    agent_state = made / "agent"
    running = agent_host(log, population, agent_state)
    first_starts(made / "first", server.url, agent_state, lambda: etcd_targets(server)[0],
                 lambda: etcd_targets(server)[1])

    async def tail() -> int:
        log.store = server.store()
        log.versions = {}
        log.ask_versions = True  # streams the first starts may have moved (the agent's host)
        return await write_tail(log, population, running, vms, hosts)

    print(f"tail: {asyncio.run(tail()):,} events after the snapshots", flush=True)
    asyncio.run(etcd_clear(server, "/leases/pm-"))  # no leader leases left over

    async def snapshots() -> None:
        store = server.store()
        start = store.prefix + b"/snapshots/"
        found = await store.client.range(start, prefix_end(start), keys_only=True)
        aggregates = 0
        for kv in found.kvs:
            stream = kv.key[len(start):].decode()
            if stream.startswith(("projection-", "process-")):
                snapshot = await store.load_snapshot(stream)
                assert snapshot is not None
                print(f"  snapshot {stream}: at {snapshot.version:,}, {len(snapshot.state) / 2**20:.1f} MiB",
                      flush=True)
            else:
                aggregates += 1
        print(f"  and {aggregates} snapshots of aggregates (the command side's)", flush=True)
        await store.close()

    asyncio.run(snapshots())
    head, targets = etcd_targets(server)
    server.stop()
    bare = root / "bare" / "etcd"
    shutil.copytree(made / "etcd", bare)
    server.start(bare)
    asyncio.run(etcd_clear(server, "/snapshots/", "/snapshot-chunks/"))
    server.stop()
    return made / "etcd", bare, agent_state, head, targets


Row = tuple[str, str, str, float, float, float | None, float, float | None]


def report(name: str, label: str, backend: str, results: list[Started]) -> Row:
    ready = statistics.median(r.ready for r in results)
    cpu = statistics.median(r.cpu for r in results)
    read = statistics.median(r.read for r in results)
    servers = [r.server_cpu for r in results if r.server_cpu is not None]
    firsts_known = [r.first for r in results if r.first is not None]
    return (backend, name, label, ready, cpu, statistics.median(servers) if servers else None, read,
            statistics.median(firsts_known) if firsts_known else None)


def show(name: str, label: str, run: int, result: Started) -> None:
    firsts = f", first {result.first:.2f} s" if result.first is not None else ""
    server = f", etcd CPU {result.server_cpu:.2f} s" if result.server_cpu is not None else ""
    print(f"  {name}, {label}, run {run + 1}: ready {result.ready:.2f} s (CPU {result.cpu:.2f} s{server})"
          f"{firsts}, {result.read:,} events read {result.detail or ''}", flush=True)


def bench_sqlite(root: Path, args: argparse.Namespace) -> list[Row]:
    with_snapshots, bare, agent_state, head = prepare(root, args.vms, args.hosts)
    targets = manager_targets(with_snapshots)
    print(f"log head {head:,}; process managers caught up at {targets}", flush=True)
    cases: dict[str, Callable[[str, Path], Started]] = {
        "gateway": lambda store, work: run_gateway(store, work, head),
        "processes": lambda store, work: run_processes(store, work, targets),
        "agent": lambda store, work: run_agent(store, work, work / "agent-state"),
    }
    rows = []
    for name, case in cases.items():
        if args.only and name not in args.only:
            continue
        for label, source in (("no snapshots", bare), ("snapshots", with_snapshots)):
            results = []
            for run in range(args.runs):
                work = root / "runs" / f"{name}-{label.replace(' ', '-')}-{run}"
                copy_log(source, work / "events.sqlite")
                shutil.copytree(agent_state, work / "agent-state")
                result = case(f"sqlite://{work / 'events.sqlite'}", work)
                results.append(result)
                show(name, label, run, result)
            rows.append(report(name, label, "SQLite", results))
    return rows


def bench_etcd(root: Path, args: argparse.Namespace) -> list[Row]:
    server = EtcdServer()
    try:
        with_snapshots, bare, agent_state, head, targets = prepare_etcd(root, server, args.vms, args.hosts)
        print(f"log head {head:,}; process managers caught up at {targets}", flush=True)
        cases: dict[str, Callable[[str, Path], Started]] = {
            "gateway": lambda store, work: run_gateway(store, work, head, server.cpu),
            "processes": lambda store, work: run_processes(store, work, targets, server.cpu),
            "agent": lambda store, work: run_agent(store, work, work / "agent-state", server.cpu),
        }
        rows = []
        for name, case in cases.items():
            if args.only and name not in args.only:
                continue
            for label, source in (("no snapshots", bare), ("snapshots", with_snapshots)):
                results = []
                for run in range(args.runs):
                    work = root / "runs" / f"{name}-{label.replace(' ', '-')}-{run}"
                    work.mkdir(parents=True)
                    shutil.copytree(source, work / "etcd")
                    shutil.copytree(agent_state, work / "agent-state")
                    server.start(work / "etcd")
                    try:
                        result = case(server.url, work)
                    finally:
                        server.stop()
                        shutil.rmtree(work / "etcd", ignore_errors=True)
                    results.append(result)
                    show(name, label, run, result)
                rows.append(report(name, label, "etcd", results))
        return rows
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=100_000)
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="5,000 VMs on 50 hosts, one run (a smoke test)")
    parser.add_argument("--keep", action="store_true", help="keep the logs in /tmp")
    parser.add_argument("--only", choices=("gateway", "processes", "agent"), action="append")
    parser.add_argument("--backend", choices=("sqlite", "etcd", "both"), default="both",
                        help="the log in a SQLite file, in a single etcd member on tmpfs, or both (default)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the daemons (finally blocks) when stopped
    if args.quick:
        args.vms, args.hosts, args.runs = 5000, 50, 1
    # An installed ucloud has its bytecode compiled (pip does it); an editable checkout under
    # PYTHONDONTWRITEBYTECODE=1 (as on the machine of docs/performance.md) would compile
    # every module at every start instead, about 0.2 CPU-s of each daemon's start.
    packages = [str(ROOT / p) for p in PACKAGES] + [str(ROOT / "tests")]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *packages], check=True, stdout=subprocess.DEVNULL)
    rows: list[Row] = []
    roots = []
    try:
        if args.backend in ("sqlite", "both"):
            roots.append(Path(tempfile.mkdtemp(prefix="ucloud-startup-", dir="/tmp")))
            rows += bench_sqlite(roots[-1], args)
        if args.backend in ("etcd", "both"):
            # etcd's data dirs on tmpfs, as tests/support/etcd.py has them.
            roots.append(Path(tempfile.mkdtemp(prefix="ucloud-startup-etcd-", dir=_tmp_root())))
            rows += bench_etcd(roots[-1], args)
        print()
        print("| log in | daemon | log | ready: wall s (median) | CPU s | etcd CPU s | events read | events/CPU-s "
              "| first sign |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for backend, name, label, ready, cpu, server, read, first in rows:
            rate = f"{read / cpu:,.0f}" if cpu else "-"
            print(f"| {backend} | {name} | {label} | {ready:.2f} | {cpu:.2f} | "
                  f"{'-' if server is None else f'{server:.2f}'} | {read:,.0f} | {rate} | "
                  f"{'-' if first is None else f'{first:.2f}'} |")
    finally:
        for root in roots:
            if args.keep:
                print(f"kept: {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
