"""The process-manager framework: resume without replay, snapshots, the failure detector's
verdicts, and leader fail-over between two `ucloud processes`, each its own process on a
real etcd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from uuid import UUID

import pytest

from tests.conftest import open_store
from tests.support.etcd import EtcdCluster, free_port
from tests.support.hosts import up_host
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import SYSTEM, Actor
from ucloud.domain import host as host_domain
from ucloud.domain import vm as vm_domain
from ucloud.domain.events import Event
from ucloud.eventstore.etcd import EtcdEventStore
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.leases import EtcdLeases, MemoryLeases, hold, leases_for
from ucloud.eventstore.records import NewEvent, StreamAppend
from ucloud.eventstore.sqlite import SqliteEventStore
from ucloud.processes.detector import FailureDetector, verdicts
from ucloud.processes.framework import ProcessRunner
from ucloud.processes.scheduler import Scheduler
from ucloud.projections.runner import ProjectionRunner
from ucloud.projections.views import ReadModels

BIN = Path(sys.executable).parent
ALICE = Actor("alice")


async def create(commands: CommandService, count: int) -> list[UUID]:
    return [(await commands.create_vm(ALICE, name=f"vm{i}", cores=1, ram="256MB", disk="1GB", image="tiny")).result
            for i in range(count)]


async def models_of(store: EventStore, commands: CommandService) -> ReadModels:
    models = ReadModels()
    runner = ProjectionRunner(store, commands.codec, models.all())
    await runner.catch_up()
    return models


@contextlib.asynccontextmanager
async def running(runner: ProcessRunner) -> AsyncIterator[None]:
    task = asyncio.create_task(runner.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("backend", ["sqlite", "etcd"])
async def test_a_restarted_scheduler_resumes_from_its_snapshot_and_reads_only_the_tail(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = await open_store(backend, tmp_path, request)
    commands = CommandService(store)
    await up_host(commands, "h1", 64, "256GB", "1TB")
    first_vms = await create(commands, 50)
    first = ProcessRunner(Scheduler(commands, instance="a"), store)
    async with running(first):
        await until(lambda: asyncio.sleep(0, first.manager.tracked >= 0 and first.position >= 50))
        placed = await models_of(store, commands)
        await until(lambda: _all_placed(store, commands, first_vms))
    await first.save_snapshot()
    assert first.snapshots_saved == 1
    snapshot_at = first.position
    later = await create(commands, 20)
    second = ProcessRunner(Scheduler(commands, instance="b"), store)
    async with running(second):
        await until(lambda: _all_placed(store, commands, later))
        head = await store.head()
        await until(lambda: asyncio.sleep(0, second.position == head))
    placed = await models_of(store, commands)
    assert all(placed.vms.get(vm).status is vm_domain.Status.SCHEDULED for vm in first_vms + later)
    # It read the tail after its snapshot, never the first 50 placements again.
    tail = [r for r in await store.read_all(snapshot_at) if r.type.startswith(("vm.", "host."))]
    assert second.read == len(tail), (second.read, len(tail))
    assert second.read < snapshot_at
    await store.close()


async def _all_placed(store: EventStore, commands: CommandService, vms: list[UUID]) -> bool:
    models = await models_of(store, commands)
    return all((vm := models.vms.get(v)) is not None and vm.status is vm_domain.Status.SCHEDULED for v in vms)


def test_verdicts_declare_an_up_host_only_after_its_lease_was_gone_long_enough() -> None:
    base = host_domain.Host(id=uuid.uuid4(), hostname="a", cores=1, ram=1, disk=1, hypervisor="qemu",
                            status=host_domain.HostStatus.UP, session=7, lease_ttl=2.0)
    unknown = host_domain.Host(id=uuid.uuid4(), hostname="b", cores=1, ram=1, disk=1, hypervisor="qemu")
    missing: dict[UUID, float] = {}
    alive = {host_domain.slice_name(base.id): "a"}
    assert verdicts([base, unknown], alive, missing, 100.0, declare_after=0.5, leading_since=0.0) == []
    assert missing == {}
    # Gone: suspect first, declared once gone for declare_after.
    assert verdicts([base], {}, missing, 101.0, declare_after=0.5, leading_since=0.0) == []
    assert missing == {base.id: 101.0}
    (verdict,) = verdicts([base], {}, missing, 101.6, declare_after=0.5, leading_since=0.0)
    assert verdict.host_id == base.id and verdict.session == 7 and "session 7" in verdict.evidence
    # A detector that just took over waits one lease TTL: it cannot know how long it was gone.
    assert verdicts([base], {}, {}, 101.6, declare_after=0.0, leading_since=100.0) == []
    # Back before the verdict: forgotten.
    assert verdicts([base], alive, missing, 102.0, declare_after=0.5, leading_since=0.0) == []
    assert missing == {}


async def test_a_host_whose_lease_expires_is_declared_dead_and_its_vms_go_elsewhere(tmp_path: Path) -> None:
    """In one process on SQLite: the detector and the scheduler on the framework, two
    hosts holding leases; one stops renewing."""
    store = await open_store("sqlite", tmp_path, None)  # type: ignore[arg-type]
    leases = leases_for(store)
    commands = CommandService(store)
    one = (await commands.register_host(SYSTEM, "one", 8, "16GB", "100GB")).result
    two = (await commands.register_host(SYSTEM, "two", 8, "16GB", "100GB")).result
    grant_one = await leases.acquire(host_domain.slice_name(one), "one", 1.0)
    grant_two = await leases.acquire(host_domain.slice_name(two), "two", 1.0)
    assert grant_one and grant_two
    await commands.mark_host_up(SYSTEM, one, grant_one.token, 1.0)
    async with hold(leases, grant_two):
        await commands.mark_host_up(SYSTEM, two, grant_two.token, 1.0)
        scheduler = ProcessRunner(Scheduler(commands), store, leases, instance="x", lease_ttl=2)
        detector = ProcessRunner(FailureDetector(commands, leases, declare_after=0.2, tick_interval=0.05),
                                 store, leases, instance="x", lease_ttl=2)
        async with running(scheduler), running(detector):
            vms = await create(commands, 4)

            async def on_two() -> bool:
                models = await models_of(store, commands)
                return all((vm := models.vms.get(v)) is not None and vm.host_id == two for v in vms)

            # "one" never renews: declared dead; whatever went there moves to "two".
            await until(on_two, 30)
            models = await models_of(store, commands)
            assert models.hosts.by_id[one].status is host_domain.HostStatus.DEAD
            assert models.hosts.by_id[one].claims == {}
            assert models.hosts.by_id[two].status is host_domain.HostStatus.UP
            assert set(models.hosts.by_id[two].claims) == set(vms)
            # A VM being deleted on a dead host is simply deleted; deletes never hang.
    await leases.close()
    await store.close()


async def test_a_declaration_loses_to_the_hosts_comeback(tmp_path: Path) -> None:
    store = await open_store("memory", tmp_path, None)  # type: ignore[arg-type]
    commands = CommandService(store)
    host = (await up_host(commands, "h", 8, "16GB", "100GB")).result
    await commands.mark_host_up(SYSTEM, host, 2, 2.0)  # the agent came back: session 2
    with pytest.raises(Exception, match="not up in session 1"):
        await commands.declare_host_dead(SYSTEM, host, 1, "lease gone")
    # Declared in its current session, a deleted VM there is gone at once after eviction.
    vm = (await create(commands, 1))[0]
    await commands.place_vm(SYSTEM, vm, host)
    await commands.vm_command(ALICE, vm_domain.DeleteVm(vm_id=vm))
    await commands.declare_host_dead(SYSTEM, host, 2, "lease gone")
    await commands.evict(SYSTEM, host, [vm], "its host was declared dead")
    models = await models_of(store, commands)
    assert models.vms.get(vm).status is vm_domain.Status.DELETED
    assert models.hosts.by_id[host].claims == {}


def _processes(store_url: str, instance: str, log: Path, metrics_port: int) -> subprocess.Popen[bytes]:
    out = open(log, "ab")
    process = subprocess.Popen([str(BIN / "ucloud"), "processes", "--store", store_url, "--instance", instance,
                                "--lease-ttl", "2", "--metrics-listen", "127.0.0.1", "--metrics-port",
                                str(metrics_port)], stdout=out, stderr=out, start_new_session=True)
    out.close()
    return process


@pytest.mark.etcd
@pytest.mark.slow
async def test_two_processes_daemons_the_leader_killed_during_creates_every_vm_placed_once(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    prefix = f"/pm-{uuid.uuid4().hex[:8]}/v1"
    store = EtcdEventStore(etcd.endpoints, prefix=prefix, max_txn_ops=1024)
    leases = EtcdLeases(store.client, store.prefix)
    commands = CommandService(store)
    url = f"etcd://{etcd.endpoints[0]}{prefix}"
    ports = {name: free_port() for name in ("p1", "p2")}
    daemons = {name: _processes(url, name, tmp_path / f"{name}.log", ports[name]) for name in ("p1", "p2")}
    hosts = [(await commands.register_host(SYSTEM, f"h{i}", 64, "512GB", "10TB")).result for i in range(2)]
    grants = [await leases.acquire(host_domain.slice_name(h), f"h{i}", 3) for i, h in enumerate(hosts)]
    try:
        async with contextlib.AsyncExitStack() as stack:
            for host, grant in zip(hosts, grants, strict=True):
                assert grant is not None
                await stack.enter_async_context(hold(leases, grant))
                await commands.mark_host_up(SYSTEM, host, grant.token, 3)

            async def leader() -> str | None:
                return (await leases.holders("pm-scheduler")).get("pm-scheduler")

            await until(lambda: _some(leader), 60)
            first = await leader()
            assert first in daemons
            vms = await create(commands, 100)
            daemons[first].send_signal(signal.SIGKILL)
            daemons[first].wait()
            vms += await create(commands, 100)
            await until(lambda: _all_placed(store, commands, vms), 120)
            second = await leader()
            assert second not in (None, first) and second is not None
            metrics = await asyncio.to_thread(_get, f"http://127.0.0.1:{ports[second]}/metrics")
            assert 'ucloud_process_leader{name="scheduler"} 1' in metrics, metrics
            handled = re.search(r'ucloud_process_handled_total\{name="scheduler"\} (\d+)', metrics)
            assert handled is not None and int(handled.group(1)) > 0, metrics
            assert 'ucloud_process_errors_total{name="scheduler"} 0' in metrics, metrics
            models = await models_of(store, commands)
            claims = [vm for h in hosts for vm in models.hosts.by_id[h].claims]
            assert sorted(claims, key=str) == sorted(vms, key=str), "every VM claimed exactly once"
            scheduled = [r for r in await store.read_all(types=["vm.scheduled"])]
            assert len(scheduled) == len(vms) == len({r.stream for r in scheduled})
    finally:
        for process in daemons.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
        await store.close()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return str(answer.read().decode())


async def _some(probe) -> bool:  # type: ignore[no-untyped-def]
    return await probe() is not None


def test_memory_leases_are_shared_per_store() -> None:
    from ucloud.eventstore.memory import MemoryEventStore

    store = MemoryEventStore()
    assert leases_for(store) is leases_for(store)
    assert isinstance(leases_for(store), MemoryLeases)


async def _write_log(store: EventStore, vms: int, hosts: int) -> None:
    """A log of ``hosts`` registrations and ``vms`` VMs requested, scheduled and claimed:
    3 events a VM, written in large appends (the log, not the writing, is under test)."""
    codec = CommandService(store).codec
    host_ids = [uuid.UUID(int=i + 1) for i in range(hosts)]
    versions: dict[str, int] = {}
    batch: dict[str, list[NewEvent]] = {}

    def add(stream: str, event: Event) -> None:
        tag, schema, data = codec.encode(event)
        batch.setdefault(stream, []).append(NewEvent(type=tag, data=data, schema=schema, actor="system"))

    async def flush() -> None:
        appends = [StreamAppend(stream, versions.get(stream, 0), events) for stream, events in batch.items()]
        await store.append(*appends)
        for stream, events in batch.items():
            versions[stream] = versions.get(stream, 0) + len(events)
        batch.clear()

    for index, host_id in enumerate(host_ids):
        add(host_domain.stream_name(host_id), host_domain.HostRegistered(
            host_id=host_id, hostname=f"big{index}", cores=4096, ram=2**50, disk=2**55))
    await flush()
    for index in range(vms):
        vm_id, host_id = uuid.UUID(int=10**9 + index), host_ids[index % hosts]
        add(vm_domain.stream_name(vm_id), vm_domain.VmRequested(
            vm_id=vm_id, owner="alice", name=f"vm{index}", cores=1, ram=2**30, disk=2**33, image="tiny"))
        add(vm_domain.stream_name(vm_id), vm_domain.VmScheduled(vm_id=vm_id, host_id=host_id))
        add(host_domain.stream_name(host_id), host_domain.CapacityClaimed(
            host_id=host_id, vm_id=vm_id, cores=1, ram=2**30, disk=2**33))
        if index % 500 == 499:
            await flush()
    if batch:
        await flush()


def _figure(metrics: str, name: str, manager: str) -> int:
    found = re.search(rf'{name}\{{name="{manager}"\}} (\d+)', metrics)
    assert found is not None, metrics
    return int(found.group(1))


@pytest.mark.slow
async def test_ucloud_processes_restarted_over_a_100k_event_log_reads_only_the_tail(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite"
    store = SqliteEventStore(path)
    await _write_log(store, 33_300, 100)
    head = await store.head()
    assert head >= 100_000
    url, port = f"sqlite://{path}", free_port()

    async def scheduler_at(position: int) -> str | None:
        try:
            metrics = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
        except OSError:
            return None
        if (_figure(metrics, "ucloud_process_leader", "scheduler")
                and _figure(metrics, "ucloud_process_position", "scheduler") >= position):
            return metrics
        return None

    async def stopped(process: subprocess.Popen[bytes]) -> None:
        os.killpg(process.pid, signal.SIGTERM)  # a stop on purpose: it leaves its snapshot
        assert await asyncio.to_thread(process.wait, 30) == 0

    first = _processes(url, "p1", tmp_path / "p1.log", port)
    try:
        await until(lambda: _some(lambda: scheduler_at(head)), 120)
        metrics = await scheduler_at(head)
        assert metrics is not None and _figure(metrics, "ucloud_process_read_total", "scheduler") >= 99_000
    finally:
        await stopped(first)
    later = await create(CommandService(store), 10)  # the tail: 10 VMs asked for while it was down
    tail_head = await store.head()
    second = _processes(url, "p1", tmp_path / "p1.log", port)
    try:
        await until(lambda: _some(lambda: scheduler_at(tail_head)), 120)
        metrics = await scheduler_at(tail_head)
        assert metrics is not None
        read = _figure(metrics, "ucloud_process_read_total", "scheduler")
        # It restored its snapshot and read what came after it: the 10 requests (and what it
        # appended about them itself), never the 100,000 before.
        assert 10 <= read <= 50, read
        assert _figure(metrics, "ucloud_process_errors_total", "scheduler") == 0
    finally:
        await stopped(second)
    models = await models_of(store, CommandService(store))
    assert all(models.vms.get(v) is not None for v in later)
    await store.close()
