"""NICs plugged into and out of a running tiny guest through QMP: the guest sees the new
NIC (virtio-net bound, link up, printed on its console) and loses the unplugged one."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest

from tests.support.qemu import (
    TINY_CACHE,
    host_tap,
    kill_leftovers,
    short_run_root,
    tiny_spec,
    wait_for_marker,
)
from ucloud.hostagent.hypervisor import NetworkInterface
from ucloud.hostagent.qemu import QemuDriver, RunRecord
from ucloud.hostagent.tinyguest import TinyGuest, ensure_tiny_guest

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.fixture(scope="session")
def guest() -> TinyGuest:
    return ensure_tiny_guest(TINY_CACHE)


@pytest.fixture
def run_root() -> Iterator[Path]:
    with short_run_root() as root:
        try:
            yield root
        finally:
            kill_leftovers(root)


@pytest.fixture
async def driver(run_root: Path) -> AsyncIterator[QemuDriver]:
    qemu = QemuDriver(run_root, accel="auto")
    yield qemu
    for vm_id in await qemu.list_running():
        await qemu.kill(vm_id)


async def wait_for_links(serial: Path, *macs: str, timeout: float = 90) -> None:
    """Until the guest's latest UCLOUD-LINKS line names exactly these MACs (the guest names
    its NICs itself: a NIC plugged into a freed slot may take a freed name)."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        # The watcher's lines may share a console line with the shell's prompt.
        lines = [m.group(0).strip() for m in re.finditer(r"UCLOUD-LINKS[^\r\n]*", serial.read_text(errors="replace"))]
        last = lines[-1] if lines else ""
        if sorted(item.split("=")[1] for item in last.split()[1:]) == sorted(macs):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"the guest's NICs are {last!r}, not {macs}")


async def test_a_nic_is_hot_plugged_and_unplugged_in_a_running_guest(guest: TinyGuest, driver: QemuDriver) -> None:
    vm_id = uuid.uuid4()
    # Not "uct...": a host agent running on this machine removes the uct* links it does
    # not know, and these taps belong to no agent.
    first = NetworkInterface(tap=f"tst{vm_id.hex[:8]}a", mac="02:00:5e:10:00:0a")
    second = NetworkInterface(tap=f"tst{vm_id.hex[:8]}b", mac="02:00:5e:10:00:0b")
    with host_tap(first.tap), host_tap(second.tap):
        await driver.start(tiny_spec(guest, vm_id=vm_id, interfaces=(first,)))
        serial = driver.serial_log_path(vm_id)
        await wait_for_marker(serial)
        await wait_for_links(serial, first.mac)

        await driver.attach_interface(vm_id, second)
        await driver.attach_interface(vm_id, second)  # again: nothing more
        await wait_for_links(serial, first.mac, second.mac)
        assert await driver.interfaces(vm_id) == (first, second)

        await driver.detach_interface(vm_id, first.tap)
        await wait_for_links(serial, second.mac)
        assert await driver.interfaces(vm_id) == (second,)
        # What a restarted agent reads back: the NICs the guest has now, on their slots.
        record = msgspec.json.decode((driver.run_dir(vm_id) / "vm.json").read_bytes(), type=RunRecord)
        assert record.spec.interfaces == (second,) and record.nic_slots == {second.tap: 1}
        # The freed slot is taken again by the next NIC.
        await driver.attach_interface(vm_id, first)
        record = msgspec.json.decode((driver.run_dir(vm_id) / "vm.json").read_bytes(), type=RunRecord)
        assert record.nic_slots == {second.tap: 1, first.tap: 0}
        await wait_for_links(serial, first.mac, second.mac)
