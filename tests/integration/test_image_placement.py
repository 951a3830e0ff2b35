"""Placement knows where images are: a VM whose disk is a clone of a catalogued image goes
only to a host that reaches the image's store (the scheduler, on a real SQLite log)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from uuid import UUID

from tests.support.hosts import up_host
from ucloud.commands.aggregates import VM
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import SYSTEM, Actor
from ucloud.domain import image as image_domain
from ucloud.domain import vm as vm_domain
from ucloud.domain.errors import Rejected
from ucloud.domain.host import host_id_for
from ucloud.eventstore.sqlite import SqliteEventStore
from ucloud.processes.scheduler import Scheduler

ALICE = Actor("alice")
GiB = 1 << 30


async def _state(commands: CommandService, vm_id: UUID, wanted: vm_domain.Status) -> vm_domain.Vm:
    for _ in range(400):
        vm = (await commands.repository.load(VM, vm_domain.stream_name(vm_id))).state
        if vm is not None and vm.status is wanted:
            return vm
        await asyncio.sleep(0.05)
    raise AssertionError(f"VM {vm_id} did not become {wanted}")


async def test_a_vm_goes_only_to_a_host_that_reaches_its_images_store(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "events.sqlite")
    commands = CommandService(store, image_stores=("ceph", "local"))
    try:
        # The roomier host does not reach the store: spread would choose it for a tiny VM.
        await up_host(commands, "big", 64, "256GiB", "10TiB")
        await commands.record_file(ALICE, "d.qcow2", 10, "a" * 64)
        created = await commands.create_image(ALICE, "deb", "d.qcow2", store="ceph")
        await commands.report_image(SYSTEM, image_domain.ReportImported(
            image_id=created.result, virtual_size=GiB, stored_size=10, location="rbd/image"))
        scheduler = Scheduler(commands)
        task = asyncio.create_task(scheduler.run())
        try:
            vm = await commands.create_vm(ALICE, name="web", cores=1, ram="256MiB", disk="2GiB", image="deb")
            refused = await _state(commands, vm.result, vm_domain.Status.UNSCHEDULABLE)
            assert "no host reaches image store 'ceph'" in refused.reason
            tiny = await commands.create_vm(ALICE, name="t", cores=1, ram="256MiB", disk="1GiB", image="tiny")
            assert (await _state(commands, tiny.result, vm_domain.Status.SCHEDULED)).host_id is not None

            small = await commands.register_host(SYSTEM, "small", 2, "4GiB", "100GiB", stores=("ceph",))
            await commands.mark_host_up(SYSTEM, small.result, 1, 3.0)
            placed = await _state(commands, vm.result, vm_domain.Status.SCHEDULED)
            assert placed.host_id == small.result
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # The command side checks it too, whatever a scheduler's view said.
        other = await commands.create_vm(ALICE, name="web2", cores=1, ram="256MiB", disk="2GiB", image="deb")
        try:
            await commands.place_vm(SYSTEM, other.result, host_id_for("big"))
        except Rejected as error:
            assert "does not reach image store 'ceph'" in str(error)
        else:
            raise AssertionError("a placement on a host without the image's store was accepted")
    finally:
        await store.close()
