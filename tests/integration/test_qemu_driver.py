"""The QEMU driver against real guests: the tiny Debian-kernel + busybox guest under TCG.

Boots are ~5-10 s each under TCG, so one guest walks through the long lifecycle
(boot, console, reboot, adoption by a second driver, stop) and the other tests
boot only where the behaviour needs a fresh process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest

from tests.support.qemu import (
    TINY_CACHE,
    console_send,
    host_tap,
    kill_leftovers,
    markers,
    pid_alive,
    qemu_img_info,
    qemu_processes,
    short_run_root,
    tiny_spec,
    wait_for_marker,
    wait_for_pattern,
)
from ucloud.hostagent import tinyguest
from ucloud.hostagent.hypervisor import (
    MIB,
    DiskError,
    ExitReason,
    NetworkInterface,
    VmAlreadyRunning,
    VmNotRunning,
    VmStartError,
    VmState,
)
from ucloud.hostagent.qemu import QemuDriver, RunRecord, detect_accelerator, probe_kvm
from ucloud.hostagent.tinyguest import TinyGuest, ensure_tiny_guest

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.fixture(scope="session")
def guest() -> TinyGuest:
    """The tiny guest, built once into the stable cache (reruns reuse it)."""
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
    # accel="auto": the driver probes (cached per host boot) and must pick TCG here.
    qemu = QemuDriver(run_root, accel="auto")
    yield qemu
    for vm_id in await qemu.list_running():
        await qemu.kill(vm_id)


def _cpio_names(initrd: Path) -> set[str]:
    """File names in a gzip'd newc cpio archive (parsed here: there is no cpio binary)."""
    import gzip

    data = gzip.decompress(initrd.read_bytes())
    names, offset = set(), 0
    while offset + 110 <= len(data):
        header = data[offset : offset + 110]
        assert header[:6] == b"070701", f"not a newc archive at {offset}"
        size = int(header[54:62], 16)
        name_size = int(header[94:102], 16)
        name = data[offset + 110 : offset + 110 + name_size - 1].decode()
        if name == "TRAILER!!!":
            break
        names.add(name.removeprefix("./"))
        offset = (offset + 110 + name_size + 3) & ~3
        offset = (offset + size + 3) & ~3
    return names


# --------------------------------------------------------------------------- #
# The builder


def test_tiny_guest_is_built_with_kernel_initramfs_and_base_disk(guest: TinyGuest) -> None:
    assert guest.kernel.stat().st_size > 1_000_000
    names = _cpio_names(guest.initrd)
    assert {"init", "bin/busybox", "etc/inittab", "etc/acpi/PWRF/00000080"} <= names
    for module in tinyguest.VIRTIO_MODULES + ("virtio_blk",):
        assert f"lib/modules/{module}.ko" in names
    assert not any(n.endswith(".xz") for n in names)
    info = qemu_img_info(guest.disk_image)
    assert info["format"] == "qcow2" and info["virtual-size"] == 64 * MIB
    # A second call finds the build in place and rebuilds nothing.
    before = guest.initrd.stat().st_mtime_ns
    again = ensure_tiny_guest(TINY_CACHE)
    assert again == guest and guest.initrd.stat().st_mtime_ns == before


def test_tiny_guest_is_rebuilt_when_the_recipe_changes(
    guest: TinyGuest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A copy of the built cache (hard links: no second download, no first build).
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True)
    for deb in (TINY_CACHE / "debs").glob("*.deb"):
        os.link(deb, cache / "debs" / deb.name)
    for path in (guest.kernel, guest.initrd, guest.disk_image, TINY_CACHE / "manifest.json"):
        os.link(path, cache / path.name)
    first = ensure_tiny_guest(cache)
    assert first.version == guest.version and first.initrd == cache / guest.initrd.name
    monkeypatch.setattr(tinyguest, "RECIPE_VERSION", tinyguest.RECIPE_VERSION + 1)
    second = ensure_tiny_guest(cache)
    assert second.version != first.version
    assert second.initrd != first.initrd and second.initrd.is_file()
    assert not first.initrd.exists()  # the stale build is gone
    assert second.disk_image == first.disk_image  # the base disk is never replaced
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["version"] == second.version


def test_builder_cli_prints_the_image(guest: TinyGuest) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ucloud.hostagent.tinyguest",
            "--cache",
            str(TINY_CACHE),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"kernel:  {guest.kernel}" in done.stdout
    assert f"initrd:  {guest.initrd}" in done.stdout


# --------------------------------------------------------------------------- #
# Accelerator detection


async def test_kvm_detection_gives_a_definite_answer_without_hanging(guest: TinyGuest) -> None:
    probe = await detect_accelerator(guest, force=True, timeout=20)
    assert probe.accel in ("kvm", "tcg") and probe.reason
    if os.path.exists("/dev/kvm") and probe.accel == "tcg":
        # /dev/kvm exists but does not boot a guest (here: the paravirtual kvm_pvm).
        assert "exited" in probe.reason or "within" in probe.reason
    # Cached: asking again returns the same verdict without another boot.
    assert await detect_accelerator(guest) == probe


async def test_a_hanging_kvm_guest_is_cut_off_by_the_timeout(guest: TinyGuest) -> None:
    # With the default CPU model a stock kernel hangs on this host's kvm_pvm device;
    # on a host where KVM works the guest boots and the probe says kvm.
    probe = await probe_kvm(guest, cpu="qemu64", timeout=4)
    assert probe.accel in ("kvm", "tcg")
    if not os.path.exists("/dev/kvm"):
        assert probe.reason == "/dev/kvm does not exist"
    elif probe.accel == "tcg":
        assert "within 4s" in probe.reason or "exited" in probe.reason


# --------------------------------------------------------------------------- #
# One guest through its life


async def test_guest_boots_reboots_is_adopted_and_stops(
    guest: TinyGuest, driver: QemuDriver, run_root: Path
) -> None:
    vm_id = uuid.uuid4()
    disk = await driver.create_disk(
        guest.disk_image, run_root / "disks" / f"{vm_id}.qcow2", 128 * MIB
    )
    tap = f"uct{vm_id.hex[:8]}"
    nic = NetworkInterface(tap=tap, mac="02:00:5e:10:00:01")
    with host_tap(tap):
        spec = tiny_spec(guest, vm_id=vm_id, disk=disk, interfaces=(nic,))
        handle = await driver.start(spec)
        assert handle.started and handle.accel == await driver.accelerator()
        serial = driver.serial_log_path(vm_id)

        await wait_for_marker(serial, 1)
        status = await driver.status(vm_id)
        assert status.state is VmState.RUNNING and status.pid == handle.pid

        # The overlay disk and the NIC show up inside the guest.
        console_send(driver.console_path(vm_id), "echo VDA=$(cat /sys/block/vda/size)")
        assert (await wait_for_pattern(serial, r"VDA=(\d+)")).group(1) == str(128 * MIB // 512)
        console_send(driver.console_path(vm_id), "echo MAC=$(cat /sys/class/net/eth0/address)")
        assert (await wait_for_pattern(serial, r"MAC=([0-9a-f:]{17})")).group(1) == nic.mac
        assert driver.vnc_socket_path(vm_id).is_socket()

        # A disk in use cannot be deleted.
        with pytest.raises(DiskError, match="in use"):
            await driver.delete_disk(disk)

        # Reboot: the guest comes up a second time in the same QEMU process.
        await driver.reboot(vm_id)
        await wait_for_marker(serial, 2)
        assert (await driver.status(vm_id)).pid == handle.pid

        # A restarted agent (a new driver on the same run root) adopts the guest.
        adopter = QemuDriver(run_root, accel="tcg")
        assert await adopter.list_running() == [vm_id]
        adopted = await adopter.status(vm_id)
        assert adopted.state is VmState.RUNNING and adopted.pid == handle.pid
        again = await adopter.start(spec)
        assert not again.started and again.pid == handle.pid
        assert qemu_processes(vm_id) == [handle.pid]
        bigger = msgspec.structs.replace(spec, ram_bytes=512 * MIB)
        with pytest.raises(VmAlreadyRunning, match="different spec"):
            await adopter.start(bigger)

        # QEMU itself refuses a second copy on the same run directory (pid file lock).
        record = msgspec.json.decode(
            (driver.run_dir(vm_id) / "vm.json").read_bytes(), type=RunRecord
        )
        second = await asyncio.to_thread(
            subprocess.run, record.argv, capture_output=True, text=True, timeout=30
        )
        assert second.returncode != 0 and "pid file" in second.stderr
        assert qemu_processes(vm_id) == [handle.pid]
        assert (await adopter.status(vm_id)).state is VmState.RUNNING

        # Stop through the adopter: ACPI power button, the guest powers off.
        stopped = await adopter.stop(vm_id, timeout=60)
        assert stopped.state is VmState.STOPPED
        assert stopped.exit_reason is ExitReason.STOPPED_BY_HOST
        assert "powered off" in stopped.detail
        assert qemu_processes(vm_id) == [] and not pid_alive(handle.pid)
        # The original driver (the QEMU's parent) sees the same ending.
        assert (await driver.status(vm_id)).exit_reason is ExitReason.STOPPED_BY_HOST
        assert await driver.list_running() == []

    # Idempotent on a stopped VM; reboot needs a running one.
    assert (await driver.stop(vm_id)).exit_reason is ExitReason.STOPPED_BY_HOST
    assert (await driver.kill(vm_id)).exit_reason is ExitReason.STOPPED_BY_HOST
    with pytest.raises(VmNotRunning):
        await driver.reboot(vm_id)

    await driver.delete_disk(disk)
    assert not disk.exists()
    await driver.delete_disk(disk)  # deleting again is a no-op
    await driver.remove(vm_id)
    assert (await driver.status(vm_id)).state is VmState.ABSENT


# --------------------------------------------------------------------------- #
# How a guest ends


async def test_sigkilled_qemu_is_reported_crashed(guest: TinyGuest, driver: QemuDriver) -> None:
    spec = tiny_spec(guest)
    handle = await driver.start(spec)
    os.kill(handle.pid, signal.SIGKILL)
    # A fresh driver (no child bookkeeping) works it out from the run directory alone.
    fresh = QemuDriver(driver.run_root, accel="tcg")
    status = await fresh.wait_exit(spec.vm_id, timeout=10)
    assert status.state is VmState.CRASHED and status.exit_reason is ExitReason.CRASHED
    assert "without a shutdown" in status.detail
    assert await fresh.list_running() == []
    assert (await driver.status(spec.vm_id)).exit_reason is ExitReason.CRASHED


async def test_qemu_terminated_by_someone_else_is_reported_crashed(
    guest: TinyGuest, driver: QemuDriver
) -> None:
    spec = tiny_spec(guest)
    handle = await driver.start(spec)
    os.kill(handle.pid, signal.SIGTERM)
    status = await driver.wait_exit(spec.vm_id, timeout=10)
    assert status.exit_reason is ExitReason.CRASHED
    assert "signal that ucloud did not send" in status.detail
    assert status.exit_code == 0  # QEMU exits cleanly on SIGTERM; the log says why


async def test_guest_poweroff_is_reported_as_guest_shutdown(
    guest: TinyGuest, driver: QemuDriver
) -> None:
    spec = tiny_spec(guest)
    await driver.start(spec)
    await wait_for_marker(driver.serial_log_path(spec.vm_id))
    console_send(driver.console_path(spec.vm_id), "poweroff")
    status = await driver.wait_exit(spec.vm_id, timeout=60)
    assert status.state is VmState.STOPPED
    assert status.exit_reason is ExitReason.GUEST_SHUTDOWN


async def test_stop_forces_a_guest_that_ignores_the_power_button(
    guest: TinyGuest, driver: QemuDriver
) -> None:
    spec = tiny_spec(guest)
    await driver.start(spec)
    # Still booting: no ACPI daemon yet, so the button press goes unanswered.
    status = await driver.stop(spec.vm_id, timeout=0.5)
    assert status.exit_reason is ExitReason.STOPPED_BY_HOST
    assert status.detail.startswith("forced")
    assert qemu_processes(spec.vm_id) == []
    assert markers(driver.serial_log_path(spec.vm_id)) == 0


async def test_restart_after_stop_starts_a_fresh_console_log(
    guest: TinyGuest, driver: QemuDriver
) -> None:
    spec = tiny_spec(guest)
    first = await driver.start(spec)
    await driver.kill(spec.vm_id)
    second = await driver.start(spec)
    assert second.started and second.pid != first.pid
    status = await driver.status(spec.vm_id)
    assert status.state is VmState.RUNNING and status.exit_reason is None
    assert (driver.run_dir(spec.vm_id) / "serial.log.1").exists()


# --------------------------------------------------------------------------- #
# Failures to start


async def test_start_with_a_missing_disk_or_tap_fails_clearly(
    guest: TinyGuest, driver: QemuDriver, run_root: Path
) -> None:
    with pytest.raises(VmStartError, match="disk .* does not exist"):
        await driver.start(tiny_spec(guest, disk=run_root / "nope.qcow2"))
    nic = NetworkInterface(tap="uc-missing0", mac="02:00:00:00:00:09")
    with pytest.raises(VmStartError, match="tap uc-missing0 does not exist"):
        await driver.start(tiny_spec(guest, interfaces=(nic,)))
    assert await driver.list_running() == []


async def test_qemu_refusing_to_start_surfaces_its_message(
    guest: TinyGuest, driver: QemuDriver, run_root: Path
) -> None:
    bogus = run_root / "garbage.qcow2"
    bogus.write_bytes(b"this is not a qcow2 image" * 100)
    spec = tiny_spec(guest, disk=bogus)
    with pytest.raises(VmStartError, match="exited with status 1 while starting: .*qcow2"):
        await driver.start(spec)
    assert (await driver.status(spec.vm_id)).state is VmState.CRASHED
    assert qemu_processes(spec.vm_id) == []


# --------------------------------------------------------------------------- #
# Disks


async def test_disk_overlay_and_copy(guest: TinyGuest, driver: QemuDriver, run_root: Path) -> None:
    overlay = await driver.create_disk(guest.disk_image, run_root / "d" / "a.qcow2")
    info = await asyncio.to_thread(qemu_img_info, overlay)
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == str(guest.disk_image)
    assert info["virtual-size"] == 64 * MIB

    copy = await driver.create_disk(
        guest.disk_image, run_root / "d" / "b.qcow2", 96 * MIB, linked=False
    )
    info = await asyncio.to_thread(qemu_img_info, copy)
    assert "backing-filename" not in info and info["virtual-size"] == 96 * MIB

    with pytest.raises(DiskError, match="already exists"):
        await driver.create_disk(guest.disk_image, overlay)
    with pytest.raises(DiskError, match="does not exist"):
        await driver.create_disk(run_root / "no-image.qcow2", run_root / "d" / "c.qcow2")
    with pytest.raises(DiskError, match="smaller than image"):
        await driver.create_disk(guest.disk_image, run_root / "d" / "c.qcow2", 1 * MIB)
    with pytest.raises(DiskError, match="must be absolute"):
        await driver.create_disk(guest.disk_image, Path("relative.qcow2"))
    await driver.delete_disk(overlay)
    await driver.delete_disk(copy)
    assert not overlay.exists() and not copy.exists()
    assert guest.disk_image.exists()
