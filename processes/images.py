"""The image scanner: a process manager that imports requested images into their stores.

For each ``image.requested`` after its tracked position it opens the user's file (never
through a symbolic link: a user could otherwise point one at another tenant's disk or a
system file), checks its qcow2 header (imagestore/inspect.py: qcow2 only, no backing
file, no external data file, virtual size within the limit), then copies it into the
image's store while ``qemu-img info`` and ``qemu-img check`` inspect it beside the copy (a
refusal stops the copy and removes it; the image is ready only when both passed) and, for
a file not known by its signature, its sha256 is computed beside it; it records ``image.imported``,
or ``image.import_failed`` with the reason, together with its tracking position
(exactly-once). Progress is recorded in steps of 10% as the copy advances, at most one
every half second. A file whose sha256
is no longer the one the image was asked for (it changed meanwhile) is refused. For
``image.deleted`` it removes the image from its store.

A scanner that dies during an import imports again after its restart: the store writes
to a partial name first and removes leftovers, so nothing half-imported is ever ready.
It runs on the shared process-manager framework (processes/framework.py): leader lease,
subscription from its position, snapshots, metrics.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

from ucloud.commands.aggregates import IMAGE
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.domain import image as image_domain
from ucloud.domain.errors import DomainError
from ucloud.domain.limits import TiB
from ucloud.eventstore.errors import TrackingConflict
from ucloud.eventstore.records import EventRecord, Tracking
from ucloud.imagestore.inspect import ImageRefused, check_header, inspect_qcow2
from ucloud.imagestore.stores import ImageStore, StoreError

from .files import fd_signature
from .framework import ProcessManager, ProcessRunner

log = logging.getLogger(__name__)

_WATCHED = frozenset({"image.requested", "image.deleted"})
PROGRESS_STEP = 10  # percent between two progress events
# Seconds between two progress events at least: each is an append (a load of the image's
# stream, a decision, a transaction), which an import over in a second does not need and
# which cost it a tenth of its CPU time (docs/performance.md, images).
PROGRESS_INTERVAL = 0.5
CHUNK = 4 * 1024 * 1024


class FileRefused(Exception):
    pass


def open_user_file(root: Path, owner: str, name: str) -> int:
    """A descriptor of ``<root>/<owner>/<name>``, a regular file reached without following
    any symbolic link below ``root``; FileRefused otherwise."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        directory = os.open(root / owner, flags | os.O_DIRECTORY)
    except OSError:
        raise FileRefused(f"the file {name!r} is gone (no directory for {owner})") from None
    try:
        fd = os.open(name, flags | os.O_NONBLOCK, dir_fd=directory)
    except FileNotFoundError:
        raise FileRefused(f"the file {name!r} is gone") from None
    except OSError as error:
        raise FileRefused(f"the file {name!r} cannot be opened ({error.strerror}; a symbolic link?)") from None
    finally:
        os.close(directory)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileRefused(f"{name!r} is not a regular file")
    return fd


def sha256_of(fd: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


class ImageScanner(ProcessManager):
    """On the shared framework (processes/framework.py): ``ProcessRunner`` subscribes from
    its snapshot's position to the two event types, holds the leader lease, counts and
    snapshots; this manager's view is empty (each image is loaded from its own stream when
    its event comes), so a snapshot only records how far the log was read."""

    name = "image-scanner"
    interested_in = _WATCHED

    def __init__(self, commands: CommandService, stores: dict[str, ImageStore], files_root: Path, *,
                 max_virtual_size: int = 64 * TiB, progress_interval: float = PROGRESS_INTERVAL) -> None:
        self.commands = commands
        self.store = commands.store
        self.codec = commands.codec
        self.stores = stores
        self.files_root = Path(files_root)
        self.max_virtual_size = max_virtual_size
        self.progress_interval = progress_interval
        self.consumer = self.name  # stable: the tracking key
        self.actor = Actor(self.name, "ucloud-system", is_admin=True)
        self.imported = 0
        self.failed = 0

    async def run(self) -> None:
        """Follow the log alone, no leader election (tests, one process): the framework's
        runner without leases."""
        await ProcessRunner(self, self.store).run()

    async def handle_run(self, records: list[EventRecord]) -> None:
        for record in records:
            if record.position <= self.tracked:
                continue  # handled before (its tracking position is recorded)
            await self.handle(record)
            self.tracked = record.position

    def dump(self) -> Any:
        return None

    def load(self, data: Any) -> None:
        pass

    async def handle(self, record: EventRecord) -> None:
        event = self.codec.decode(record.type, record.schema, record.data)
        tracking = Tracking(self.consumer, record.position)
        try:
            match event:
                case image_domain.ImageRequested():
                    await self._requested(event.image_id, tracking)
                case image_domain.ImageDeleted():
                    await self._deleted(event.image_id, tracking)
        except TrackingConflict:
            pass  # another scanner of our name recorded it first

    async def _load(self, image_id: Any) -> image_domain.Image | None:
        loaded = await self.commands.repository.load(IMAGE, image_domain.stream_name(image_id))
        return loaded.state

    async def _requested(self, image_id: Any, tracking: Tracking) -> None:
        image = await self._load(image_id)
        if image is None or image.status is not image_domain.ImageStatus.IMPORTING:
            await self.store.append(tracking=tracking)  # deleted (or done) before we came to it
            return
        report = await self.import_image(image)
        try:
            await self.commands.report_image(self.actor, report, tracking=tracking)
        except DomainError as error:  # deleted while we imported: take it out of the store again
            log.info("image %s: %s; removing what was imported", image.name, error)
            if isinstance(report, image_domain.ReportImported):
                await self.stores[image.store].remove(image.id, report.location)
            await self.store.append(tracking=tracking)
            return
        if isinstance(report, image_domain.ReportImported):
            self.imported += 1
        else:
            self.failed += 1

    async def _deleted(self, image_id: Any, tracking: Tracking) -> None:
        image = await self._load(image_id)
        if image is not None and image.location and image.store in self.stores:
            await self.stores[image.store].remove(image.id, image.location)
        await self.store.append(tracking=tracking)

    async def import_image(self, image: image_domain.Image) -> image_domain.ReportImported | image_domain.ReportImportFailed:
        """Check and import one image; what to record about it."""

        def failed(reason: str) -> image_domain.ReportImportFailed:
            log.info("image %s of %s refused: %s", image.name, image.owner, reason)
            return image_domain.ReportImportFailed(image_id=image.id, reason=reason)

        store = self.stores.get(image.store)
        if store is None:
            return failed(f"this installation's image scanner has no store named {image.store!r}")
        try:
            fd = await asyncio.to_thread(open_user_file, self.files_root, image.owner, image.file_name)
        except FileRefused as error:
            return failed(str(error))
        source = Path(f"/dev/fd/{fd}")
        tasks: list[asyncio.Task[Any]] = []
        try:
            # The header first, in Python: a file that passes names no backing file and no
            # external data file, so no qemu-img that opens it opens anything else. Then
            # `qemu-img info` and `check` run beside the copy (not before it: the copy does
            # not wait for them), and the image is ready only when both passed; a refusal
            # stops the copy and removes what it wrote.
            try:
                await asyncio.to_thread(check_header, source, self.max_virtual_size)
            except ImageRefused as error:
                return failed(str(error))
            reported, last = 0, time.monotonic()

            async def progress(percent: int) -> None:
                nonlocal reported, last
                now = time.monotonic()
                if percent >= reported + PROGRESS_STEP and now - last >= self.progress_interval:
                    reported, last = percent - percent % PROGRESS_STEP, now
                    await self.commands.report_image(self.actor, image_domain.ReportImportProgress(
                        image_id=image.id, percent=reported))

            # The file is the one the image was asked for if it still has the signature it had
            # when it was hashed (inode, size, mtime, ctime: ctime moves on every change and
            # no user can set it) and keeps it to the end of the copy. Without a signature
            # (or with another one) the digest is computed in a thread beside the copy.
            before = fd_signature(fd)
            trusted = bool(image.file_signature) and before == image.file_signature
            copy = asyncio.create_task(store.import_image(image.id, source, progress, pass_fds=(fd,)))
            inspection = asyncio.create_task(inspect_qcow2(source, self.max_virtual_size, pass_fds=(fd,)))
            digest = None if trusted else asyncio.create_task(asyncio.to_thread(sha256_of, fd))
            tasks = [t for t in (copy, inspection, digest) if t is not None]
            try:
                info = await inspection
            except ImageRefused as error:
                copy.cancel()  # the store removes its partial copy
                await asyncio.wait([copy])
                if not copy.cancelled() and copy.exception() is None:  # it had finished first
                    await store.remove(image.id, copy.result().location)
                return failed(str(error))
            try:
                imported = await copy
            except StoreError as error:
                return failed(f"the import into store {store.name} failed: {error}")
            changed = ""
            if digest is not None:
                sha256 = await digest
                if sha256 != image.file_sha256:
                    changed = f"its sha256 is now {sha256}, not {image.file_sha256}"
            if not changed and fd_signature(fd) != before:
                changed = "it was written to during the import"
            if changed:
                await store.remove(image.id, imported.location)
                return failed(f"the file {image.file_name!r} changed since the image was asked for ({changed})")
        finally:
            for task in tasks[:2]:  # the copy and the inspection: their qemu-img is killed
                task.cancel()
            if tasks:  # the digest's thread reads the descriptor closed below: let it end
                await asyncio.wait(tasks)
            for task in tasks:
                if not task.cancelled():
                    task.exception()  # seen: an outcome not used above is not an error of its own
            os.close(fd)
        log.info("image %s of %s imported into %s (%d bytes virtual)", image.name, image.owner, store.name,
                 info.virtual_size)
        return image_domain.ReportImported(image_id=image.id, virtual_size=info.virtual_size,
                                           stored_size=imported.stored_size, location=imported.location)
