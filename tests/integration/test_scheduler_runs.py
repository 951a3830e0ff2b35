"""The scheduler's fast paths against real stores: decisions on its own view at known
versions, runs of events decided in one transaction, and what happens when the view is
stale, a run conflicts, a run is too large, or room appears while a VM is refused."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from uuid import UUID

import pytest

from tests.conftest import open_store, unique_prefix
from tests.support.etcd import EtcdCluster
from tests.support.hosts import up_host
from ucloud.commands.aggregates import HOST, VM
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor, Loaded
from ucloud.domain import host as host_domain
from ucloud.domain import vm as vm_domain
from ucloud.domain.errors import Rejected
from ucloud.eventstore.errors import StreamConflict
from ucloud.eventstore.etcd import EtcdEventStore
from ucloud.eventstore.interface import EventStore
from ucloud.processes.scheduler import Scheduler
from ucloud.projections.runner import ProjectionRunner
from ucloud.projections.views import ReadModels

ADMIN = Actor("root", "ucloud-admin", is_admin=True)
ALICE = Actor("alice")
GiB = 1024**3


async def create(commands: CommandService, count: int, prefix: str = "vm") -> list[UUID]:
    return [(await commands.create_vm(ALICE, name=f"{prefix}{i}", cores=1, ram="1GB", disk="1GB", image="tiny")).result
            for i in range(count)]


async def models_of(store: EventStore, commands: CommandService) -> ReadModels:
    models = ReadModels()
    await ProjectionRunner(store, commands.codec, models.all()).catch_up()
    return models


async def run_until_decided(store: EventStore, scheduler: Scheduler, vm_ids: list[UUID],
                            timeout: float = 60) -> ReadModels:
    task = asyncio.create_task(scheduler.run())
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            models = await models_of(store, scheduler.commands)
            if all(models.vms.get(v).status is not vm_domain.Status.REQUESTED for v in vm_ids):
                return models
            assert not task.done(), task.exception()
            assert asyncio.get_running_loop().time() < deadline, "VMs still wait for a host"
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def assert_not_overbooked(models: ReadModels, vm_ids: list[UUID], overcommit: host_domain.Overcommit) -> None:
    for host in models.hosts.by_id.values():
        assert host.used_cores <= host.cores * overcommit.cpu
        assert host.used_ram <= host.ram * overcommit.ram
        assert host.used_disk <= host.disk * overcommit.disk
        assert set(host.claims) == {v for v in vm_ids if models.vms.get(v).host_id == host.id
                                    and models.vms.get(v).status is vm_domain.Status.SCHEDULED}


@pytest.mark.parametrize("backend", ["sqlite", "etcd"])
async def test_a_backlog_is_placed_in_runs_of_one_transaction_each_without_overbooking(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = await open_store(backend, tmp_path, request)
    commands = CommandService(store)
    for i in range(4):  # 4 x 4 GiB: room for 16 one-GiB VMs
        await up_host(commands, f"h{i}", 2, "4GB", "100GB")
    vm_ids = await create(commands, 40)
    scheduler = Scheduler(commands, max_batch=16)
    models = await run_until_decided(store, scheduler, vm_ids)
    statuses = [models.vms.get(v).status for v in vm_ids]
    assert statuses.count(vm_domain.Status.SCHEDULED) == 16
    assert statuses.count(vm_domain.Status.UNSCHEDULABLE) == 24
    assert_not_overbooked(models, vm_ids, commands.overcommit)
    # 40 requests in runs of at most 16: three transactions, not forty.
    assert 1 <= scheduler.batches <= 4 and scheduler.fallbacks == 0
    # The tracking position went with the last run.
    assert await store.tracked_position(scheduler.consumer) >= await last_position_of(store, "vm.requested")
    await store.close()


async def last_position_of(store: EventStore, event_type: str) -> int:
    return max(r.position for r in await store.read_all(types={event_type}))


@pytest.mark.parametrize("backend", ["sqlite", "etcd"])
async def test_a_run_that_conflicts_is_decided_again_one_event_at_a_time(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = await open_store(backend, tmp_path, request)
    commands = CommandService(store)
    host = (await up_host(commands, "h1", 1, "2GB", "100GB")).result  # room for two
    a, b, c = await create(commands, 3)
    records = await store.read_all()
    # Someone else places `a` after the scheduler read the log: its view is stale.
    await commands.place_vm(ADMIN, a, host)
    scheduler = Scheduler(commands)
    await scheduler.handle_run(records)
    assert scheduler.fallbacks == 1 and scheduler.batches == 0
    models = await models_of(store, commands)
    assert models.vms.get(a).host_id == host and models.vms.get(b).host_id == host
    assert models.vms.get(c).status is vm_domain.Status.UNSCHEDULABLE
    assert "needs 1 GiB RAM; the largest free is 0 B on host h1" in models.vms.get(c).reason
    assert set(models.hosts.by_id[host].claims) == {a, b}
    assert await store.tracked_position(scheduler.consumer) == records[-1].position
    await store.close()


async def test_a_run_too_large_for_one_etcd_transaction_is_split(etcd: EtcdCluster) -> None:
    # 31 operations per transaction: a run of three placements (and its tracking) fits, four do not.
    store = EtcdEventStore(etcd.endpoints, prefix=unique_prefix(), max_txn_ops=32)
    commands = CommandService(store)
    for i in range(3):
        await up_host(commands, f"h{i}", 8, "64GB", "100GB")
    vm_ids = await create(commands, 20)
    scheduler = Scheduler(commands, max_batch=64)
    models = await run_until_decided(store, scheduler, vm_ids)
    assert all(models.vms.get(v).status is vm_domain.Status.SCHEDULED for v in vm_ids)
    # The run was decided again one event at a time, and later runs are smaller.
    assert scheduler.max_batch == 32 and scheduler.placed == 20
    assert_not_overbooked(models, vm_ids, commands.overcommit)
    await store.close()


async def test_a_vm_refused_while_a_host_was_being_registered_is_placed(tmp_path: Path,
                                                                       request: pytest.FixtureRequest) -> None:
    """The scheduler refuses the VM on a view without the new host; the host's event
    comes before the refusal in the log, so only the refusal itself can wake it up."""
    store = await open_store("sqlite", tmp_path, request)
    commands = CommandService(store)
    (vm,) = await create(commands, 1)
    host = (await up_host(commands, "late", 2, "4GB", "20GB")).result
    requested, registered, came_up = await store.read_all()
    scheduler = Scheduler(commands)
    await scheduler.handle(requested)  # no host in its view yet
    (refused,) = await store.read_all(after=came_up.position)
    assert refused.type == "vm.unschedulable"
    await scheduler.handle(registered)  # the VM still looks requested to it here
    await scheduler.handle(came_up)
    await scheduler.handle(refused)
    models = await models_of(store, commands)
    assert models.vms.get(vm).status is vm_domain.Status.SCHEDULED and models.vms.get(vm).host_id == host
    await store.close()


@pytest.mark.parametrize("backend", ["sqlite", "etcd"])
async def test_placing_on_a_stale_view_is_decided_again_on_fresh_state(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = await open_store(backend, tmp_path, request)
    commands = CommandService(store)
    host = (await up_host(commands, "h1", 1, "1GB", "100GB")).result  # room for one
    first, second = await create(commands, 2)
    repository = commands.repository
    empty = await repository.load(HOST, host_domain.stream_name(host))
    await commands.place_vm(ADMIN, first, host)
    # The view still shows the host empty at its old version: the append conflicts, the
    # fresh decision finds no room. No overbooking through a stale view.
    known = {host_domain.stream_name(host): empty,
             vm_domain.stream_name(second): await repository.load(VM, vm_domain.stream_name(second))}
    with pytest.raises(Rejected, match="no room"):
        await commands.place_vm(ADMIN, second, host, known=known)
    assert set((await repository.load(HOST, host_domain.stream_name(host))).state.claims) == {first}

    # The other way round: the view shows the host full, but the claim was released since.
    full = await repository.load(HOST, host_domain.stream_name(host))
    await commands.release_capacity(ADMIN, host, first)
    known[host_domain.stream_name(host)] = full
    outcome = await commands.place_vm(ADMIN, second, host, known=known)
    assert outcome.events
    assert outcome.versions[host_domain.stream_name(host)] == full.version + 2  # release + this claim
    assert set((await repository.load(HOST, host_domain.stream_name(host))).state.claims) == {second}
    await store.close()


@pytest.mark.parametrize("backend", ["sqlite", "etcd"])
async def test_schedule_writes_nothing_when_one_decision_is_refused_or_stale(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = await open_store(backend, tmp_path, request)
    commands = CommandService(store)
    host = (await up_host(commands, "h1", 1, "2GB", "100GB")).result  # room for two
    vms = await create(commands, 3)
    head = await store.head()
    with pytest.raises(Rejected, match="no room"):
        await commands.schedule(ADMIN, placements=[(v, host) for v in vms])
    current = await commands.repository.load(HOST, host_domain.stream_name(host))
    stale = Loaded(current.state, current.version - 1, 0)  # a view one event behind
    with pytest.raises(StreamConflict):
        await commands.schedule(ADMIN, placements=[(vms[0], host)],
                                known={host_domain.stream_name(host): stale})
    assert await store.head() == head
    outcome = await commands.schedule(ADMIN, placements=[(vms[0], host), (vms[1], host)],
                                      unschedulable=[(vms[2], "full")])
    assert len(outcome.events) == 5
    models = await models_of(store, commands)
    assert set(models.hosts.by_id[host].claims) == set(vms[:2])
    assert models.vms.get(vms[2]).reason == "full"
    await store.close()
