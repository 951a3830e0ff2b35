"""The scheduler against real stores: placement, release, and no overbooking under concurrency."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import open_store
from tests.support.hosts import up_host
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.domain import vm as vm_domain
from ucloud.eventstore.interface import EventStore
from ucloud.processes.scheduler import Scheduler
from ucloud.projections.runner import ProjectionRunner
from ucloud.projections.views import ReadModels

ADMIN = Actor("root", "ucloud-admin", is_admin=True)
ALICE = Actor("alice")
GiB = 1024**3


@contextlib.asynccontextmanager
async def running(*schedulers: Scheduler) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(s.run()) for s in schedulers]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def settle(store: EventStore, commands: CommandService, vm_ids: list, timeout: float = 60) -> ReadModels:
    models = ReadModels()
    runner = ProjectionRunner(store, commands.codec, models.all())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        await runner.catch_up()
        waiting = [v for v in vm_ids if models.vms.get(v).status is vm_domain.Status.REQUESTED]
        if not waiting or loop.time() > deadline:
            return models
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("backend", ["sqlite", "etcd"])
async def test_vm_is_placed_and_its_capacity_released_on_delete(backend: str, tmp_path: Path,
                                                                 request: pytest.FixtureRequest) -> None:
    store = await open_store(backend, tmp_path, request)
    commands = CommandService(store)
    host = (await up_host(commands, "h1", 2, "4GB", "20GB")).result
    scheduler = Scheduler(commands)
    async with running(scheduler):
        vm = (await commands.create_vm(ALICE, name="a", cores=2, ram="1GB", disk="5GB", image="tiny")).result
        too_big = (await commands.create_vm(ALICE, name="b", cores=1, ram="8GB", disk="1GB", image="tiny")).result
        models = await settle(store, commands, [vm, too_big])
        placed = models.vms.get(vm)
        assert placed.status is vm_domain.Status.SCHEDULED and placed.host_id == host
        refused = models.vms.get(too_big)
        assert refused.status is vm_domain.Status.UNSCHEDULABLE
        assert "needs 8 GiB RAM; the largest free is 3 GiB on host h1" in refused.reason
        assert models.hosts.by_id[host].used_cores == 2
        # Delete: the host agent is not running here, so report the deletion as it would.
        await commands.vm_command(ALICE, vm_domain.DeleteVm(vm_id=vm))
        await commands.report(ADMIN, vm_domain.ReportDeleted(vm_id=vm, host_id=host))
        for _ in range(100):
            await asyncio.sleep(0.05)
            await settle(store, commands, [])
            if models.hosts.by_id[host].used_cores == 0:
                break
            models = await settle(store, commands, [vm])
        assert models.hosts.by_id[host].used_cores == 0
    await store.close()


async def test_unschedulable_vm_is_placed_when_a_host_appears(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = await open_store("sqlite", tmp_path, request)
    commands = CommandService(store)
    async with running(Scheduler(commands)):
        vm = (await commands.create_vm(ALICE, name="a", cores=1, ram="1GB", disk="1GB", image="tiny")).result
        models = await settle(store, commands, [vm])
        assert models.vms.get(vm).status is vm_domain.Status.UNSCHEDULABLE
        assert "no hosts" in models.vms.get(vm).reason
        host = (await up_host(commands, "late", 4, "8GB", "50GB")).result
        for _ in range(100):
            models = await settle(store, commands, [vm])
            if models.vms.get(vm).status is vm_domain.Status.SCHEDULED:
                break
            await asyncio.sleep(0.05)
        assert models.vms.get(vm).host_id == host
    await store.close()


@pytest.mark.etcd
@pytest.mark.slow
async def test_two_schedulers_never_overbook_a_host(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """2 scheduler instances, 500 concurrent creates, 20 hosts: zero overbooked hosts,
    every VM placed or marked unschedulable with its reason."""
    store = await open_store("etcd", tmp_path, request)
    commands = CommandService(store)
    hosts = [(await up_host(commands, f"host{i:02d}", 4, "8GB", "100GB")).result for i in range(20)]
    # Capacity: 20 hosts x 16 schedulable cores (4x overcommit) = 320 one-core VMs by CPU,
    # but RAM (not overcommitted) allows 20 x 8 = 160 one-GiB VMs: 340 must be refused.
    async with running(Scheduler(commands, instance="a"), Scheduler(commands, instance="b")):
        creates = [commands.create_vm(ALICE, name=f"vm{i}", cores=1, ram="1GB", disk="1GB", image="tiny")
                   for i in range(500)]
        vm_ids = [o.result for o in await asyncio.gather(*creates)]
        models = await settle(store, commands, vm_ids, timeout=240)
    statuses = [models.vms.get(v).status for v in vm_ids]
    assert statuses.count(vm_domain.Status.REQUESTED) == 0
    placed = [v for v in vm_ids if models.vms.get(v).status is vm_domain.Status.SCHEDULED]
    refused = [v for v in vm_ids if models.vms.get(v).status is vm_domain.Status.UNSCHEDULABLE]
    assert len(placed) == 160 and len(refused) == 340
    assert all(models.vms.get(v).reason for v in refused)
    for host_id in hosts:
        host = models.hosts.by_id[host_id]
        assert host.used_ram <= host.ram and host.used_cores <= host.cores * 4
        # The claims on the host are exactly the VMs the VM streams say are placed there.
        assert set(host.claims) == {v for v in placed if models.vms.get(v).host_id == host_id}
    await store.close()
