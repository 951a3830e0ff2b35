"""`tiny` is an ordinary public image of the catalogue: `ucloud up` (with its host agent,
as README's first-VM walkthrough runs it) builds tiny's bootable qcow2, puts it among the
first admin's files and makes a public image of it, which the image scanner imports into
the default filesystem store, before it says it is up. README's walkthrough then runs as a
new user types it: the VM is a clone of the catalogued image (its disk an overlay whose
backing file is the image in the store), boots from that disk (no -kernel), and the image
cannot be deleted while the VM uses it. A second start registers nothing again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.gateway import gateway_process
from tests.support.qemu import qemu_processes
from tests.support.slapd import free_port
from tests.support.up import Up, home_env, up_fixture  # noqa: F401 (the `up` fixture)
from ucloud.commands.aggregates import VM
from ucloud.commands.service import HOST_IMAGES, CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.domain import vm as vm_domain
from ucloud.domain.errors import Rejected
from ucloud.eventstore.sqlite import SqliteEventStore
from ucloud.hostagent.builtin import build_builtin
from ucloud.hostagent.tinyguest import MARKER
from ucloud.imagestore.stores import FsStore
from ucloud.processes.builtin_images import BuiltinImageError, register_builtin
from ucloud.processes.files import FileScanner
from ucloud.processes.images import ImageScanner

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

BIN = Path(sys.executable).parent


@dataclass
class Machine:
    root: Path  # short: QMP/VNC socket paths under it must fit Linux's 107 bytes
    port: int
    process: subprocess.Popen[bytes] | None = None
    runs: int = 0
    args: tuple[str, ...] = ()

    @property
    def state(self) -> Path:
        return self.root / "s"

    @property
    def log(self) -> Path:
        return self.root / f"up-{self.runs}.log"

    def start(self) -> str:
        self.runs += 1
        out = open(self.log, "wb")
        self.process = subprocess.Popen(
            [str(BIN / "ucloud"), "up", "--store", f"sqlite://{self.root / 'events.sqlite'}", "--state-dir",
             str(self.state), "--listen", "127.0.0.1", "--port", str(self.port), "--no-metadata",
             "--hostname", "first-vm", *self.args],
            stdout=out, stderr=out, env=home_env(self.root / "home"), start_new_session=True)
        out.close()
        deadline = time.monotonic() + 600  # a fresh state dir: the tiny guest is built (a kernel download)
        while "stop: Ctrl-C" not in self.log.read_text():
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.2)
        return self.log.read_text()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def ucloud(self, *args: str, code: int = 0, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(BIN / "ucloud"), *args], env=home_env(self.root / "home"), capture_output=True,
                                text=True, timeout=timeout)
        assert result.returncode == code, (args, result.stdout, result.stderr, self.log.read_text()[-3000:])
        return result


def qemu_cmdline(vm_id: str) -> list[bytes]:
    (pid,) = qemu_processes(uuid.UUID(vm_id))
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


@pytest.fixture
def machine() -> Iterator[Machine]:
    root = Path(tempfile.mkdtemp(prefix="ucb-", dir="/tmp"))
    made = Machine(root, free_port())
    try:
        yield made
    finally:
        made.stop()
        for run_dir in (made.state / "run").glob("*"):
            with_pid = run_dir / "pid"
            if with_pid.exists():
                try:
                    os.kill(int(with_pid.read_text()), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        shutil.rmtree(root, ignore_errors=True)


def test_tiny_is_a_public_catalogue_image_and_the_readme_walkthrough_uses_it(machine: Machine) -> None:
    said = machine.start()
    assert "the public image 'tiny' is ready in store local" in said

    images = json.loads(machine.ucloud("image", "list", "--json").stdout)
    (tiny,) = [i for i in images if i["name"] == "tiny"]
    assert (tiny["public"], tiny["status"], tiny["store"], tiny["file"]) == (True, "ready", "local", "tiny.qcow2")
    shown = json.loads(machine.ucloud("image", "show", "tiny", "--json").stdout)
    assert shown["id"] == tiny["id"] and shown["used_by"] == []
    stored = machine.state / "image-store" / f"{tiny['id']}.qcow2"
    assert stored.is_file()
    # Catalogue images only: debian-12 was not registered (no --debian-12), so it is refused
    # here rather than accepted as a name the host might provide.
    refused = machine.ucloud("vm", "create", "--image", "debian-12", code=1)
    assert "no image named 'debian-12'" in refused.stderr

    # README, "Your first VM", as typed (no --disk: the default size).
    created = json.loads(machine.ucloud("vm", "create", "--image", "tiny", "--cores", "1", "--ram", "256MB",
                                        "--wait", "--json").stdout)
    vm_id = created["id"]
    assert created["status"] == "running"
    listed = machine.ucloud("vm", "list").stdout
    assert vm_id[:8] in listed or created["name"] in listed

    # The VM's disk is a clone of the catalogued image and boots from it.
    disk = machine.state / "disks" / f"{vm_id}.qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(disk)], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["full-backing-filename"] == str(stored)
    cmdline = qemu_cmdline(vm_id)
    assert b"-kernel" not in cmdline
    serial = machine.state / "run" / vm_id / "serial.log"
    deadline = time.monotonic() + 180
    while not (serial.exists() and MARKER in serial.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"no {MARKER} from the VM\n{machine.log.read_text()[-3000:]}"
        time.sleep(0.5)

    used = json.loads(machine.ucloud("image", "show", "tiny", "--json").stdout)
    assert used["used_by"] == [vm_id]
    refused = machine.ucloud("image", "delete", "tiny", "--public", code=1)
    assert "in use" in refused.stderr and vm_id in refused.stderr

    machine.ucloud("vm", "stop", vm_id, "--wait")
    machine.ucloud("vm", "delete", vm_id, "--wait")
    assert not disk.exists() and stored.is_file()  # the clone goes, the image stays
    audit = subprocess.run([str(BIN / "ucloud-audit"), "--store", f"sqlite://{machine.root / 'events.sqlite'}",
                            "show", f"vm-{vm_id}", "--json"], capture_output=True, text=True, timeout=60)
    assert audit.returncode == 0, audit.stderr
    assert json.loads(audit.stdout.splitlines()[0])["data"]["image_id"] == tiny["id"]

    # A second start finds the image and registers nothing again.
    machine.stop()
    machine.start()
    again = [i for i in json.loads(machine.ucloud("image", "list", "--json").stdout) if i["name"] == "tiny"]
    assert [(i["id"], i["status"]) for i in again] == [(tiny["id"], "ready")]
    files = json.loads(machine.ucloud("file", "list", "--json").stdout)
    assert [f["name"] for f in files] == ["tiny.qcow2"]


async def test_a_registered_tiny_is_the_catalogues_image_vms_use_and_hold(tmp_path: Path) -> None:
    """In-process, on a SQLite log with the real file scanner and image scanner running:
    register_builtin makes the built file the public image `tiny`; a VM of `tiny` then names
    the catalogue's image (id and store, though `tiny` is also a host-provided name) and holds
    it; a second registration changes nothing."""
    built = await asyncio.to_thread(build_builtin, "tiny", tmp_path / "cache")
    log = SqliteEventStore(tmp_path / "events.sqlite")
    commands = CommandService(log)
    assert "tiny" in commands.host_images == HOST_IMAGES
    files = tmp_path / "files"
    store = FsStore("local", tmp_path / "store")
    scanners = [asyncio.create_task(FileScanner(commands, files).run()),
                asyncio.create_task(ImageScanner(commands, {"local": store}, files).run())]
    try:
        tiny = await register_builtin(commands, files, "admin", "tiny", built, timeout=120)
        assert (tiny.public, tiny.owner, tiny.file_name, tiny.store) == (True, "admin", "tiny.qcow2", "local")
        assert tiny.location == str(store.path_of(tiny.id)) and Path(tiny.location).is_file()
        head = await log.head()
        assert (await register_builtin(commands, files, "admin", "tiny", built, timeout=120)).id == tiny.id
        assert await log.head() == head  # nothing appended the second time

        alice = Actor("alice")
        vm_id = (await commands.create_vm(alice, name="a", cores=1, ram="256MB", disk="1GB", image="tiny")).result
        vm = (await commands.repository.load(VM, vm_domain.stream_name(vm_id))).state
        assert vm is not None and (vm.image_id, vm.image_store) == (tiny.id, "local")
        admin = Actor("admin", "ucloud-admin", is_admin=True)
        with pytest.raises(Rejected, match="in use by 1 VM"):
            await commands.delete_image(admin, "tiny", public=True)
    finally:
        for task in scanners:
            task.cancel()
        for task in scanners:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await log.close()


def test_an_admin_registers_tiny_for_hosts_elsewhere_with_image_builtin(up: Up, tmp_path: Path) -> None:
    """`ucloud up --no-agent` builds nothing; `ucloud image builtin tiny` (the admin's CLI)
    builds the file, uploads it and makes the public image; running it again keeps it."""
    up.start()
    assert "tiny" not in up.ucloud("image", "list").stdout
    cache = tmp_path / "cache"
    made = json.loads(up.ucloud("image", "builtin", "tiny", "--cache", str(cache), "--json").stdout)
    assert (made["name"], made["public"], made["status"], made["file"]) == ("tiny", True, "ready", "tiny.qcow2")
    again = up.ucloud("image", "builtin", "tiny", "--cache", str(cache)).stdout
    assert "exists already" in again
    listed = [i for i in json.loads(up.ucloud("image", "list", "--json").stdout) if i["name"] == "tiny"]
    assert [i["id"] for i in listed] == [made["id"]]
    created = json.loads(up.ucloud("vm", "create", "--image", "tiny", "--ram", "256MB", "--json").stdout)
    shown = json.loads(up.ucloud("image", "show", "tiny", "--json").stdout)
    assert shown["used_by"] == [created["id"]]  # the VM names the catalogue's image


def test_debian_12_is_a_public_catalogue_image_that_boots_from_its_own_disk(machine: Machine) -> None:
    """`ucloud up --debian-12`: the stock Debian image becomes the public image `debian-12`
    (its file system the second partition of a bootable disk) and a VM of it boots from
    its clone, no -kernel, with its root on /dev/vda2. The Debian build is the machine's
    cached one (/var/cache/ucloud/debian-12, built by tests/integration/test_metadata_e2e.py
    or `python -m ucloud.hostagent.debianimage`), reached through the cache directory."""
    from ucloud.hostagent.debianimage import ensure_debian_image

    shared = ensure_debian_image().disk_image.parent  # builds it once if this machine has none
    cache = machine.root / "cache"
    cache.mkdir()
    (cache / "debian-12").symlink_to(shared)
    machine.args = ("--debian-12", "--cache-dir", str(cache))
    said = machine.start()
    assert "the public image 'debian-12' is ready in store local" in said

    images = {i["name"]: i for i in json.loads(machine.ucloud("image", "list", "--json").stdout)}
    debian = images["debian-12"]
    assert (debian["public"], debian["status"], debian["file"]) == (True, "ready", "debian-12.qcow2")
    created = json.loads(machine.ucloud("vm", "create", "--image", "debian-12", "--cores", "2", "--ram", "1GB",
                                        "--disk", "4GB", "--wait", "--timeout", "600", "--json",
                                        timeout=700).stdout)
    vm_id = created["id"]
    disk = machine.state / "disks" / f"{vm_id}.qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(disk)], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["full-backing-filename"] == str(machine.state / "image-store" / f"{debian['id']}.qcow2")
    assert b"-kernel" not in qemu_cmdline(vm_id)
    serial = machine.state / "run" / vm_id / "serial.log"
    deadline = time.monotonic() + 1200  # a whole Debian boot under TCG on a shared machine
    while not (serial.exists() and "Cloud-init v. " in (text := serial.read_text(errors="replace"))
               and " finished at " in text):
        assert time.monotonic() < deadline, f"Debian did not finish booting\n{serial.read_text()[-3000:]}"
        time.sleep(2)
    assert "root=/dev/vda2" in text and "EXT4-fs (vda2): mounted" in text
    # cloud-init grew the root partition (growpart) and its file system to the 4 GB disk.
    assert "EXT4-fs (vda2): resized filesystem to" in text, text[-3000:]


@pytest.mark.parametrize("host_images", [True, False])
def test_a_gateway_without_host_images_accepts_catalogue_images_only(tmp_path: Path, host_images: bool) -> None:
    """`ucloud gateway --no-host-images`: `tiny` not in the catalogue is 422 naming `image`;
    by default the name the hosts provide is still accepted (docs/operations.md)."""
    flag = "--host-images" if host_images else "--no-host-images"
    with gateway_process(tmp_path, flag) as api:
        body = json.dumps({"name": "a", "cores": 1, "ram": "256MB", "disk": "1GB", "image": "tiny"}).encode()
        request = urllib.request.Request(f"{api}/v1/vms", data=body, method="POST", headers={
            "X-Ucloud-User": "alice", "X-Ucloud-Realm": "ucloud", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status, problem = answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            status, problem = error.code, json.loads(error.read())
    if host_images:
        assert status == 202, problem
    else:
        assert (status, problem.get("field")) == (422, "image"), problem
        assert "no image named 'tiny'" in problem["detail"]


async def test_registering_never_overwrites_an_admins_own_file_of_that_name(tmp_path: Path) -> None:
    built = await asyncio.to_thread(build_builtin, "tiny", tmp_path / "cache")
    files = tmp_path / "files"
    (files / "admin").mkdir(parents=True)
    own = files / "admin" / "tiny.qcow2"
    own.write_bytes(b"the admin's own file")
    log = SqliteEventStore(tmp_path / "events.sqlite")
    try:
        with pytest.raises(BuiltinImageError, match="exists and is another file"):
            await register_builtin(CommandService(log), files, "admin", "tiny", built, timeout=60)
    finally:
        await log.close()
    assert own.read_bytes() == b"the admin's own file"
    assert sorted(p.name for p in (files / "admin").iterdir()) == ["tiny.qcow2"]
