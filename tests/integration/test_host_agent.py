"""The host agent with real QEMU guests: crashes, restart policies, reboots, failed
starts and guests that power themselves off, each reported to the log."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import pytest

from tests.support.qemu import (
    TINY_CACHE,
    console_send,
    markers,
    qemu_processes,
    short_run_root,
    wait_for_marker,
)
from ucloud.commands.service import HOST_IMAGES, CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.domain import vm as vm_domain
from ucloud.eventstore.leases import leases_for
from ucloud.eventstore.sqlite import SqliteEventStore
from ucloud.hostagent.agent import Capacity, HostAgent
from ucloud.hostagent.images import ImageCatalogue
from ucloud.hostagent.qemu import QemuDriver
from ucloud.hostagent.writes import DirectWrites
from ucloud.processes.scheduler import Scheduler

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

ALICE = Actor("alice")
GiB = 1024**3


@dataclass
class Host:
    commands: CommandService
    agent: HostAgent
    driver: QemuDriver
    store: SqliteEventStore

    async def create(self, restart_policy: str = "always", image: str = "tiny") -> UUID:
        outcome = await self.commands.create_vm(ALICE, name="g", cores=1, ram="128MB", disk="256MB", image=image,
                                                restart_policy=restart_policy)
        return outcome.result

    async def types(self, vm_id: UUID) -> list[str]:
        return [r.type for r in await self.store.read_stream(f"vm-{vm_id}")]

    async def wait_for_events(self, vm_id: UUID, expected: list[str], timeout: float = 90) -> list[str]:
        """Until the VM's stream ends with ``expected``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            types = await self.types(vm_id)
            if types[-len(expected):] == expected:
                return types
            if loop.time() > deadline:
                raise AssertionError(f"VM {vm_id} events {types}, expected them to end with {expected}")
            await asyncio.sleep(0.2)

    def serial(self, vm_id: UUID) -> Path:
        return self.driver.serial_log_path(vm_id)


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    store = SqliteEventStore(tmp_path / "events.sqlite")
    # "no-such-image": a name the command side takes as provided by the hosts, which this
    # host does not have (the start fails on the host, with the reason).
    commands = CommandService(store, host_images=HOST_IMAGES | {"no-such-image"})
    with short_run_root() as root:
        images = ImageCatalogue(root / "images")
        await asyncio.to_thread(images.install_tiny, TINY_CACHE)
        driver = QemuDriver(root / "run", accel="tcg")
        agent = HostAgent(commands.store, DirectWrites(commands, "agent-test"), driver, images, state_dir=root,
                          hostname="agent-test",
                          capacity=Capacity(cores=4, ram=8 * GiB, disk=50 * GiB), resync_interval=0.5,
                          stop_timeout=10, leases=leases_for(store))
        tasks = [asyncio.create_task(agent.run()), asyncio.create_task(Scheduler(commands).run())]
        try:
            yield Host(commands, agent, driver, store)
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for vm_dir in (root / "run").glob("*"):
                for pid in qemu_processes(UUID(vm_dir.name)):
                    os.kill(pid, signal.SIGKILL)
            await store.close()


async def test_a_crashed_guest_is_reported_and_restarted_under_policy_always(host: Host) -> None:
    vm_id = await host.create("always")
    await host.wait_for_events(vm_id, ["vm.started"])
    await wait_for_marker(host.serial(vm_id))
    (pid,) = qemu_processes(vm_id)
    os.kill(pid, signal.SIGKILL)
    types = await host.wait_for_events(vm_id, ["vm.crashed", "vm.started"])
    assert types.count("vm.started") == 2
    (crash,) = [r for r in await host.store.read_stream(f"vm-{vm_id}") if r.type == "vm.crashed"]
    assert b"crash" in crash.data or b"killed" in crash.data or b"signal" in crash.data
    await wait_for_marker(host.serial(vm_id))  # the new guest boots
    (new_pid,) = qemu_processes(vm_id)
    assert new_pid != pid


async def test_a_crashed_guest_stays_down_under_policy_never(host: Host) -> None:
    vm_id = await host.create("never")
    await host.wait_for_events(vm_id, ["vm.started"])
    await wait_for_marker(host.serial(vm_id))
    (pid,) = qemu_processes(vm_id)
    os.kill(pid, signal.SIGKILL)
    await host.wait_for_events(vm_id, ["vm.crashed"])
    await asyncio.sleep(2)  # several reconcile passes
    assert (await host.types(vm_id))[-1] == "vm.crashed"
    assert qemu_processes(vm_id) == []
    # The owner starts it again by hand.
    await host.commands.vm_command(ALICE, vm_domain.StartVm(vm_id=vm_id))
    await host.wait_for_events(vm_id, ["vm.start_requested", "vm.started"])
    assert len(qemu_processes(vm_id)) == 1


async def test_reboot_resets_the_guest_and_is_reported_once(host: Host) -> None:
    vm_id = await host.create()
    await host.wait_for_events(vm_id, ["vm.started"])
    await wait_for_marker(host.serial(vm_id))
    (pid,) = qemu_processes(vm_id)
    await host.commands.vm_command(ALICE, vm_domain.RebootVm(vm_id=vm_id))
    await host.wait_for_events(vm_id, ["vm.reboot_requested", "vm.rebooted"])
    await wait_for_marker(host.serial(vm_id), count=2)  # the same QEMU booted the guest again
    assert qemu_processes(vm_id) == [pid]
    await asyncio.sleep(1.5)
    assert (await host.types(vm_id)).count("vm.rebooted") == 1


async def test_a_missing_image_fails_the_start_with_its_reason(host: Host) -> None:
    # debian-12 is an image operators place on hosts themselves (commands.service.HOST_IMAGES):
    # the command side accepts it, and this host does not have it. (A name that is neither
    # that nor in the catalogue is refused at creation: tests/integration/test_images_*.)
    assert not host.agent.images.root.joinpath("debian-12", "disk.qcow2").exists()
    vm_id = await host.create(image="debian-12")
    await host.wait_for_events(vm_id, ["vm.failed"], timeout=30)
    (failed,) = [r for r in await host.store.read_stream(f"vm-{vm_id}") if r.type == "vm.failed"]
    assert b"debian-12" in failed.data
    assert qemu_processes(vm_id) == []


async def test_a_guest_that_powers_itself_off_is_stopped_not_crashed(host: Host) -> None:
    vm_id = await host.create("always")
    await host.wait_for_events(vm_id, ["vm.started"])
    await wait_for_marker(host.serial(vm_id))
    console_send(host.driver.console_path(vm_id), "poweroff -f")
    types = await host.wait_for_events(vm_id, ["vm.stopped"])
    assert "vm.crashed" not in types
    await asyncio.sleep(1.5)  # policy "always" restarts crashes, not a guest's own shutdown
    assert qemu_processes(vm_id) == [] and markers(host.serial(vm_id)) >= 1
