"""Event store benchmarks: append throughput with group commit, and replay.

    .venv/bin/python -m tests.bench.bench_eventstore [--quick] [--only append|replay] [--json FILE]

append  etcd (one member, data on tmpfs), 1 KiB values. Raw etcd transactions through
        eventstore.etcd_client.EtcdClient (1 put per txn from 32 concurrent tasks; N puts
        per txn for N = 16 and 64, from 1 task and from 32 tasks), beside
        EtcdEventStore.append from 32 concurrent writers, one 1 KiB event per command,
        each writer to its own stream with optimistic concurrency (group commit).
        Each case runs three rounds; the median is reported.
replay  1,000,000 small VM-lifecycle events (JSON payloads like the domain's vm.*
        events) written with large batched appends (not timed), then timed: read_all in
        pages + envelope decode (inside read_all) + msgspec decode of the payload by type
        + apply to a dict state; and the same through subscribe() (a projection's
        catch-up). From SQLite and from etcd. The figure is events per
        CPU second of this process (all its threads): what one core does, whatever
        else runs on the machine; events/s of wall time is shown beside it.

        A last case replays 1,000,000 events of the real domain through
        ProjectionRunner.catch_up into the gateway's read models (the views fold with
        the domain's own evolve): the figure for how fast a gateway really catches up.

--quick runs a tenth of the work (for a smoke test, not for the figures).
Figures and the machine they came from: docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from tests.support.etcd import MAX_TXN_OPS, etcd_cluster
from ucloud.eventstore.etcd import EtcdEventStore
from ucloud.eventstore.etcd_client import EtcdClient, op_put
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.records import NewEvent, StreamAppend
from ucloud.eventstore.sqlite import SqliteEventStore

KIB = os.urandom(512).hex().encode()  # 1 KiB, incompressible
WRITERS = 32
ROUNDS = 3


class Result(msgspec.Struct):
    benchmark: str
    case: str
    value: float
    unit: str
    detail: str = ""


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def median_of(rounds: int, run: Callable[[], Awaitable[tuple[float, str]]]) -> tuple[float, str]:
    """The median of ``rounds`` runs, with every run's figure in the detail."""
    figures = []
    detail = ""
    for _ in range(rounds):
        value, detail = await run()
        figures.append(value)
    spread = ", ".join(f"{f:,.0f}" for f in figures)
    return statistics.median(figures), f"{detail}; rounds: {spread}".lstrip("; ")


# -- append ---------------------------------------------------------------------------


async def raw_txns(endpoints: list[str], puts_per_txn: int, tasks: int, values: int) -> tuple[float, str]:
    client = EtcdClient(endpoints)
    run = uuid.uuid4().hex[:8].encode()
    txns_per_task = max(1, values // puts_per_txn // tasks)

    async def worker(w: int) -> None:
        for i in range(txns_per_task):
            ops = [op_put(b"/raw/%s/%d/%d/%d" % (run, w, i, j), KIB) for j in range(puts_per_txn)]
            await client.txn([], ops)

    await worker(-1)  # connect
    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(tasks)))
    elapsed = time.perf_counter() - start
    await client.close()
    return txns_per_task * tasks * puts_per_txn / elapsed, f"{txns_per_task * tasks} txns"


async def group_commit(endpoints: list[str], appends_per_writer: int) -> tuple[float, str]:
    store = EtcdEventStore(endpoints, prefix=f"/bench-{uuid.uuid4().hex[:8]}/v1", max_txn_ops=MAX_TXN_OPS)

    async def writer(w: int) -> None:
        for version in range(appends_per_writer):
            await store.append(StreamAppend(f"vm-{w}", version, [NewEvent(type="vm.bench", data=KIB)]))

    await store.append(StreamAppend("warm-up", 0, [NewEvent(type="vm.bench", data=KIB)]))
    batches, requests = store.committer.batches, store.committer.requests
    start = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(WRITERS)))
    elapsed = time.perf_counter() - start
    batches, requests = store.committer.batches - batches, store.committer.requests - requests
    await store.close()
    return WRITERS * appends_per_writer / elapsed, f"{requests / batches:.1f} appends per transaction"


async def bench_append(quick: bool) -> list[Result]:
    scale = 10 if quick else 1
    results = []
    with etcd_cluster(1) as cluster:
        endpoints = cluster.endpoints
        cases: list[tuple[str, str, Callable[[], Awaitable[tuple[float, str]]]]] = [
            ("raw etcd txn, 1 put, 32 concurrent tasks", "values/s",
             lambda: raw_txns(endpoints, 1, 32, 16_000 // scale)),
            ("raw etcd txn, 16 puts, 1 task", "values/s", lambda: raw_txns(endpoints, 16, 1, 32_000 // scale)),
            ("raw etcd txn, 16 puts, 32 concurrent tasks", "values/s",
             lambda: raw_txns(endpoints, 16, 32, 64_000 // scale)),
            ("raw etcd txn, 64 puts, 1 task", "values/s", lambda: raw_txns(endpoints, 64, 1, 64_000 // scale)),
            ("raw etcd txn, 64 puts, 32 concurrent tasks", "values/s",
             lambda: raw_txns(endpoints, 64, 32, 128_000 // scale)),
            ("EtcdEventStore.append, 32 writers, 1 event each (group commit)", "events/s",
             lambda: group_commit(endpoints, 1000 // scale)),
        ]
        for case, unit, run in cases:
            value, detail = await median_of(ROUNDS, run)
            results.append(Result("append", case, value, unit, detail))
            print(f"  {case}: {value:,.0f} {unit}", file=sys.stderr)
    store = results[-1].value
    single = results[0].value
    ceiling = max(r.value for r in results[1:-1])
    results.append(Result("append", "group commit / raw 1-put txns", store / single, "x"))
    results.append(Result("append", "group commit / best batched raw txns", store / ceiling, "x"))
    return results


# -- replay ---------------------------------------------------------------------------


class VmRequested(msgspec.Struct, frozen=True):
    vm_id: uuid.UUID
    owner: str
    name: str
    cores: int
    ram: int
    disk: int
    image: str
    ssh_keys: tuple[str, ...] = ()


class VmScheduled(msgspec.Struct, frozen=True):
    vm_id: uuid.UUID
    host_id: uuid.UUID


class VmStarted(msgspec.Struct, frozen=True):
    vm_id: uuid.UUID
    host_id: uuid.UUID
    accelerator: str = ""


class VmUsage(msgspec.Struct, frozen=True):
    vm_id: uuid.UUID
    cpu_seconds: float
    rx_bytes: int
    tx_bytes: int


class VmStopped(msgspec.Struct, frozen=True):
    vm_id: uuid.UUID
    host_id: uuid.UUID
    reason: str = "stopped by request"


DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    "vm.requested": msgspec.json.Decoder(VmRequested),
    "vm.scheduled": msgspec.json.Decoder(VmScheduled),
    "vm.started": msgspec.json.Decoder(VmStarted),
    "vm.usage_reported": msgspec.json.Decoder(VmUsage),
    "vm.stopped": msgspec.json.Decoder(VmStopped),
}
ENCODE = msgspec.json.Encoder().encode
EVENTS_PER_VM = 10  # requested, scheduled, started, 6 usage reports, stopped


def vm_life(k: int) -> list[NewEvent]:
    vm, host = uuid.UUID(int=k + 1), uuid.UUID(int=(k % 97) + 1 << 64)
    payloads: list[tuple[str, msgspec.Struct]] = [
        ("vm.requested", VmRequested(vm_id=vm, owner=f"user{k % 1000}", name=f"vm{k}", cores=2,
                                     ram=2 << 30, disk=20 << 30, image="debian-12",
                                     ssh_keys=(f"ssh-ed25519 AAAAC3Nza{k:020d} user{k % 1000}",))),
        ("vm.scheduled", VmScheduled(vm_id=vm, host_id=host)),
        ("vm.started", VmStarted(vm_id=vm, host_id=host, accelerator="tcg")),
        *(("vm.usage_reported", VmUsage(vm_id=vm, cpu_seconds=12.5 * i, rx_bytes=1500 * i, tx_bytes=900 * i))
          for i in range(1, 7)),
        ("vm.stopped", VmStopped(vm_id=vm, host_id=host)),
    ]
    return [NewEvent(type=kind, data=ENCODE(payload), actor=f"user{k % 1000}") for kind, payload in payloads]


def apply(state: dict[uuid.UUID, dict[str, Any]], kind: str, event: Any) -> None:
    if kind == "vm.requested":
        state[event.vm_id] = {"owner": event.owner, "cores": event.cores, "ram": event.ram,
                              "status": "requested", "host": None, "cpu": 0.0, "rx": 0, "tx": 0}
        return
    vm = state[event.vm_id]
    if kind == "vm.scheduled":
        vm["host"], vm["status"] = event.host_id, "scheduled"
    elif kind == "vm.started":
        vm["status"] = "running"
    elif kind == "vm.usage_reported":
        vm["cpu"], vm["rx"], vm["tx"] = event.cpu_seconds, event.rx_bytes, event.tx_bytes
    elif kind == "vm.stopped":
        vm["status"] = "stopped"


async def populate(store: EventStore, events: int, vms_per_append: int) -> float:
    """Write ``events`` in large appends (several streams each); return seconds taken."""
    start = time.perf_counter()
    vms = events // EVENTS_PER_VM
    pending: list[Awaitable[list[int]]] = []
    for first in range(0, vms, vms_per_append):
        appends = [StreamAppend(f"vm-{k}", 0, vm_life(k)) for k in range(first, min(vms, first + vms_per_append))]
        pending.append(store.append(*appends))
        if len(pending) == 8:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    return time.perf_counter() - start


async def replay(store: EventStore, page: int) -> tuple[int, float, float, int]:
    state: dict[uuid.UUID, dict[str, Any]] = {}
    decoders = DECODERS
    position = count = 0
    cpu, start = cpu_seconds(), time.perf_counter()
    while True:
        records = await store.read_all(position, limit=page)
        if not records:
            break
        for record in records:
            kind = record.type
            apply(state, kind, decoders[kind].decode(record.data))
        position = records[-1].position
        count += len(records)
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    running = sum(1 for vm in state.values() if vm["status"] == "stopped")
    return count, elapsed, cpu, running


async def replay_subscribed(store: EventStore, page: int) -> tuple[int, float, float, int]:
    """The same replay through subscribe(): how a projection catches up (on etcd it
    reads the next window while this one is applied)."""
    state: dict[uuid.UUID, dict[str, Any]] = {}
    decoders = DECODERS
    head = await store.head()
    count = 0
    cpu, start = cpu_seconds(), time.perf_counter()
    async for record in store.subscribe(0, batch=page, idle_timeout=1.0):
        kind = record.type
        apply(state, kind, decoders[kind].decode(record.data))
        count += 1
        if record.position == head:
            break
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    stopped = sum(1 for vm in state.values() if vm["status"] == "stopped")
    return count, elapsed, cpu, stopped


async def replay_case(name: str, open_store: Callable[[], EventStore], events: int, page: int,
                      subscribed: bool = False) -> Result:
    store = open_store()
    try:
        await store.head()  # connect, open the file: not part of the replay
        count, elapsed, cpu, stopped = await (replay_subscribed if subscribed else replay)(store, page)
    finally:
        await store.close()
    assert count == events and stopped == events // EVENTS_PER_VM, (count, stopped)
    how = f"subscribe(batch={page})" if subscribed else f"read_all pages of {page}"
    print(f"  replay {name}, {how}: {count / elapsed:,.0f} events/s, "
          f"{count / cpu:,.0f} per CPU second", file=sys.stderr)
    return Result("replay", f"{name}: {how} + decode + apply", count / cpu,
                  "events/CPU-s", f"{count / elapsed:,.0f} events/s wall; {count:,} events in "
                  f"{elapsed:.2f}s wall, {cpu:.2f}s CPU")


def real_vm_life(k: int, codec: Any) -> list[NewEvent]:
    """Ten events of the real domain for one VM, as the command side writes them."""
    from ucloud.domain import vm as d

    vm, host = uuid.UUID(int=k + 1), uuid.UUID(int=(k % 97) + 1 << 64)
    events = [
        d.VmRequested(vm_id=vm, owner=f"user{k % 1000}", name=f"vm{k}", cores=2, ram=2 << 30, disk=20 << 30,
                      image="debian-12", ssh_keys=("laptop",)),
        d.VmScheduled(vm_id=vm, host_id=host), d.VmStarted(vm_id=vm, host_id=host, accelerator="tcg"),
        d.VmRebootRequested(vm_id=vm), d.VmRebooted(vm_id=vm, host_id=host),
        d.VmStopRequested(vm_id=vm), d.VmStopped(vm_id=vm, host_id=host),
        d.VmStartRequested(vm_id=vm), d.VmStarted(vm_id=vm, host_id=host, accelerator="tcg"),
        d.VmStopRequested(vm_id=vm),
    ]
    out = []
    for event in events:
        tag, schema, data = codec.encode(event)
        out.append(NewEvent(type=tag, schema=schema, data=data, actor=f"user{k % 1000}@ucloud"))
    return out


async def replay_read_models(path: Path, events: int) -> Result:
    """The real catch-up path: ProjectionRunner + the gateway's read models, whose
    views fold events with the domain's own evolve."""
    from ucloud.domain import vm as d
    from ucloud.domain.catalogue import build_codec
    from ucloud.projections.runner import ProjectionRunner
    from ucloud.projections.views import ReadModels

    codec = build_codec()
    store = SqliteEventStore(path)
    vms = events // EVENTS_PER_VM
    pending: list[Awaitable[list[int]]] = []
    for first in range(0, vms, 100):
        pending.append(store.append(*[StreamAppend(f"vm-{k}", 0, real_vm_life(k, codec))
                                      for k in range(first, min(vms, first + 100))]))
        if len(pending) == 8:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    await store.close()
    store = SqliteEventStore(path)
    try:
        await store.head()
        models = ReadModels()
        runner = ProjectionRunner(store, codec, models.all(), name="bench")
        cpu, start = cpu_seconds(), time.perf_counter()
        await runner.catch_up()
        elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    finally:
        await store.close()
    stopping = sum(1 for row in models.vms.by_id.values() if row.vm.status is d.Status.STOPPING)
    assert runner.position == events and stopping == vms, (runner.position, stopping)
    print(f"  replay SQLite into the read models: {events / elapsed:,.0f} events/s, "
          f"{events / cpu:,.0f} per CPU second", file=sys.stderr)
    return Result("replay", "SQLite: ProjectionRunner.catch_up into the gateway's read models (domain evolve)",
                  events / cpu, "events/CPU-s", f"{events / elapsed:,.0f} events/s wall; {events:,} events in "
                  f"{elapsed:.2f}s wall, {cpu:.2f}s CPU")


async def bench_replay(quick: bool) -> list[Result]:
    events = 100_000 if quick else 1_000_000
    results = []
    with tempfile.TemporaryDirectory(prefix="ucloud-bench-") as tmp:
        path = Path(tmp) / "log.sqlite"
        store = SqliteEventStore(path)
        took = await populate(store, events, vms_per_append=100)
        await store.close()
        print(f"  populated SQLite with {events:,} events in {took:.1f}s", file=sys.stderr)
        for page in (1000, 10_000):
            results.append(await replay_case("SQLite", lambda: SqliteEventStore(path), events, page))
        results.append(await replay_case("SQLite", lambda: SqliteEventStore(path), events, 1000, True))
        results.append(await replay_read_models(Path(tmp) / "domain.sqlite", events))
    # The etcd log of 1M small events is ~1 GB in bbolt: raise the 2 GB default quota.
    with etcd_cluster(1, ["--quota-backend-bytes", str(8 << 30)]) as cluster:
        prefix = "/bench-replay/v1"
        options = {"prefix": prefix, "max_txn_ops": MAX_TXN_OPS, "max_txn_bytes": 6 << 20}
        store = EtcdEventStore(cluster.endpoints, **options)  # type: ignore[arg-type]
        # 200 events per append: 2 ops per event + 2 per stream, well under 4096 ops.
        took = await populate(store, events, vms_per_append=20)
        db_size = (await store.client.status()).dbSize
        await store.close()
        print(f"  populated etcd with {events:,} events in {took:.1f}s; etcd db {db_size / 2**20:,.0f} MiB",
              file=sys.stderr)
        results.append(Result("replay", f"etcd database size after {events:,} events", db_size / 2**20, "MiB",
                              f"{db_size / events:,.0f} bytes per event, uncompacted, not defragmented"))
        for page in (1000, 10_000):
            def open_etcd(page: int = page) -> EventStore:
                store = EtcdEventStore(cluster.endpoints, **options)  # type: ignore[arg-type]
                store.page = page
                return store

            results.append(await replay_case("etcd", open_etcd, events, page))
        results.append(await replay_case("etcd", open_etcd, events, 1000, True))
    return results


# -- report ---------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as meminfo:
        memory_kib = int(meminfo.readline().split()[1])
    return {"nproc": os.cpu_count(), "memory_gib": round(memory_kib / 2**20, 1), "cpu": model,
            "python": platform.python_version(), "kernel": platform.release(),
            "load_average_at_start": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tenth of the work: a smoke test")
    parser.add_argument("--only", choices=["append", "replay"], help="run one benchmark")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    results: list[Result] = []
    info = machine()
    if args.only in (None, "append"):
        print("append throughput (etcd on tmpfs) ...", file=sys.stderr)
        results += asyncio.run(bench_append(args.quick))
    if args.only in (None, "replay"):
        print("replay ...", file=sys.stderr)
        results += asyncio.run(bench_replay(args.quick))
    info["load_average_at_end"] = os.getloadavg()
    print(f"\nmachine: {info['nproc']} CPUs ({info['cpu']}), {info['memory_gib']} GiB, Python {info['python']}, "
          f"load average {info['load_average_at_start'][0]:.1f} at start, {info['load_average_at_end'][0]:.1f} at end")
    width = max(len(r.case) for r in results)
    print(f"{'benchmark':9} {'case':{width}} {'value':>12}  {'unit':12} detail")
    for r in results:
        value = f"{r.value:,.2f}" if r.unit == "x" else f"{r.value:,.0f}"
        print(f"{r.benchmark:9} {r.case:{width}} {value:>12}  {r.unit:12} {r.detail}")
    if args.json:
        document = {"machine": info, "quick": args.quick, "results": msgspec.to_builtins(results)}
        args.json.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
