"""The file scanner: keeps the log's record of users' files true to the files root.

It runs where the files are (inside `ucloud up`, or `ucloud processes --files-root` on the
file server). ``<files-root>/<user>/<name>``: every regular file with a valid name is
recorded with its size and sha256 (``file.appeared``, ``file.changed``), and a recorded
file that is gone is recorded removed (``file.removed``). Hidden names (partial uploads,
``.upload-*``), symbolic links and anything that is not a regular file are not files of
the user's.

Nothing unchanged is hashed again: a file whose (size, mtime, inode, ctime) are those it
had when it was last hashed is skipped; after a restart each file is hashed once. inotify
(asyncinotify) wakes a scan when something in a user's directory changes; a periodic scan
is the safety net (a missed event, an overflowed queue, a file system without inotify).
A scan compares the directories with the log's own view of the files (a projection the
scanner follows), so what happened while it was down is caught up on its next scan.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import stat
from pathlib import Path

from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.domain.errors import DomainError
from ucloud.domain.file import FILE_NAME_MAX_LENGTH, check_file_name, signature_of
from ucloud.domain.names import check_user_name
from ucloud.projections.runner import ProjectionRunner
from ucloud.projections.views import FilesView

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (owner, name)
Signature = tuple[int, int, int, int]  # size, mtime_ns, inode, ctime_ns


def _valid(check: object, value: str) -> bool:
    try:
        check(value)  # type: ignore[operator]
    except DomainError:
        return False
    return True


def list_files(root: Path) -> dict[Key, Signature]:
    """Every user's regular files under ``root``, never through a symbolic link."""
    found: dict[Key, Signature] = {}
    try:
        users = list(os.scandir(root))
    except FileNotFoundError:
        return found
    for user in users:
        if not user.is_dir(follow_symlinks=False) or not _valid(check_user_name, user.name):
            continue
        try:
            entries = list(os.scandir(user.path))
        except OSError:
            continue
        for entry in entries:
            if len(entry.name) > FILE_NAME_MAX_LENGTH or not _valid(check_file_name, entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found[(user.name, entry.name)] = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    return found


def fd_signature(fd: int) -> str:
    st = os.fstat(fd)
    return signature_of(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def hash_file(path: Path) -> tuple[int, str, str] | None:
    """(size, sha256, signature) of a regular file opened without following a link; None if
    it is gone, or changed while it was read (the next scan takes it again)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        before = fd_signature(fd)
        digest = hashlib.sha256()
        size = 0
        while chunk := os.read(fd, 4 * 1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
        if fd_signature(fd) != before:
            return None
        return size, digest.hexdigest(), before
    finally:
        os.close(fd)


class FileScanner:
    name = "file-scanner"

    def __init__(self, commands: CommandService, files_root: Path, *, interval: float = 300.0,
                 use_inotify: bool = True, settle: float = 0.3) -> None:
        """``interval``: seconds between two scans when nothing wakes one; ``settle``: how
        long a burst of inotify events is let go on before the scan it wakes."""
        self.commands = commands
        self.root = Path(files_root)
        self.interval = interval
        self.use_inotify = use_inotify
        self.settle = settle
        self.actor = Actor(self.name, "ucloud-system", is_admin=True)
        self.view = FilesView()
        self.runner = ProjectionRunner(commands.store, commands.codec, [self.view], name=self.name)
        self.hashed_at: dict[Key, Signature] = {}
        self.hashes = 0  # files hashed since the start: what "rescans nothing unchanged" is measured by
        self.scans = 0
        self.watching = False
        self._wake = asyncio.Event()

    async def scan(self) -> None:
        """One pass: record what appeared, changed and went since the log last said."""
        await self.runner.catch_up()
        on_disk = await asyncio.to_thread(list_files, self.root)
        for (owner, name), signature in sorted(on_disk.items()):
            recorded = self.view.get(owner, name)
            if recorded is not None and self.hashed_at.get((owner, name)) == signature:
                continue
            hashed = await asyncio.to_thread(hash_file, self.root / owner / name)
            if hashed is None:
                continue  # gone meanwhile: the next scan sees it gone
            self.hashes += 1
            size, sha256, recorded_signature = hashed
            self.hashed_at[(owner, name)] = signature
            await self.commands.record_file(self.actor, name, size, sha256, owner=owner,
                                            signature=recorded_signature)
        for file in self.view.of(None):
            if (file.owner, file.name) not in on_disk:
                self.hashed_at.pop((file.owner, file.name), None)
                await self.commands.remove_file(self.actor, file.name, file.owner, missing_ok=True)
        self.scans += 1

    async def run(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        watcher = asyncio.create_task(self._watch()) if self.use_inotify else None
        try:
            while True:
                try:
                    await self.scan()
                except DomainError as error:  # a name the command side refuses: skip it this pass
                    log.warning("file scan: %s", error)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval):
                        await self._wake.wait()
                    await asyncio.sleep(self.settle)  # let a burst of writes finish
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

    async def _watch(self) -> None:
        """Wake a scan on every change in the files root or a user's directory."""
        try:
            from asyncinotify import Inotify, Mask
        except (ImportError, OSError) as error:  # no inotify here: the periodic scan remains
            log.warning("file scanner: no inotify (%s); scanning every %gs", error, self.interval)
            return
        changes = (Mask.CLOSE_WRITE | Mask.MOVED_TO | Mask.MOVED_FROM | Mask.DELETE | Mask.CREATE
                   | Mask.ATTRIB | Mask.DELETE_SELF | Mask.ONLYDIR | Mask.DONT_FOLLOW)
        with Inotify() as inotify:
            watched: set[str] = set()

            def watch_users() -> None:
                for user in os.scandir(self.root):
                    if user.is_dir(follow_symlinks=False) and user.path not in watched:
                        with contextlib.suppress(OSError):
                            inotify.add_watch(user.path, changes)
                            watched.add(user.path)

            inotify.add_watch(self.root, Mask.CREATE | Mask.MOVED_TO | Mask.ONLYDIR | Mask.DONT_FOLLOW)
            watch_users()
            self.watching = True
            self._wake.set()  # a scan now covers whatever happened before the watches were in place
            async for event in inotify:
                if event.mask & Mask.Q_OVERFLOW:
                    log.warning("file scanner: inotify queue overflowed; rescanning")
                if event.mask & Mask.ISDIR or event.mask & Mask.IGNORED:
                    watched = {p for p in watched if os.path.isdir(p)}
                    watch_users()
                self._wake.set()
