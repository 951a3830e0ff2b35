"""A user's own OS end to end through the CLI, every part real and in its own process:
etcd, `ucloud up --no-agent` (gateway, scheduler, image scanner), `ucloud-host` (QEMU
under TCG unless KVM works), one filesystem image store both reach.

The user uploads a BIOS-bootable qcow2 made from the project's tiny guest, makes an
image of it, and creates a VM that boots from its disk (no -kernel): the disk is a qcow2
overlay whose backing file is the image; the disk grows while the guest runs (QMP);
deleting the VM removes the overlay and not the image, and deleting the image removes
it from the store."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from tests.support.bootdisk import build_boot_disk
from tests.support.ceph import CephCluster
from tests.support.etcd import EtcdCluster, free_port
from ucloud.hostagent.tinyguest import MARKER, ensure_tiny_guest

pytestmark = [pytest.mark.etcd, pytest.mark.qemu, pytest.mark.slow]

BIN = Path(sys.executable).parent
ADMIN = ("--user", "admin", "--realm", "ucloud-admin")


def qemu_pids(vm_id: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"qemu-system-x86_64") and any(vm_id.encode() in a for a in cmdline):
            pids.append(int(proc.name))
    return pids


@dataclass
class Cloud:
    env: dict[str, str]
    host_dir: Path
    store_dir: Path
    tmp: Path
    processes: list[subprocess.Popen[bytes]]
    ceph: CephCluster | None = None

    def ucloud(self, *args: str, timeout: float = 240, input: str | None = None,
               code: int = 0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(BIN / "ucloud"), *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout, input=input)
        assert result.returncode == code, f"ucloud {' '.join(args)}: {result.stdout}{result.stderr}\n{self.logs()}"
        return result

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(self.tmp.glob("*.log")))


@pytest.fixture
def cloud(etcd: EtcdCluster, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cloud]:
    """``ucloud up`` and ``ucloud-host`` sharing one image store: a filesystem store, or
    (indirect parameter "rbd") a pool of the session's Ceph cluster."""
    store_url = f"etcd://{etcd.endpoints[0]}/img-{uuid.uuid4().hex[:8]}/v1"
    port = free_port()
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_STATE_HOME": str(tmp_path / "state"),
           "UCLOUD_API": f"http://127.0.0.1:{port}", "UCLOUD_USER": "alice", "UCLOUD_REALM": "ucloud"}
    host_dir = Path(tempfile.mkdtemp(prefix="ucimg-", dir="/tmp"))  # short: unix socket paths under it
    store_dir = tmp_path / "image-store"
    store = f"local=fs:{store_dir}"
    ceph: CephCluster | None = None
    if getattr(request, "param", "fs") == "rbd":
        ceph = request.getfixturevalue("ceph")
        store = f"ceph=rbd:{ceph.pool}:{ceph.conf}"
    cloud = Cloud(env, host_dir, store_dir, tmp_path, [], ceph)

    def spawn(name: str, *argv: str) -> None:
        log = open(tmp_path / f"{name}.log", "ab")
        cloud.processes.append(subprocess.Popen(argv, stdout=log, stderr=log, env=env, start_new_session=True))

    spawn("control", str(BIN / "ucloud"), "up", "--no-agent", "--no-metadata", "--store", store_url,
          "--listen", "127.0.0.1", "--port", str(port), "--state-dir", str(tmp_path / "control"),
          "--files-root", str(tmp_path / "files"), "--image-store", store)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    break
            except OSError:
                assert cloud.processes[0].poll() is None, cloud.logs()
                assert time.monotonic() < deadline, "gateway did not come up"
                time.sleep(0.2)
        cloud.ucloud(*ADMIN, "user", "add", "alice")
        enrolled = json.loads(cloud.ucloud(*ADMIN, "user", "enrol", "alice", "--json").stdout)
        cloud.ucloud("login", "alice", "--realm", "ucloud", "--seed-file", "-", input=enrolled["seed"])
        spawn("agent", str(BIN / "ucloud-host"), "--store", store_url, "--state-dir", str(host_dir),
              "--hostname", "img-host", "--accel", "auto", "--image-store", store)
        deadline = time.monotonic() + 90
        while True:
            hosts = subprocess.run([str(BIN / "ucloud"), *ADMIN, "host", "list", "--json"], env=env,
                                   capture_output=True, text=True, timeout=30)
            if hosts.returncode == 0 and any(h["hostname"] == "img-host" for h in json.loads(hosts.stdout)):
                break
            assert cloud.processes[-1].poll() is None and time.monotonic() < deadline, cloud.logs()
            time.sleep(0.3)
        yield cloud
    finally:
        for process in reversed(cloud.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
        for run_dir in (host_dir / "run").glob("*"):
            for pid in qemu_pids(run_dir.name):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(host_dir, ignore_errors=True)


def wait_for(what: str, check: object, cloud: Cloud, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen\n{cloud.logs()}")


def disk_info(path: Path) -> dict[str, object]:
    return json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], check=True,
                                     capture_output=True, text=True).stdout)


async def query_block(socket: Path) -> list[dict[str, object]]:
    client = QMPClient("test")
    await client.connect(str(socket))
    try:
        return await client.execute("query-block")  # type: ignore[no-any-return]
    finally:
        await client.disconnect()


def test_an_uploaded_qcow2_becomes_an_image_a_vm_boots_from_its_clone_and_delete_removes_the_clone(
        cloud: Cloud, tmp_path: Path) -> None:
    boot = build_boot_disk(ensure_tiny_guest(), tmp_path / "build")
    cloud.ucloud("file", "upload", str(boot), "--name", "mine.qcow2")
    created = cloud.ucloud("image", "create", "mine", "--file", "mine.qcow2", "--timeout", "120")
    assert "mine: ready (100%)" in created.stdout, created.stdout
    image = json.loads(cloud.ucloud("image", "show", "mine", "--json").stdout)
    base = cloud.store_dir / f"{image['id']}.qcow2"
    assert base.is_file() and not os.access(base, os.W_OK) or (base.stat().st_mode & 0o222) == 0

    vm = json.loads(cloud.ucloud("vm", "create", "own-os", "--image", "mine", "--cores", "1", "--ram", "256MB",
                                 "--disk", "1GB", "--wait", "--timeout", "180", "--json").stdout)
    vm_id = vm["id"]
    serial = cloud.host_dir / "run" / vm_id / "serial.log"
    wait_for("the guest's marker on its serial console",
             lambda: serial.exists() and MARKER in serial.read_text(errors="replace"), cloud)
    argv = b" ".join(Path(f"/proc/{qemu_pids(vm_id)[0]}/cmdline").read_bytes().split(b"\0"))
    assert b"-kernel" not in argv  # booted from the disk itself, through the BIOS

    overlay = cloud.host_dir / "disks" / f"{vm_id}.qcow2"
    info = disk_info(overlay)
    assert info["backing-filename"] == str(base) and info["virtual-size"] == 1 << 30
    refused = cloud.ucloud("image", "delete", "mine", code=1)
    assert "in use by 1 VM(s): own-os" in refused.stderr + refused.stdout

    cloud.ucloud("vm", "resize", vm_id, "--disk", "2GB")
    wait_for("the running guest's disk to grow", lambda: disk_info(overlay)["virtual-size"] == 2 << 30, cloud, 60)
    blocks = asyncio.run(query_block(cloud.host_dir / "run" / vm_id / "qmp.sock"))
    (disk0,) = [b for b in blocks if b.get("device") == "disk0"]
    assert disk0["inserted"]["image"]["virtual-size"] == 2 << 30  # type: ignore[index]
    assert len(qemu_pids(vm_id)) == 1  # grown online: the same QEMU

    cloud.ucloud("vm", "delete", vm_id, "--wait", "--timeout", "90")
    assert not overlay.exists() and base.exists()  # the clone went, the image stayed
    cloud.ucloud("image", "delete", "mine")
    wait_for("the image to leave its store", lambda: not base.exists(), cloud, 30)


@pytest.mark.ceph
@pytest.mark.parametrize("cloud", ["rbd"], indirect=True)
def test_with_the_ceph_store_a_vm_boots_from_an_rbd_clone_and_delete_removes_the_clone(
        cloud: Cloud, tmp_path: Path) -> None:
    ceph = cloud.ceph
    assert ceph is not None
    boot = build_boot_disk(ensure_tiny_guest(), tmp_path / "build")
    cloud.ucloud("file", "upload", str(boot), "--name", "mine.qcow2")
    created = cloud.ucloud("image", "create", "mine", "--file", "mine.qcow2", "--timeout", "120")
    assert "mine: ready (100%), store ceph" in created.stdout, created.stdout
    image = json.loads(cloud.ucloud("image", "show", "mine", "--json").stdout)
    base = f"image-{image['id']}"
    assert base in ceph.images()

    vm = json.loads(cloud.ucloud("vm", "create", "rbd-os", "--image", "mine", "--ram", "256MB", "--disk", "1GB",
                                 "--wait", "--timeout", "180", "--json").stdout)
    vm_id = vm["id"]
    serial = cloud.host_dir / "run" / vm_id / "serial.log"
    wait_for("the guest's marker on its serial console",
             lambda: serial.exists() and MARKER in serial.read_text(errors="replace"), cloud)
    argv = Path(f"/proc/{qemu_pids(vm_id)[0]}/cmdline").read_bytes()
    assert f"rbd:{ceph.pool}/vm-{vm_id}".encode() in argv and b"-kernel" not in argv
    assert f"parent: {ceph.pool}/{base}@base" in ceph.rbd("info", f"{ceph.pool}/vm-{vm_id}")

    cloud.ucloud("vm", "delete", vm_id, "--wait", "--timeout", "120")
    assert ceph.images() == [base]  # the clone went, the image stayed
    cloud.ucloud("image", "delete", "mine")
    wait_for("the image to leave the pool", lambda: ceph.images() == [], cloud, 60)
