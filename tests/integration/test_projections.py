"""Read models: restart from a snapshot plus the tail, read-your-writes, lag."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from pathlib import Path

import msgspec
import pytest

from tests.conftest import open_store
from tests.support.hosts import up_host
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.domain import vm as vm_domain
from ucloud.eventstore.records import EventRecord
from ucloud.projections.runner import ProjectionRunner, no_cyclic_gc
from ucloud.projections.views import ReadModels

ADMIN = Actor("root", "ucloud-admin", is_admin=True)
ALICE = Actor("alice")


class CountingStore:
    """Counts how many events a runner reads, to prove a restart replays only the tail."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.read = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def read_all(self, *args: object, **kwargs: object) -> list[EventRecord]:
        records: list[EventRecord] = await self.inner.read_all(*args, **kwargs)  # type: ignore[attr-defined]
        self.read += len(records)
        return records


@pytest.mark.parametrize("backend", ["sqlite", "etcd"])
async def test_a_restarted_projection_replays_only_the_tail_after_its_snapshot(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = await open_store(backend, tmp_path, request)
    commands = CommandService(store)
    host = (await up_host(commands, "h1", 8, "16GB", "100GB")).result
    vms = [(await commands.create_vm(ALICE, name=f"v{i}", cores=1, ram="256MB", disk="1GB", image="tiny")).result
           for i in range(20)]
    for vm_id in vms[:10]:
        await commands.place_vm(ADMIN, vm_id, host)

    first = ReadModels()
    runner = ProjectionRunner(store, commands.codec, first.all(), name="test")
    await runner.catch_up()
    await runner.save_snapshot()
    snapshot_at = runner.position
    assert snapshot_at == await store.head()

    # More happens while no projection runs.
    await commands.vm_command(ALICE, vm_domain.StopVm(vm_id=vms[0]))
    late = (await commands.create_vm(ALICE, name="late", cores=1, ram="256MB", disk="1GB", image="tiny")).result

    counting = CountingStore(store)
    second = ReadModels()
    restarted = ProjectionRunner(counting, commands.codec, second.all(), name="test")  # type: ignore[arg-type]
    await restarted.restore()
    assert restarted.position == snapshot_at
    assert second.vms.get(vms[5]) is not None and second.hosts.by_id[host].used_cores == 10
    await restarted.catch_up()
    assert counting.read == (await store.head()) - snapshot_at  # the tail only
    assert second.vms.get(late) is not None
    assert second.vms.get(vms[0]).status is vm_domain.Status.STOPPING
    # The restarted views equal views built from the whole log.
    scratch = ReadModels()
    full = ProjectionRunner(store, commands.codec, scratch.all(), name="scratch")
    await full.catch_up()
    assert second.vms.by_id == scratch.vms.by_id
    assert second.vms.by_owner == scratch.vms.by_owner and second.vms.by_host == scratch.vms.by_host
    assert second.hosts.dump() == scratch.hosts.dump()
    await store.close()


async def test_a_snapshot_of_another_shape_is_ignored(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = await open_store("sqlite", tmp_path, request)
    commands = CommandService(store)
    await commands.create_vm(ALICE, name="a", cores=1, ram="256MB", disk="1GB", image="tiny")
    models = ReadModels()
    runner = ProjectionRunner(store, commands.codec, models.all(), name="shape")
    await runner.catch_up()
    await runner.save_snapshot()
    # A runner with other projections (e.g. after an upgrade) must rebuild, not misread.
    other = ProjectionRunner(store, commands.codec, [ReadModels().vms], name="shape")
    await other.restore()
    assert other.position == 0
    await store.close()


async def test_wait_for_a_position_and_the_lag(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = await open_store("sqlite", tmp_path, request)
    commands = CommandService(store)
    models = ReadModels()
    runner = ProjectionRunner(store, commands.codec, models.all(), name="live")
    assert not await runner.wait_for(1, timeout=0.1)  # nothing there yet: a clear False
    task = asyncio.create_task(runner.run())
    try:
        outcome = await commands.create_vm(ALICE, name="a", cores=1, ram="256MB", disk="1GB", image="tiny")
        assert await runner.wait_for(outcome.position, timeout=5)
        assert models.vms.get(outcome.result) is not None  # read your own write
        assert await runner.lag() == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await commands.create_vm(ALICE, name="b", cores=1, ram="256MB", disk="1GB", image="tiny")
    assert await runner.lag() == 1  # stopped: it falls behind by exactly what it missed
    await store.close()


async def test_a_wait_for_a_restored_position_ends_with_the_restore(tmp_path: Path,
                                                                    request: pytest.FixtureRequest) -> None:
    """A runner restored at the head gets no event to apply; whoever waits for a position
    its snapshot holds must not wait for the next event (or the timeout)."""
    store = await open_store("sqlite", tmp_path, request)
    commands = CommandService(store)
    await commands.create_vm(ALICE, name="a", cores=1, ram="256MB", disk="1GB", image="tiny")
    runner = ProjectionRunner(store, commands.codec, ReadModels().all(), name="quiet")
    await runner.catch_up()
    await runner.save_snapshot()
    head = await store.head()
    restarted = ProjectionRunner(store, commands.codec, ReadModels().all(), name="quiet")
    waiting = asyncio.create_task(restarted.wait_for(head, timeout=600))
    await asyncio.sleep(0)  # the waiter waits before the restore
    await restarted.restore()
    assert restarted.position == head
    for _ in range(10):  # a few turns of the loop, no clock: the restore woke it, or nothing did
        await asyncio.sleep(0)
    try:
        assert waiting.done() and waiting.result()
    finally:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
    await store.close()


async def test_vm_and_host_rows_load_from_both_snapshot_shapes(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Schema 2 dumps the VM rows (and the hosts) as msgpack blobs; the rows of schema 1
    (plain objects) load to the same views."""
    store = await open_store("sqlite", tmp_path, request)
    commands = CommandService(store)
    host = (await up_host(commands, "h1", 64, "256GB", "10TB")).result
    for i in range(5):
        await commands.create_vm(ALICE, name=f"v{i}", cores=1, ram="256MB", disk="1GB", image="tiny")
    await commands.create_vm(Actor("bob"), name="b", cores=1, ram="256MB", disk="1GB", image="tiny")
    models = ReadModels()
    await ProjectionRunner(store, commands.codec, models.all(), name="shapes").catch_up()
    placed = next(iter(models.vms.by_id))
    await commands.place_vm(ADMIN, placed, host)
    await ProjectionRunner(store, commands.codec, models.all(), name="shapes").catch_up()
    assert models.vms.by_host == {host: {placed}}

    blob = msgspec.msgpack.decode(msgspec.msgpack.encode({"vms": models.vms.dump()}))["vms"]
    assert isinstance(blob, bytes)
    plain = msgspec.msgpack.decode(msgspec.msgpack.encode([msgspec.to_builtins(r) for r in models.vms.by_id.values()]))
    for data in (blob, plain):
        view = ReadModels().vms
        view.load(data)
        assert view.by_id == models.vms.by_id
        assert view.by_owner == models.vms.by_owner and view.by_host == models.vms.by_host

    hosts = msgspec.msgpack.decode(msgspec.msgpack.encode(models.hosts.dump()))
    assert isinstance(hosts["hosts"], bytes) and isinstance(hosts["versions"], bytes)
    plain_hosts = msgspec.msgpack.decode(msgspec.msgpack.encode({
        "hosts": [msgspec.to_builtins(h) for h in models.hosts.by_id.values()],
        "versions": {str(k): v for k, v in models.hosts.versions.items()}}))
    for data in (hosts, plain_hosts):
        loaded = ReadModels().hosts
        loaded.load(data)
        assert loaded.by_id == models.hosts.by_id and loaded.versions == models.hosts.versions
        assert loaded.by_id[host].claims == models.hosts.by_id[host].claims != {}
    await store.close()


def test_a_restore_pauses_the_cyclic_gc_and_gives_it_back() -> None:
    assert gc.isenabled()
    with no_cyclic_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError), no_cyclic_gc():
        raise ValueError("a snapshot that does not decode")
    assert gc.isenabled()  # given back after a failed restore too
    gc.disable()
    try:
        with no_cyclic_gc():
            pass
        assert not gc.isenabled()  # not switched on behind the back of whoever turned it off
    finally:
        gc.enable()
