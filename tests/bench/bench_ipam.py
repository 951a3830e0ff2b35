"""IPAM allocations per second under concurrency.

    .venv/bin/python -m tests.bench.run ipam
    .venv/bin/python -m tests.bench.bench_ipam [--backend etcd|sqlite]... [--allocators N]... [--nics 1000]

For every backend (etcd: one real member, data on tmpfs; SQLite: a file on tmpfs) and
every number of allocators (default 1 and 2, each with its own tracking, all acting on
every event: the claim streams keep them apart): 10 networks are created and allocated,
then VMs with a NIC on each of 5 networks are created while no allocator runs (``--nics``
NICs in all, 64 creations in flight), then the allocators start together and the time
until every NIC has its MAC is measured (allocations/s = NICs / that time). At the end
every MAC must be distinct and held by its NIC in its claim stream, else exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from pathlib import Path

from tests.support.etcd import etcd_cluster
from ucloud.commands.aggregates import CLAIM, VM
from ucloud.commands.networks import NetworkCommands
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.domain import network as net
from ucloud.domain import vm as vm_domain
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.records import Tracking
from ucloud.eventstore.url import open_store
from ucloud.processes.ipam import IpamAllocator

ALICE = Actor("alice")


async def run(store: EventStore, allocators: int, nics: int) -> tuple[float, bool]:
    commands = CommandService(store)
    networks = NetworkCommands(commands.repository)
    names = [f"n{i}" for i in range(10)]
    first = IpamAllocator(store, commands.codec, consumer="bench-setup")
    setup = asyncio.create_task(first.run())
    for name in names:
        await networks.create_network(ALICE, name, "auto")
    while first.allocated < len(names):  # noqa: ASYNC110  (a counter of the allocator's, no event to wait on)
        await asyncio.sleep(0.05)
    setup.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await setup
    gate = asyncio.Semaphore(64)

    async def create(i: int) -> object:
        async with gate:
            return (await commands.create_vm(ALICE, name=f"v{i}", cores=1, ram="64MB", disk="1GB", image="tiny",
                                             networks=names[i % 2::2])).result
    vm_ids = await asyncio.gather(*(create(i) for i in range(nics // 5)))
    # The allocators start from the setup's position: they act on the NICs only.
    position = await store.tracked_position("bench-setup")
    instances = [IpamAllocator(store, commands.codec, consumer=f"bench-{i}") for i in range(allocators)]
    for instance in instances:
        await store.append(tracking=Tracking(instance.consumer, position))
    done = asyncio.Event()
    seen = 0

    async def count() -> None:
        nonlocal seen
        async for _record in store.subscribe(position, types={"vm.nic_allocated"}):
            seen += 1
            if seen >= nics:
                done.set()
                return
    counter = asyncio.create_task(count())
    started = time.perf_counter()
    tasks = [asyncio.create_task(a.run()) for a in instances]
    await asyncio.wait_for(done.wait(), 600)
    elapsed = time.perf_counter() - started
    for task in (*tasks, counter):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    macs = []
    for vm_id in vm_ids:
        vm = (await commands.repository.load(VM, vm_domain.stream_name(vm_id))).state  # type: ignore[arg-type]
        assert vm is not None
        macs += [(nic.mac, nic.id) for nic in vm.nics]
    ok = len({m for m, _ in macs}) == len(macs) == nics
    for mac, nic_id in macs[:: max(1, len(macs) // 50)]:
        claim = (await commands.repository.load(CLAIM, net.claim_stream(net.mac_resource(mac)))).state
        ok = ok and claim is not None and claim.holder == nic_id
    return elapsed, ok


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", action="append", choices=["etcd", "sqlite"])
    parser.add_argument("--allocators", action="append", type=int)
    parser.add_argument("--nics", type=int, default=1000)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    nics = 100 if args.quick else args.nics - args.nics % 5
    failed = False
    for backend in args.backend or ["sqlite", "etcd"]:
        for allocators in args.allocators or [1, 2]:
            with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
                if backend == "etcd":
                    with etcd_cluster(extra_args=["--max-txn-ops", "1024"]) as cluster:
                        store = open_store(f"etcd://{cluster.endpoints[0]}/bench/v1")
                        elapsed, ok = await run(store, allocators, nics)
                        await store.close()
                else:
                    store = open_store(f"sqlite://{Path(tmp) / 'log.sqlite'}")
                    elapsed, ok = await run(store, allocators, nics)
                    await store.close()
            failed |= not ok
            print(f"{backend:6} allocators={allocators}: {nics} NICs in {elapsed:.2f} s = "
                  f"{nics / elapsed:.0f} allocations/s; MACs distinct and claimed: {ok}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
