"""The host agent reads its slice of the log, not the log: its reading grows with its own
VMs; restarted, it resumes from its own snapshot and reads only what came after."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import pytest

from tests.support.hosts import up_host
from tests.support.qemu import short_run_root
from ucloud.commands.aggregates import HOST
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import SYSTEM, Actor
from ucloud.domain import host as host_domain
from ucloud.eventstore.leases import leases_for
from ucloud.eventstore.sqlite import SqliteEventStore
from ucloud.hostagent.agent import Capacity, HostAgent
from ucloud.hostagent.images import ImageCatalogue
from ucloud.hostagent.qemu import QemuDriver
from ucloud.hostagent.writes import DirectWrites

GiB = 1024**3
ALICE = Actor("alice")


async def run_until_up(agent: HostAgent, commands: CommandService) -> asyncio.Task[None]:
    task = asyncio.create_task(agent.run())
    for _ in range(1200):  # up to a minute on a loaded machine
        host = (await commands.repository.load(HOST, host_domain.stream_name(agent.host_id))).state
        if (host is not None and host.status is host_domain.HostStatus.UP and agent.session
                and host.session == agent.session and agent.live):
            await agent.runner.wait_for(await commands.store.head(), 10)
            return task
        await asyncio.sleep(0.05)
    if task.done():
        task.result()
    raise AssertionError("the agent did not come up")


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_an_agent_reads_its_slice_and_resumes_from_its_snapshot(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ucloud.hostagent.agent")
    store = SqliteEventStore(tmp_path / "events.sqlite")
    commands = CommandService(store)
    other = (await up_host(commands, "other", 64, "256GB", "10TB")).result
    for i in range(60):  # a busy log about another host
        vm = (await commands.create_vm(ALICE, name=f"v{i}", cores=1, ram="256MB", disk="1GB", image="tiny")).result
        await commands.place_vm(SYSTEM, vm, other)
    with short_run_root() as root:
        def agent() -> HostAgent:
            return HostAgent(commands.store, DirectWrites(commands, "me"), QemuDriver(root / "run", accel="tcg"),
                             ImageCatalogue(root / "images"),
                             state_dir=root, hostname="me", capacity=Capacity(cores=4, ram=8 * GiB, disk=50 * GiB),
                             leases=leases_for(store), resync_interval=0.2)

        first = agent()
        task = await run_until_up(first, commands)
        head = await store.head()
        assert head > 180
        # Its registration and its host.up: nothing of the 60 VMs elsewhere.
        assert 2 <= first.read <= 5, first.read
        for _ in range(1200):
            if first.passes:
                break
            await asyncio.sleep(0.05)
        # The end of its start is in its log, with what it read (tests/bench/bench_startup.py reads it).
        assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("reconciled:")] == [
            f"reconciled: first pass over the 0 VMs of this host done, {first.read} events read since the start"]
        await stop(task)  # saves its snapshot on the way out

        for i in range(20):  # more of the log that is not ours
            vm = (await commands.create_vm(ALICE, name=f"w{i}", cores=1, ram="256MB", disk="1GB",
                                           image="tiny")).result
            await commands.place_vm(SYSTEM, vm, other)
        second = agent()
        task = await run_until_up(second, commands)
        assert second.runner.position >= head  # restored from the snapshot, not from 0
        assert 1 <= second.read <= 3, second.read
        await stop(task)
    await leases_for(store).close()
    await store.close()
