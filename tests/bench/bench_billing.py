"""Rebuilding billing from the log, and closing a billing period for many accounts.

    .venv/bin/python -m tests.bench.bench_billing [--events 1000000] [--accounts 10000] [--quick]

1. Rebuild: EVENTS VM lifecycle events (requested, started/stopped cycles, deleted) of VMs
   owned by ACCOUNTS users, plus price changes, as log records (envelope + JSON data, as
   the store hands them out) folded by the billing read model through the projection
   runner (decode + fold). Reported: events per CPU-second (process time), and per
   wall second; the goal is 200,000 per CPU-second.
2. Close: the billing process (a memory store holding the same log) closes the period
   and issues one invoice per account (in appends of 50): CPU and wall seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from datetime import UTC, datetime

from ucloud.domain import vm as vm_domain
from ucloud.domain.catalogue import build_codec
from ucloud.domain.events import Event
from ucloud.domain.metering import PeriodPolicy
from ucloud.domain.pricing import PriceSet, Resource
from ucloud.eventstore.memory import MemoryEventStore
from ucloud.eventstore.records import EventRecord, NewEvent, StreamAppend
from ucloud.processes.billing import BillingProcess, BillingSettings
from ucloud.projections.billing import BillingView
from ucloud.projections.runner import ProjectionRunner

HOST = uuid.UUID(int=1)
MONTH = PeriodPolicy()
T0 = int(datetime(2026, 11, 2, tzinfo=UTC).timestamp())


def lifecycle(events: int, accounts: int) -> list[tuple[str, Event, int]]:
    """(stream, event, time) in log order: every VM requested, started and stopped 4 times,
    deleted (10 events), VMs interleaved; a price change every 100,000 events."""
    result: list[tuple[str, Event, int]] = []
    per_vm = 10
    vms = max(1, events // per_vm)
    wave = 1000  # VMs whose lives interleave at a time
    t = T0
    prices = [Resource.CORE, Resource.RAM, Resource.DISK]
    for first in range(0, vms, wave):
        batch = [uuid.UUID(int=10_000 + i) for i in range(first, min(vms, first + wave))]
        for step in range(per_vm):
            for index, vm_id in enumerate(batch):
                if len(result) % 100_000 == 0:
                    resource = prices[(len(result) // 100_000) % 3]
                    result.append(("pricebook", PriceSet(
                        resource=resource, micros=100 + len(result) // 100_000, currency="CHF", per="hour",
                        per_seconds=3600, effective_from=datetime.fromtimestamp(t, UTC)), t))
                owner = f"user{(first + index) % accounts}"
                event: Event
                if step == 0:
                    event = vm_domain.VmRequested(vm_id=vm_id, owner=owner, name=f"vm{first + index}", cores=2,
                                                  ram=2 << 30, disk=20 << 30, image="debian-12")
                elif step == per_vm - 1:
                    event = vm_domain.VmDeleted(vm_id=vm_id, host_id=HOST)
                elif step % 2 == 1:
                    event = vm_domain.VmStarted(vm_id=vm_id, host_id=HOST, accelerator="kvm")
                else:
                    event = vm_domain.VmStopped(vm_id=vm_id, host_id=HOST)
                result.append((vm_domain.stream_name(vm_id), event, t))
            t += 7
    return result


def records(log: list[tuple[str, Event, int]]) -> list[EventRecord]:
    codec = build_codec()
    versions: dict[str, int] = {}
    out = []
    for position, (stream, event, t) in enumerate(log, 1):
        tag, schema, data = codec.encode(event)
        version = versions[stream] = versions.get(stream, 0) + 1
        out.append(EventRecord(id=uuid.uuid4(), type=tag, stream=stream, version=version, position=position,
                               time=datetime.fromtimestamp(t, UTC), data=data, schema=schema, actor="bench"))
    return out


def rebuild(all_records: list[EventRecord]) -> BillingView:
    view = BillingView(MONTH)
    runner = ProjectionRunner(MemoryEventStore(), build_codec(), [view], name="bench")
    cpu, wall = time.process_time(), time.perf_counter()
    for record in all_records:
        runner.apply(record)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"rebuild: {len(all_records):,} events in {cpu:.2f} CPU-s ({wall:.2f} s wall): "
          f"{len(all_records) / cpu:,.0f} events per CPU-second, {len(all_records) / wall:,.0f} per wall second")
    return view


async def close_period(log: list[tuple[str, Event, int]], accounts: int) -> None:
    store = MemoryEventStore()
    codec = build_codec()
    versions: dict[str, int] = {}
    batch: list[StreamAppend] = []
    for stream, event, _ in log:  # times are the store's: the period is this month's
        tag, schema, data = codec.encode(event)
        batch.append(StreamAppend(stream, versions.get(stream, 0), [NewEvent(type=tag, schema=schema, data=data)]))
        versions[stream] = versions.get(stream, 0) + 1
        if len(batch) == 500:
            await store.append(*batch)
            batch = []
    if batch:
        await store.append(*batch)
    now = time.time()
    end = MONTH.bounds(int(now))[1]
    process = BillingProcess(store, BillingSettings(periods=MONTH, close_delay=1), clock=lambda: end + 5)
    await process.folder.catch_up()  # the rebuild, measured above; not part of closing
    cpu, wall = time.process_time(), time.perf_counter()
    await process.run_until_idle()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    invoices = len(process.view.invoices)
    print(f"close: 1 period, {invoices:,} invoices for {accounts:,} accounts in {cpu:.2f} CPU-s ({wall:.2f} s wall): "
          f"{invoices / wall:,.0f} invoices per second")
    assert invoices == min(accounts, len({e.owner for _, e, _ in log if isinstance(e, vm_domain.VmRequested)}))
    numbers = sorted(process.view.invoices)
    assert numbers == list(range(1, invoices + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test, not for figures)")
    args = parser.parse_args()
    events, accounts = (20_000, 500) if args.quick else (args.events, args.accounts)
    log = lifecycle(events, accounts)
    rebuild(records(log))
    asyncio.run(close_period(log, accounts))


if __name__ == "__main__":
    main()
