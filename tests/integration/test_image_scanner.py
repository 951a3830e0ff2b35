"""The image scanner against real qcow2 files made by qemu-img, a real SQLite log and a
real filesystem store: good images become ready, hostile ones fail with the reason and
leave nothing in the store."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ucloud.commands.aggregates import IMAGE
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.domain import image as image_domain
from ucloud.domain.limits import GiB, MiB
from ucloud.eventstore.leases import leases_for
from ucloud.eventstore.sqlite import SqliteEventStore
from ucloud.imagestore.stores import FsStore
from ucloud.processes.files import hash_file
from ucloud.processes.framework import ProcessRunner
from ucloud.processes.images import ImageScanner

ALICE, BOB = Actor("alice"), Actor("bob")


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@dataclass
class Rig:
    root: Path
    commands: CommandService
    scanner: ImageScanner
    store: FsStore

    def file(self, owner: str, name: str) -> Path:
        path = self.root / "files" / owner / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    async def record(self, actor: Actor, name: str, signature: bool = True) -> None:
        """Record the file as the file scanner does (with its signature), or without one."""
        hashed = hash_file(self.file(actor.name, name))
        assert hashed is not None
        size, sha, sig = hashed
        await self.commands.record_file(actor, name, size, sha, signature=sig if signature else "")

    async def make_image(self, actor: Actor, name: str, file: str) -> image_domain.Image:
        """Ask for the image and let the scanner work until it is ready or failed."""
        outcome = await self.commands.create_image(actor, name, file)
        task = asyncio.create_task(self.scanner.run())
        try:
            for _ in range(600):
                loaded = await self.commands.repository.load(IMAGE, image_domain.stream_name(outcome.result))
                image = loaded.state
                assert image is not None
                if image.status is not image_domain.ImageStatus.IMPORTING:
                    return image
                await asyncio.sleep(0.05)
            raise AssertionError("the scanner did not finish the import")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def stored(self) -> list[str]:
        return sorted(p.name for p in self.store.root.iterdir()) if self.store.root.exists() else []





@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    log = SqliteEventStore(tmp_path / "events.sqlite")
    commands = CommandService(log)
    store = FsStore("local", tmp_path / "store")
    # Every progress step recorded, however fast: these imports of a few MiB are over
    # before the half second the scanner otherwise leaves between two progress events.
    scanner = ImageScanner(commands, {"local": store}, tmp_path / "files", max_virtual_size=4 * GiB,
                           progress_interval=0)
    try:
        yield Rig(tmp_path, commands, scanner, store)
    finally:
        await log.close()


@pytest.mark.parametrize("signature", [True, False], ids=["signature", "sha256"])
async def test_a_real_qcow2_is_imported_read_only_and_without_backing(rig: Rig, signature: bool) -> None:
    raw = rig.root / "data.raw"
    raw.write_bytes(os.urandom(32 * MiB))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(rig.file("alice", "disk.qcow2")))
    qemu_img("resize", "-f", "qcow2", str(rig.file("alice", "disk.qcow2")), "1G")
    await rig.record(ALICE, "disk.qcow2", signature)
    image = await rig.make_image(ALICE, "deb", "disk.qcow2")
    assert image.status is image_domain.ImageStatus.READY, image.reason
    assert image.virtual_size == GiB
    stored = Path(image.location)
    assert stored.parent == rig.store.root and oct(stored.stat().st_mode & 0o777) == "0o444"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(stored)],  # noqa: ASYNC221
                                     check=True, capture_output=True, text=True).stdout)
    assert info["format"] == "qcow2" and "backing-filename" not in info
    original = str(rig.file("alice", "disk.qcow2"))
    compare = subprocess.run(["qemu-img", "compare", original, str(stored)],  # noqa: ASYNC221
                             capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    types = [r.type for r in await rig.commands.store.read_stream(image_domain.stream_name(image.id))]
    assert types[0] == "image.requested" and types[-1] == "image.imported"
    assert "image.import_progressed" in types  # 32 MiB of data: qemu-img reports its progress on the way
    assert rig.stored() == [stored.name]


async def _refused(rig: Rig, name: str, reason: str) -> None:
    await rig.record(ALICE, name)
    image = await rig.make_image(ALICE, "bad", name)
    assert image.status is image_domain.ImageStatus.FAILED
    assert reason in image.reason, image.reason
    assert rig.stored() == []  # nothing half-imported


async def test_a_backing_file_pointing_at_etc_shadow_is_refused(rig: Rig) -> None:
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow", str(rig.file("alice", "evil.qcow2")), "1M")
    await _refused(rig, "evil.qcow2", "names a backing file")


async def test_an_external_data_file_is_refused(rig: Rig) -> None:
    data = rig.root / "outside.raw"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={data}", str(rig.file("alice", "ext.qcow2")), "1M")
    await _refused(rig, "ext.qcow2", "external data file")


async def test_a_raw_file_named_qcow2_is_refused(rig: Rig) -> None:
    rig.file("alice", "raw.qcow2").write_bytes(b"\0" * 65536)
    await _refused(rig, "raw.qcow2", "not a qcow2 file")


async def test_a_virtual_size_above_the_limit_is_refused(rig: Rig) -> None:
    qemu_img("create", "-f", "qcow2", str(rig.file("alice", "huge.qcow2")), "100T")
    await _refused(rig, "huge.qcow2", "above this installation's limit")


async def test_a_truncated_qcow2_is_refused(rig: Rig) -> None:
    whole = rig.root / "whole.qcow2"
    qemu_img("create", "-f", "qcow2", str(whole), "1M")
    rig.file("alice", "cut.qcow2").write_bytes(whole.read_bytes()[:60])
    await _refused(rig, "cut.qcow2", "truncated")


async def test_a_qcow2_cut_after_its_header_is_refused(rig: Rig) -> None:
    raw = rig.root / "data.raw"
    raw.write_bytes(os.urandom(4 * MiB))
    whole = rig.root / "whole.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(whole))
    rig.file("alice", "cut.qcow2").write_bytes(whole.read_bytes()[:200_000])
    await _refused(rig, "cut.qcow2", "corrupt or truncated")


async def test_a_symbolic_link_to_another_users_file_is_refused(rig: Rig) -> None:
    qemu_img("create", "-f", "qcow2", str(rig.file("bob", "secret.qcow2")), "1M")
    link = rig.file("alice", "mine.qcow2")
    link.symlink_to(rig.file("bob", "secret.qcow2"))
    # The file scanner records no link; say the log knows the name anyway (a file replaced
    # by a link after it was recorded).
    hashed = hash_file(rig.file("bob", "secret.qcow2"))
    assert hashed is not None
    await rig.commands.record_file(ALICE, "mine.qcow2", hashed[0], hashed[1], signature=hashed[2])
    image = await rig.make_image(ALICE, "bad", "mine.qcow2")
    assert image.status is image_domain.ImageStatus.FAILED and "symbolic link" in image.reason, image.reason
    assert rig.stored() == []


@pytest.mark.parametrize("signature", [True, False], ids=["signature", "sha256"])
async def test_a_file_changed_after_the_request_is_refused(rig: Rig, signature: bool) -> None:
    qemu_img("create", "-f", "qcow2", str(rig.file("alice", "d.qcow2")), "1M")
    await rig.record(ALICE, "d.qcow2", signature)
    qemu_img("create", "-f", "qcow2", str(rig.file("alice", "d.qcow2")), "2M")  # replaced, not yet rescanned
    image = await rig.make_image(ALICE, "changed", "d.qcow2")
    assert image.status is image_domain.ImageStatus.FAILED and "changed since the image was asked for" in image.reason
    assert rig.stored() == []


async def test_deleting_an_image_removes_it_from_the_store(rig: Rig) -> None:
    qemu_img("create", "-f", "qcow2", str(rig.file("alice", "d.qcow2")), "1M")
    await rig.record(ALICE, "d.qcow2")
    image = await rig.make_image(ALICE, "gone", "d.qcow2")
    assert rig.stored() == [Path(image.location).name]
    await rig.commands.delete_image(ALICE, "gone")
    task = asyncio.create_task(rig.scanner.run())
    try:
        for _ in range(200):
            if not rig.stored():
                break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert rig.stored() == []


async def test_the_scanner_runs_on_the_framework_one_leader_imports_each_image_once(rig: Rig) -> None:
    """Two instances on the process-manager framework under one leader lease: only the
    leader imports; when it stops the other takes over from the tracked position; every
    image is imported exactly once, and the runner counts and snapshots like any manager."""
    log = rig.commands.store
    leases = leases_for(log)
    other = ImageScanner(rig.commands, {"local": rig.store}, rig.root / "files", max_virtual_size=4 * GiB,
                         progress_interval=0)
    runners = {name: ProcessRunner(scanner, log, leases, instance=name, lease_ttl=2, snapshot_interval=0)
               for name, scanner in (("a", rig.scanner), ("b", other))}
    tasks = {name: asyncio.create_task(runner.run()) for name, runner in runners.items()}

    async def ready(name: str) -> image_domain.Image:
        for _ in range(600):
            image = (await rig.commands.repository.load(
                IMAGE, image_domain.stream_name(image_domain.image_id_for("alice", name)))).state
            if image is not None and image.status is not image_domain.ImageStatus.IMPORTING:
                return image
            await asyncio.sleep(0.05)
        raise AssertionError(f"image {name} was not imported")

    try:
        for index in range(2):
            qemu_img("create", "-f", "qcow2", str(rig.file("alice", f"d{index}.qcow2")), "64M")
            await rig.record(ALICE, f"d{index}.qcow2")
        await rig.commands.create_image(ALICE, "first", "d0.qcow2")
        assert (await ready("first")).status is image_domain.ImageStatus.READY
        leaders = [name for name, runner in runners.items() if runner.leader]
        assert len(leaders) == 1, leaders
        (leader,) = leaders
        tasks[leader].cancel()  # the leader stops (its lease is released): the other takes over
        await asyncio.gather(tasks[leader], return_exceptions=True)
        await rig.commands.create_image(ALICE, "second", "d1.qcow2")
        assert (await ready("second")).status is image_domain.ImageStatus.READY
        follower = "b" if leader == "a" else "a"
        assert runners[follower].leader and runners[follower].takeovers == 1
        for name in ("first", "second"):
            types = [r.type for r in await log.read_stream(
                image_domain.stream_name(image_domain.image_id_for("alice", name)))]
            assert types.count("image.imported") == 1, types
        assert await log.tracked_position("image-scanner") == runners[follower].manager.tracked
        assert runners[follower].handled >= 1 and runners[leader].handled >= 1
        assert runners[leader].snapshots_saved >= 1  # an empty view, at the position it read to
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
