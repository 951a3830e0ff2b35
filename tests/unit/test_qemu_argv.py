"""The QEMU command line and the VM spec, checked without booting anything."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import msgspec
import pytest

from ucloud.hostagent.hypervisor import (
    MIB,
    InvalidSpec,
    NetworkInterface,
    VmNotRunning,
    VmSpec,
    VmState,
    VmStatus,
)
from ucloud.hostagent.qemu import QemuDriver, _lock_holder, build_argv, kvm_device_usable

RUN = Path("/run/ucloud/vms/x")


def spec(**overrides: object) -> VmSpec:
    fields: dict[str, object] = {
        "vm_id": uuid.UUID("6f1c5a4e-8d0b-4c57-9e55-0f3d2a1b7c9e"),
        "name": "web-1",
        "cores": 2,
        "ram_bytes": 512 * MIB,
        "disk_path": "/var/lib/ucloud/disks/web-1.qcow2",
    }
    fields.update(overrides)
    return VmSpec(**fields)  # type: ignore[arg-type]


def values_of(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


def test_tcg_command_line_uses_tcg_and_a_unix_socket_vnc_only() -> None:
    argv = build_argv(spec(), RUN, "tcg")
    assert values_of(argv, "-accel") == ["tcg"]
    assert "-enable-kvm" not in argv
    assert values_of(argv, "-cpu") == ["max"]
    assert values_of(argv, "-vnc") == [f"unix:{RUN}/vnc.sock"]
    # No TCP VNC in any form: no host:display, no websocket, no vnc display.
    assert not any("websocket" in arg or arg.startswith("vnc") for arg in argv)
    assert values_of(argv, "-display") == ["none"]


def test_kvm_command_line_uses_kvm_with_the_host_cpu() -> None:
    argv = build_argv(spec(), RUN, "kvm")
    assert values_of(argv, "-accel") == ["kvm"]
    assert values_of(argv, "-cpu") == ["host"]


def test_command_line_carries_size_identity_and_control_sockets() -> None:
    vm = spec()
    argv = build_argv(vm, RUN, "tcg")
    assert values_of(argv, "-smp") == ["2"]
    assert values_of(argv, "-m") == ["512M"]
    assert values_of(argv, "-uuid") == [str(vm.vm_id)]
    assert values_of(argv, "-pidfile") == [f"{RUN}/pid"]
    assert "-daemonize" not in argv and "-nodefaults" in argv
    chardevs = values_of(argv, "-chardev")
    assert f"socket,id=qmp,path={RUN}/qmp.sock,server=on,wait=off" in chardevs
    assert any(c.startswith(f"socket,id=console,path={RUN}/console.sock") for c in chardevs)
    assert any(f"logfile={RUN}/serial.log" in c for c in chardevs)
    assert values_of(argv, "-serial") == ["chardev:console"]
    assert "-no-reboot" not in argv  # reboot must work


def test_disk_and_direct_kernel_boot_and_nics() -> None:
    nics = (
        NetworkInterface(tap="uc-a1", mac="02:00:00:00:00:01"),
        NetworkInterface(tap="uc-a2", mac="02:00:00:00:00:02"),
    )
    vm = spec(kernel="/k/vmlinuz", initrd="/k/initrd", append="console=ttyS0", interfaces=nics)
    argv = build_argv(vm, RUN, "tcg")
    assert values_of(argv, "-kernel") == ["/k/vmlinuz"]
    assert values_of(argv, "-initrd") == ["/k/initrd"]
    assert values_of(argv, "-append") == ["console=ttyS0"]
    assert values_of(argv, "-drive") == [
        "file=/var/lib/ucloud/disks/web-1.qcow2,if=none,id=disk0,format=qcow2,discard=unmap"
    ]
    assert values_of(argv, "-netdev") == [
        "tap,id=net-uc-a1,ifname=uc-a1,script=no,downscript=no",
        "tap,id=net-uc-a2,ifname=uc-a2,script=no,downscript=no",
    ]
    devices = values_of(argv, "-device")
    # Each NIC on its own PCIe root port, so that it can be unplugged later; spare ports
    # for NICs plugged in while the VM runs.
    assert "virtio-net-pci,netdev=net-uc-a1,mac=02:00:00:00:00:01,id=nic-uc-a1,bus=nicport0" in devices
    assert "virtio-net-pci,netdev=net-uc-a2,mac=02:00:00:00:00:02,id=nic-uc-a2,bus=nicport1" in devices
    assert sum(d.startswith("pcie-root-port,") for d in devices) == 16
    assert "virtio-blk-pci,drive=disk0,bootindex=1" in devices


def test_no_nics_means_no_network_device() -> None:
    argv = build_argv(spec(), RUN, "tcg")
    assert values_of(argv, "-netdev") == []
    assert not any("virtio-net" in d for d in values_of(argv, "-device"))


def test_commas_in_paths_are_escaped_for_qemu() -> None:
    argv = build_argv(spec(disk_path="/disks/a,b.qcow2"), Path("/run/x,y"), "tcg")
    assert values_of(argv, "-drive")[0].startswith("file=/disks/a,,b.qcow2,if=none")
    assert "socket,id=qmp,path=/run/x,,y/qmp.sock,server=on,wait=off" in values_of(argv, "-chardev")


def test_too_long_socket_path_is_refused_with_a_clear_error() -> None:
    with pytest.raises(InvalidSpec, match="unix socket path .* bytes"):
        build_argv(spec(), Path("/" + "r" * 100), "tcg")


def test_unknown_accelerator_is_refused() -> None:
    with pytest.raises(InvalidSpec, match="accelerator must be"):
        build_argv(spec(), RUN, "hvf")
    with pytest.raises(InvalidSpec, match="accel must be"):
        QemuDriver("/tmp/x", accel="xen")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": "bad name"}, "VM name"),
        ({"name": ""}, "VM name"),
        ({"name": "a,b"}, "VM name"),
        ({"cores": 0}, "cores must be at least 1"),
        ({"ram_bytes": 512 * MIB + 1}, "whole number of MiB"),
        ({"ram_bytes": 8 * MIB}, "at least 16 MiB"),
        ({"disk_format": "vmdk"}, "disk_format"),
        ({"disk_path": "disks/x.qcow2"}, "disk_path must be an absolute path"),
        ({"disk_path": None}, "nothing to boot"),
        ({"initrd": "/k/initrd"}, "need a kernel"),
        ({"kernel": "vmlinuz"}, "kernel must be an absolute path"),
        (
            {
                "interfaces": (
                    NetworkInterface(tap="t1", mac="02:00:00:00:00:01"),
                    NetworkInterface(tap="t1", mac="02:00:00:00:00:02"),
                )
            },
            "share a tap",
        ),
    ],
)
def test_bad_specs_are_refused_naming_the_problem(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidSpec, match=message):
        spec(**overrides)


@pytest.mark.parametrize(
    ("tap", "mac", "message"),
    [
        ("tap-with-a-very-long-name", "02:00:00:00:00:01", "tap name"),
        ("t;rm", "02:00:00:00:00:01", "tap name"),
        ("t1", "02:00:00:00:00", "MAC"),
        ("t1", "02:00:00:00:00:GG", "MAC"),
        ("t1", "03:00:00:00:00:01", "multicast"),
    ],
)
def test_bad_interfaces_are_refused(tap: str, mac: str, message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        NetworkInterface(tap=tap, mac=mac)


def test_spec_and_status_round_trip_through_json() -> None:
    vm = spec(interfaces=(NetworkInterface(tap="t1", mac="02:00:00:00:00:01"),))
    assert msgspec.json.decode(msgspec.json.encode(vm), type=VmSpec) == vm
    status = VmStatus(vm_id=vm.vm_id, state=VmState.RUNNING, pid=42)
    assert msgspec.json.decode(msgspec.json.encode(status), type=VmStatus) == status
    assert status.running


def test_decoding_a_bad_spec_fails_with_the_reason() -> None:
    raw = msgspec.json.encode(spec()).replace(b'"cores":2', b'"cores":0')
    with pytest.raises(msgspec.ValidationError, match="cores must be at least 1"):
        msgspec.json.decode(raw, type=VmSpec)


def test_missing_kvm_device_is_reported_not_assumed(tmp_path: Path) -> None:
    assert kvm_device_usable(tmp_path / "kvm") == f"{tmp_path / 'kvm'} does not exist"


async def test_an_unknown_vm_is_absent_and_leaves_no_trace(tmp_path: Path) -> None:
    driver = QemuDriver(tmp_path / "run", accel="tcg")
    vm_id = uuid.uuid4()
    assert (await driver.status(vm_id)).state is VmState.ABSENT
    assert (await driver.stop(vm_id)).state is VmState.ABSENT
    assert (await driver.kill(vm_id)).state is VmState.ABSENT
    assert await driver.list_running() == []
    with pytest.raises(VmNotRunning):
        await driver.reboot(vm_id)
    assert (await driver.wait_exit(vm_id, timeout=0)).state is VmState.ABSENT
    assert not driver.run_dir(vm_id).exists()
    with pytest.raises(InvalidSpec, match="negative"):
        await driver.stop(vm_id, timeout=-1)


def test_the_pid_file_lock_tells_a_live_holder_from_a_stale_file(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    pidfile.write_text("4242\n")  # stale: names a pid, nobody holds the lock
    assert _lock_holder(pidfile) is None
    assert _lock_holder(tmp_path / "missing") is None
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.lockf(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
            str(pidfile),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        assert _lock_holder(pidfile) == holder.pid
    finally:
        holder.communicate("")
    assert _lock_holder(pidfile) is None  # the holder died: the lock is gone


def test_smbios_strings_reach_the_command_line_with_commas_escaped() -> None:
    from ucloud.hostagent.agent import OPENSTACK_PRODUCT, nocloud_serial

    serial = nocloud_serial("http://[fd12:3456:789a:1::1]/")
    assert serial == "ds=nocloud-net;s=http://[fd12:3456:789a:1::1]/nocloud/"
    vm = msgspec.structs.replace(spec(), smbios_product=OPENSTACK_PRODUCT, smbios_serial=serial)
    assert values_of(build_argv(vm, RUN, "tcg"), "-smbios") == [
        f"type=1,product=OpenStack Nova,serial={serial}"]
    odd = msgspec.structs.replace(spec(), smbios_serial="a,b")
    assert values_of(build_argv(odd, RUN, "tcg"), "-smbios") == ["type=1,serial=a,,b"]
    assert values_of(build_argv(spec(), RUN, "tcg"), "-smbios") == []
    with pytest.raises(InvalidSpec, match="smbios_serial"):
        spec(smbios_serial="two\nlines")
    for bad in ("ftp://x/", "http://[::1]/a;b", "http://x/a b"):
        with pytest.raises(ValueError, match="metadata URL"):
            nocloud_serial(bad)
