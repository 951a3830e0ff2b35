"""The file scanner on a real directory tree and a real SQLite log: files dropped into a
user's directory (as sftp would) appear, change and go in the log; unchanged files are not
hashed again; links, hidden and partial files are not files."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from ucloud.commands.service import CommandService
from ucloud.domain import file as file_domain
from ucloud.eventstore.sqlite import SqliteEventStore
from ucloud.processes.files import FileScanner


@pytest.fixture
async def commands(tmp_path: Path) -> AsyncIterator[CommandService]:
    store = SqliteEventStore(tmp_path / "events.sqlite")
    try:
        yield CommandService(store)
    finally:
        await store.close()


async def types_of(commands: CommandService, owner: str, name: str) -> list[str]:
    stream = file_domain.stream_name(file_domain.file_id_for(owner, name))
    return [r.type for r in await commands.store.read_stream(stream)]


async def eventually(check: Callable[[], object], timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert loop.time() < deadline, "did not happen in time"
        await asyncio.sleep(0.05)


async def test_files_appear_change_and_go_and_unchanged_ones_are_not_hashed_again(
        commands: CommandService, tmp_path: Path) -> None:
    root = tmp_path / "files"
    (root / "alice").mkdir(parents=True)
    scanner = FileScanner(commands, root, use_inotify=False)
    data = b"qcow2 bytes" * 1000
    (root / "alice" / "disk.qcow2").write_bytes(data)
    (root / "alice" / "other.qcow2").write_bytes(b"other")
    (root / "alice" / ".upload-1234").write_bytes(b"partial")
    (root / "alice" / "link.qcow2").symlink_to(root / "alice" / "disk.qcow2")
    (root / "alice" / "subdir").mkdir()
    await scanner.scan()
    await scanner.runner.catch_up()
    listed = {(f.owner, f.name): f for f in scanner.view.of(None)}
    assert set(listed) == {("alice", "disk.qcow2"), ("alice", "other.qcow2")}
    assert listed[("alice", "disk.qcow2")].sha256 == hashlib.sha256(data).hexdigest()
    assert scanner.hashes == 2

    await scanner.scan()
    await scanner.scan()
    assert scanner.hashes == 2  # nothing changed, nothing hashed

    (root / "alice" / "disk.qcow2").write_bytes(b"new content")
    await scanner.scan()
    assert scanner.hashes == 3
    assert await types_of(commands, "alice", "disk.qcow2") == ["file.appeared", "file.changed"]

    (root / "alice" / "disk.qcow2").unlink()
    await scanner.scan()
    assert await types_of(commands, "alice", "disk.qcow2") == ["file.appeared", "file.changed", "file.removed"]
    assert await types_of(commands, "alice", "other.qcow2") == ["file.appeared"]


async def test_inotify_wakes_a_scan_long_before_the_periodic_one(commands: CommandService, tmp_path: Path) -> None:
    root = tmp_path / "files"
    root.mkdir()
    scanner = FileScanner(commands, root, interval=3600, settle=0.05)
    task = asyncio.create_task(scanner.run())
    try:
        await eventually(lambda: scanner.watching and scanner.scans >= 1)
        (root / "bob").mkdir()  # a new user's directory is watched as it appears
        await eventually(lambda: scanner.scans >= 2)
        with open(root / "bob" / "img.qcow2", "wb") as out:  # noqa: ASYNC230 (as sftp writes: open, write, close)
            out.write(os.urandom(4096))
        await eventually(lambda: types_of(commands, "bob", "img.qcow2"))
        (root / "bob" / "img.qcow2").rename(root / "bob" / "renamed.qcow2")
        await eventually(lambda: types_of(commands, "bob", "renamed.qcow2"))
        assert await types_of(commands, "bob", "img.qcow2") == ["file.appeared", "file.removed"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_periodic_scan_is_the_safety_net_without_inotify(commands: CommandService, tmp_path: Path) -> None:
    root = tmp_path / "files"
    (root / "carol").mkdir(parents=True)
    scanner = FileScanner(commands, root, interval=0.1, use_inotify=False)
    task = asyncio.create_task(scanner.run())
    try:
        await eventually(lambda: scanner.scans >= 1)
        (root / "carol" / "late.qcow2").write_bytes(b"late")
        await eventually(lambda: types_of(commands, "carol", "late.qcow2"))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
