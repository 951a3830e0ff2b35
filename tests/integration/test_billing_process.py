"""The billing process on the process-manager framework: under its leader lease it closes
a period and issues the invoice by itself (no hand-driven step), and a successor restores
its view from the snapshot, reads only the tail and issues nothing twice."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import BACKENDS, open_store
from tests.support.gateway import drive_to_running
from ucloud.commands.billing import BillingCommands
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import SYSTEM, Actor
from ucloud.domain import vm as vm_domain
from ucloud.domain.invoice import INVOICES_STREAM, PERIODS_STREAM
from ucloud.domain.metering import PeriodPolicy
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.leases import leases_for
from ucloud.processes.billing import BillingProcess, BillingSettings
from ucloud.processes.framework import ProcessRunner

HOUR = PeriodPolicy(seconds=3600)


@contextlib.asynccontextmanager
async def running(runner: ProcessRunner) -> AsyncIterator[None]:
    task = asyncio.create_task(runner.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(check: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.05)


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventStore]:
    if request.param == "etcd":
        request.applymarker(pytest.mark.etcd)
    opened = await open_store(request.param, tmp_path, request)
    try:
        yield opened
    finally:
        await opened.close()


async def test_the_billing_process_invoices_under_its_lease_and_a_successor_resumes_from_its_snapshot(
        store: EventStore) -> None:
    commands = CommandService(store)
    await BillingCommands(store, commands.codec).set_price(SYSTEM, "core", "36 CHF/hour")
    vm = await commands.create_vm(Actor("alice"), name="web", cores=1, ram="256MiB", disk="1GiB", image="tiny")
    await drive_to_running(commands, vm.result)
    await commands.vm_command(SYSTEM, vm_domain.StopVm(vm_id=vm.result))
    end = HOUR.bounds(int(time.time()))[1]
    settings = BillingSettings(periods=HOUR, close_delay=5, tick=0.1)
    leases = leases_for(store)

    def runner(instance: str) -> ProcessRunner:
        process = BillingProcess(store, settings, clock=lambda: end + 10)
        return ProcessRunner(process, store, leases, instance=instance, lease_ttl=2.0, snapshot_interval=0.0)

    first = runner("one")
    async with running(first):
        await until(lambda: _version(store, INVOICES_STREAM, 1))
        await until(lambda: _saved(first))
    invoices, periods = await store.stream_version(INVOICES_STREAM), await store.stream_version(PERIODS_STREAM)
    assert invoices == 1 and periods >= 1
    [issued] = [r for r in await store.read_stream(INVOICES_STREAM)]
    assert b'"owner":"alice"' in issued.data and issued.actor == "billing@ucloud-system"
    assert first.stats().leader is False and first.stats().errors == 0

    head = await store.head()
    second = runner("two")  # another instance after the first one is gone
    async with running(second):
        await until(lambda: _leads(second))
        await asyncio.sleep(1.0)  # ten ticks: every decision the view allows is taken again
    assert second.position >= first.position and second.read <= await store.head() - first.position
    assert (await store.stream_version(INVOICES_STREAM), await store.stream_version(PERIODS_STREAM)) == (
        invoices, periods)  # nothing closed or issued twice
    assert await store.head() == head


async def _version(store: EventStore, stream: str, at_least: int) -> bool:
    return await store.stream_version(stream) >= at_least


async def _saved(runner: ProcessRunner) -> bool:
    return runner.stats().snapshots_saved >= 1 and runner.position >= await runner.store.head()


async def _leads(runner: ProcessRunner) -> bool:
    return runner.stats().leader
