"""The Ceph RBD image store on a real single-node Ceph (one per session): the image scanner
imports a BIOS-bootable qcow2 made from the tiny guest into the pool, a VM disk is a
copy-on-write clone of the image's protected snapshot, a real TCG guest boots from that
clone through QEMU's rbd driver, and removing the clone leaves the image."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from tests.support.bootdisk import build_boot_disk
from tests.support.ceph import CephCluster
from tests.support.qemu import short_run_root
from ucloud.commands.aggregates import IMAGE
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.domain import image as image_domain
from ucloud.domain.limits import GiB, MiB
from ucloud.eventstore.sqlite import SqliteEventStore
from ucloud.hostagent.hypervisor import VmSpec
from ucloud.hostagent.qemu import QemuDriver
from ucloud.hostagent.tinyguest import MARKER, ensure_tiny_guest
from ucloud.imagestore.rbd import RbdStore
from ucloud.processes.files import hash_file
from ucloud.processes.images import ImageScanner

pytestmark = [pytest.mark.ceph, pytest.mark.qemu, pytest.mark.slow]
ALICE = Actor("alice")


async def test_an_image_imported_into_rbd_boots_a_guest_from_its_clone(ceph: CephCluster, tmp_path: Path) -> None:
    files = tmp_path / "files"
    (files / "alice").mkdir(parents=True)
    boot = await asyncio.to_thread(build_boot_disk, ensure_tiny_guest(), tmp_path / "build")
    source = files / "alice" / "boot.qcow2"
    boot.rename(source)
    log = SqliteEventStore(tmp_path / "events.sqlite")
    commands = CommandService(log, image_stores=("ceph",))
    store = RbdStore("ceph", ceph.pool, ceph.conf)
    try:
        hashed = hash_file(source)
        assert hashed is not None
        await commands.record_file(ALICE, "boot.qcow2", hashed[0], hashed[1], signature=hashed[2])
        created = await commands.create_image(ALICE, "own-os", "boot.qcow2", store="ceph")
        image = (await commands.repository.load(IMAGE, image_domain.stream_name(created.result))).state
        assert image is not None
        scanner = ImageScanner(commands, {"ceph": store}, files)
        report = await scanner.import_image(image)
        assert isinstance(report, image_domain.ReportImported), report
        name = f"image-{image.id}"
        assert report.location == f"{ceph.pool}/{name}"
        assert ceph.images() == [name]  # nothing partial left
        snaps = json.loads(ceph.rbd("snap", "ls", "--format=json", f"{ceph.pool}/{name}"))
        assert [s["name"] for s in snaps] == ["base"]
        assert "protected: True" in ceph.rbd("info", f"{ceph.pool}/{name}@base")

        vm_id = uuid.uuid4()
        with short_run_root() as root:
            disk = await store.clone(report.location, vm_id, GiB, root / "disks")
            assert disk.format == "raw" and disk.path.startswith(f"rbd:{ceph.pool}/vm-{vm_id}:")
            info = ceph.rbd("info", f"{ceph.pool}/vm-{vm_id}")
            assert f"parent: {ceph.pool}/{name}@base" in info and "size 1 GiB" in info
            driver = QemuDriver(root / "run", accel="tcg")
            await driver.start(VmSpec(vm_id=vm_id, name="rbd-guest", cores=1, ram_bytes=256 * MiB,
                                      disk_path=disk.path, disk_format=disk.format))
            try:
                serial = driver.serial_log_path(vm_id)
                for _ in range(600):
                    if serial.exists() and MARKER in serial.read_text(errors="replace"):
                        break
                    await asyncio.sleep(0.25)
                else:
                    raise AssertionError("the guest did not boot from its RBD clone:\n"
                                         + (serial.read_text(errors="replace") if serial.exists() else ""))
                await driver.resize_disk(vm_id, 2 * GiB)  # grown online, through QMP, on RBD too
                assert await store.clone_size(vm_id, root / "disks") == 2 * GiB
            finally:
                # A clean stop closes the disk (a killed QEMU's watch on it lingers ~30 s).
                await driver.stop(vm_id, timeout=5)
                await driver.remove(vm_id)
            await store.remove_clone(vm_id, root / "disks")
        assert ceph.images() == [name]  # the clone went, the image stayed
        await store.remove(image.id, report.location)
        assert ceph.images() == []
    finally:
        await log.close()
