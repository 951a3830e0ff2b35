"""Scheduler throughput at scale: 10,000 VMs onto 1,000 hosts.

    .venv/bin/python -m tests.bench.run scheduler                      # through the runner
    .venv/bin/python -m tests.bench.bench_scheduler [--backend etcd|sqlite]... [--schedulers N]...
                                                    [--hosts 1000] [--vms 10000] [--in-flight 64]
                                                    [--rate N] [--max-txn-ops 1024]

For every backend (etcd: one real member, data on tmpfs, the store at max_txn_ops=1024
unless --max-txn-ops says otherwise; SQLite: a file on tmpfs) and
every number of scheduler instances (default 1 and 2): registers the hosts (varied
sizes) through CommandService.register_host (and marks them up), starts the real Scheduler
(processes/scheduler.py), each instance in a process of its own with its own store
connection, then creates the VMs (varied sizes) through CommandService.create_vm from
this process with a bounded number in flight, and waits until every VM is scheduled or
unschedulable. No host agent runs: placement is what is measured, and placement needs
none (the "fake hypervisor" of the brief is simply absent).

Figures, from the log itself (EventRecord.time of each event):
- placements/s: VMs decided (scheduled or unschedulable) / (last decision - first create)
- create -> scheduled latency p50/p99: vm.scheduled time - vm.requested time per VM

At the end the log is folded into the read models and checked: every VM decided, no
host booked beyond its capacity x overcommit, each host's claims exactly the VMs placed
on it, and no VM refused that would fit on a host now (nothing is deleted, so hosts only
fill up). A violation fails the benchmark (exit status 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import random
import resource
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from tests.support.etcd import etcd_cluster
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.domain import vm as vm_domain
from ucloud.domain.host import fits
from ucloud.eventstore.url import open_store
from ucloud.processes.scheduler import Scheduler
from ucloud.projections.runner import ProjectionRunner
from ucloud.projections.views import ReadModels

ADMIN = Actor("root", "ucloud-admin", is_admin=True)
GiB = 1024**3
SEED = 20240611

# (cores, RAM GiB, disk GiB): a mix of small and large machines.
HOST_SIZES = [(4, 16, 250), (8, 32, 500), (16, 64, 1000), (32, 128, 2000)]
# (cores, RAM GiB, disk GiB) of a VM: mostly small, some large.
VM_SIZES = [(1, 1, 10), (1, 2, 20), (2, 4, 40), (4, 8, 80), (8, 16, 160), (16, 64, 200)]
VM_WEIGHTS = [30, 25, 20, 15, 8, 2]


def host_sizes(count: int) -> list[tuple[int, int, int]]:
    rng = random.Random(SEED)
    return [rng.choice(HOST_SIZES) for _ in range(count)]


def vm_sizes(count: int) -> list[tuple[int, int, int]]:
    rng = random.Random(SEED + 1)
    return rng.choices(VM_SIZES, VM_WEIGHTS, k=count)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def scheduler_process(url: str, instance: str, ready: Any, stop: Any, results: Any) -> None:
    """One scheduler instance in a process of its own (the way it runs in production).
    ``ready`` is set once it has folded the log as it was when it started; when ``stop``
    is set it puts its CPU seconds since then and its counters on ``results``."""

    async def run() -> None:
        store = open_store(url)
        try:
            scheduler = Scheduler(CommandService(store), instance=instance)
            head = await store.head()
            task = asyncio.create_task(scheduler.run())
            while scheduler.position < head and not task.done():  # noqa: ASYNC110 - a counter, no event to wait on
                await asyncio.sleep(0.05)
            began = cpu_seconds()
            ready.set()
            while not stop.is_set() and not task.done():  # noqa: ASYNC110 - a process-shared event
                await asyncio.sleep(0.1)
            results.put({"instance": instance, "cpu": cpu_seconds() - began, "placed": scheduler.placed,
                         "unschedulable": scheduler.unschedulable, "batches": scheduler.batches,
                         "fallbacks": scheduler.fallbacks})
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            await store.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


class Schedulers:
    """Scheduler instances in processes of their own, started and stopped by the benchmark."""

    def __init__(self, url: str, count: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.ready = [ctx.Event() for _ in range(count)]
        self.stop = ctx.Event()
        self.results: Any = ctx.Queue()
        self.processes = [
            ctx.Process(target=scheduler_process, args=(url, f"bench{i}", self.ready[i], self.stop, self.results),
                        daemon=True)
            for i in range(count)
        ]

    def __enter__(self) -> Schedulers:
        for process in self.processes:
            process.start()
        for process, ready in zip(self.processes, self.ready, strict=True):
            while not ready.wait(0.5):
                if not process.is_alive():
                    raise SystemExit(f"a scheduler process exited with {process.exitcode}")
        return self

    def collect(self) -> list[dict[str, Any]]:
        """Stop the instances; their CPU seconds and counters."""
        self.stop.set()
        return [self.results.get(timeout=30) for _ in self.processes]

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for process in self.processes:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()


@dataclass
class Figures:
    backend: str
    schedulers: int
    vms: int
    placed: int
    unschedulable: int
    create_seconds: float
    wall_seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    instances: list[dict[str, Any]]
    load: float  # 1-minute load average when the case started

    @property
    def rate(self) -> float:
        return self.vms / self.wall_seconds

    def line(self) -> str:
        cpu = sum(i["cpu"] for i in self.instances)
        per_instance = "; ".join(
            f"{i['instance']}: {i['placed']} placed, {i['batches']} runs, {i['fallbacks']} fallbacks, "
            f"{i['cpu']:.1f} CPU s" for i in self.instances)
        return (f"{self.backend:6} schedulers={self.schedulers}: {self.vms} VMs ({self.placed} scheduled, "
                f"{self.unschedulable} unschedulable) in {self.wall_seconds:.1f}s = {self.rate:,.0f} placements/s "
                f"(creates alone: {self.create_seconds:.1f}s = {self.vms / self.create_seconds:,.0f}/s); "
                f"create->scheduled p50 {self.p50_ms:.0f} ms, p99 {self.p99_ms:.0f} ms, max {self.max_ms:.0f} ms; "
                f"scheduler CPU {cpu:.1f}s = {self.vms / cpu:,.0f} decisions per CPU second [{per_instance}]; "
                f"load average at start {self.load:.1f}")


async def register_hosts(commands: CommandService, count: int) -> list[UUID]:
    sizes = host_sizes(count)
    outcomes = await asyncio.gather(*(
        commands.register_host(ADMIN, f"host{i:04d}", cores, f"{ram}GiB", f"{disk}GiB")
        for i, (cores, ram, disk) in enumerate(sizes)
    ))
    # Only up hosts take placements: each comes up as its agent would (no failure detector
    # runs here, so no lease has to be held).
    await asyncio.gather(*(commands.mark_host_up(ADMIN, o.result, 1, 3.0) for o in outcomes))
    return [o.result for o in outcomes]


async def create_vms(commands: CommandService, count: int, in_flight: int, rate: float = 0) -> list[UUID]:
    """``rate``: at most this many creates per second (0: as fast as ``in_flight`` allows)."""
    sizes = vm_sizes(count)
    gate = asyncio.Semaphore(in_flight)
    owners = [Actor(f"user{i}") for i in range(50)]
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def create(i: int) -> UUID:
        cores, ram, disk = sizes[i]
        if rate:
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
        async with gate:
            outcome = await commands.create_vm(owners[i % len(owners)], name=f"vm{i}", cores=cores,
                                               ram=f"{ram}GiB", disk=f"{disk}GiB", image="tiny")
        return outcome.result

    return list(await asyncio.gather(*(create(i) for i in range(count))))


async def wait_until_decided(commands: CommandService, models: ReadModels, runner: ProjectionRunner,
                             vm_ids: list[UUID], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        await runner.catch_up()
        waiting = sum(1 for v in vm_ids if models.vms.get(v).status is vm_domain.Status.REQUESTED)
        if waiting == 0:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{waiting} VMs still waiting for a host after {timeout}s")
        await asyncio.sleep(0.2)


def check_no_overbooking(models: ReadModels, commands: CommandService, vm_ids: list[UUID]) -> list[str]:
    problems = []
    overcommit = commands.overcommit
    placed_on: dict[UUID, set[UUID]] = {}
    for vm_id in vm_ids:
        vm = models.vms.get(vm_id)
        if vm.status is vm_domain.Status.SCHEDULED:
            assert vm.host_id is not None
            placed_on.setdefault(vm.host_id, set()).add(vm_id)
        elif vm.status is not vm_domain.Status.UNSCHEDULABLE:
            problems.append(f"VM {vm_id} is {vm.status}")
        elif not vm.reason:
            problems.append(f"VM {vm_id} is unschedulable without a reason")
    # Nothing is deleted here, so hosts only fill up: a VM refused then must not fit now.
    for vm_id in vm_ids:
        vm = models.vms.get(vm_id)
        if vm.status is vm_domain.Status.UNSCHEDULABLE:
            room = [h.hostname for h in models.hosts.by_id.values()
                    if fits(h, vm.cores, vm.ram, vm.disk, overcommit) is None]
            if room:
                problems.append(f"VM {vm_id} was refused but fits on {', '.join(room[:3])}")
    for host in models.hosts.by_id.values():
        if host.used_cores > host.cores * overcommit.cpu:
            problems.append(f"{host.hostname}: {host.used_cores} cores booked of {host.cores}x{overcommit.cpu}")
        if host.used_ram > host.ram * overcommit.ram:
            problems.append(f"{host.hostname}: {host.used_ram} B RAM booked of {host.ram}x{overcommit.ram}")
        if host.used_disk > host.disk * overcommit.disk:
            problems.append(f"{host.hostname}: {host.used_disk} B disk booked of {host.disk}x{overcommit.disk}")
        if set(host.claims) != placed_on.get(host.id, set()):
            problems.append(f"{host.hostname}: claims {len(host.claims)} VMs, "
                            f"{len(placed_on.get(host.id, set()))} VMs are placed on it")
    return problems


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def measure(url: str, backend: str, scheduler_count: int, hosts: int, vms: int, in_flight: int,
                  rate: float) -> Figures:
    store = open_store(url)
    commands = CommandService(store)
    try:
        await register_hosts(commands, hosts)
        load = os.getloadavg()[0]
        with Schedulers(url, scheduler_count) as instances:
            began = datetime.now().astimezone()
            t0 = time.monotonic()
            vm_ids = await create_vms(commands, vms, in_flight, rate)
            create_seconds = time.monotonic() - t0
            models = ReadModels()
            runner = ProjectionRunner(store, commands.codec, models.all())
            await wait_until_decided(commands, models, runner, vm_ids, timeout=1800)
            counters = instances.collect()
        await runner.catch_up()
        problems = check_no_overbooking(models, commands, vm_ids)
        if problems:
            print("\n".join(problems[:20]), file=sys.stderr)
            raise SystemExit(f"{backend} schedulers={scheduler_count}: {len(problems)} correctness problems")
        requested: dict[UUID, datetime] = {}
        decided: dict[UUID, datetime] = {}
        latencies: list[float] = []
        wanted = {"vm.requested", "vm.scheduled", "vm.unschedulable"}
        position = 0
        head = await store.head()
        while position < head:
            batch = await store.read_all(position, limit=5000, types=wanted)
            if not batch:
                break
            for record in batch:
                vm_id = UUID(record.stream.split("-", 1)[1])
                if record.type == "vm.requested":
                    requested[vm_id] = record.time
                else:
                    # The first decision counts (an unschedulable VM may be placed later).
                    if vm_id not in decided:
                        decided[vm_id] = record.time
                    if record.type == "vm.scheduled":
                        latencies.append((record.time - requested[vm_id]).total_seconds())
            position = batch[-1].position
        last = max(decided.values())
        statuses = [models.vms.get(v).status for v in vm_ids]
        return Figures(
            backend=backend, schedulers=scheduler_count, vms=vms,
            placed=statuses.count(vm_domain.Status.SCHEDULED),
            unschedulable=statuses.count(vm_domain.Status.UNSCHEDULABLE),
            create_seconds=create_seconds, wall_seconds=(last - began).total_seconds(),
            p50_ms=statistics.median(latencies) * 1000, p99_ms=percentile(latencies, 0.99) * 1000,
            max_ms=max(latencies) * 1000, instances=sorted(counters, key=lambda c: c["instance"]), load=load,
        )
    finally:
        await store.close()


def run_case(backend: str, scheduler_count: int, hosts: int, vms: int, in_flight: int,
             max_txn_ops: int = 1024, rate: float = 0) -> Figures:
    if backend == "etcd":
        with etcd_cluster(1) as cluster:
            url = f"etcd://{cluster.endpoints[0]}/bench-{uuid.uuid4().hex[:8]}/v1?max_txn_ops={max_txn_ops}"
            return asyncio.run(measure(url, backend, scheduler_count, hosts, vms, in_flight, rate))
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        url = f"sqlite://{Path(tmp) / 'log.sqlite'}"
        return asyncio.run(measure(url, backend, scheduler_count, hosts, vms, in_flight, rate))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", action="append", choices=["etcd", "sqlite"])
    parser.add_argument("--schedulers", action="append", type=int)
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--vms", type=int, default=10_000)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--rate", type=float, default=0,
                        help="creates per second at most (default: as fast as --in-flight allows); "
                             "for latency below saturation")
    parser.add_argument("--max-txn-ops", type=int, default=1024,
                        help="the etcd store's operations per transaction (the etcd member allows 4096; "
                             "the store's own default is etcd's default, 128)")
    parser.add_argument("--quick", action="store_true", help="100 hosts, 1,000 VMs (a smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.hosts, args.vms = 100, 1000
    for backend in args.backend or ["etcd", "sqlite"]:
        for count in args.schedulers or [1, 2]:
            figures = run_case(backend, count, args.hosts, args.vms, args.in_flight, args.max_txn_ops, args.rate)
            print(figures.line(), flush=True)


if __name__ == "__main__":
    main()
