"""Registering a built-in image (``tiny``) as an ordinary public image of the catalogue.

The same steps as an admin's own image, done in-process at installation (`ucloud up`'s
first start): the built file is put among the admin's files (``<files-root>/<admin>/
<name>.qcow2``, written under a hidden name and renamed so the file scanner never sees
half of it), the file scanner records it (size, sha256), the admin asks for a public
image of it, and the image scanner checks and imports it into the default store. This
waits until the image is ready, so the first ``vm create --image tiny`` finds it.

An image of that name that exists already is left as it is (VMs may depend on it);
one whose import failed is deleted and asked for again.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from ucloud.commands.aggregates import FILE, IMAGE
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.domain import file as file_domain
from ucloud.domain import image as image_domain
from ucloud.domain.errors import Rejected


class BuiltinImageError(RuntimeError):
    """The built-in image could not be registered; the message says why."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(4 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _place(source: Path, directory: Path, name: str, sha256: str) -> None:
    """The built file as ``directory/name``; a different file of that name is the admin's
    own and is not overwritten."""
    directory.mkdir(parents=True, exist_ok=True)
    existing = directory / name
    if existing.exists() and _sha256(existing) != sha256:
        raise BuiltinImageError(f"{existing} exists and is another file; move it away to register the "
                                f"built-in image")
    partial = directory / f".upload-builtin-{name}"
    shutil.copyfile(source, partial)
    os.replace(partial, directory / name)


async def register_builtin(commands: CommandService, files_root: Path, admin: str, name: str, built: Path, *,
                           realm: str = "ucloud-admin", timeout: float = 600.0,
                           poll: float = 0.2) -> image_domain.Image:
    """Make ``built`` the public image ``name`` (see the module); returns it ready."""
    actor = Actor(admin, realm, is_admin=True)
    image_id = image_domain.image_id_for("", name)

    async def image() -> image_domain.Image | None:
        return (await commands.repository.load(IMAGE, image_domain.stream_name(image_id))).state

    try:
        async with asyncio.timeout(timeout):
            current = await _register(commands, files_root, actor, admin, name, built, image, poll)
    except TimeoutError:
        raise BuiltinImageError(f"the built-in image {name!r} was not ready after {timeout:.0f} s (do the file "
                                f"scanner and the image scanner run on {files_root}?)") from None
    if current is None or current.status is not image_domain.ImageStatus.READY:
        reason = current.reason if current is not None else "it is gone"
        raise BuiltinImageError(f"the built-in image {name!r} was not imported: {reason}")
    return current


async def _register(commands: CommandService, files_root: Path, actor: Actor, admin: str, name: str, built: Path,
                    image: Callable[[], Awaitable[image_domain.Image | None]], poll: float) -> image_domain.Image | None:
    current = await image()
    if current is not None and current.status is image_domain.ImageStatus.FAILED:
        await commands.delete_image(actor, name, public=True)
        current = await image()
    if current is None or current.status is image_domain.ImageStatus.DELETED:
        file_name = f"{name}.qcow2"
        sha256 = await asyncio.to_thread(_sha256, built)
        file_id = file_domain.file_id_for(admin, file_name)

        async def recorded() -> bool:
            file = (await commands.repository.load(FILE, file_domain.stream_name(file_id))).state
            return file is not None and not file.removed and file.sha256 == sha256

        if not await recorded():
            await asyncio.to_thread(_place, built, Path(files_root) / admin, file_name, sha256)
            await _until(commands, recorded, poll)  # the file scanner hashes and records it
        try:
            await commands.create_image(actor, name, file_name, public=True, owner=admin)
        except Rejected:
            if await image() is None:  # not a concurrent registration of the same image
                raise

    async def imported() -> bool:
        current = await image()
        return current is None or current.status is not image_domain.ImageStatus.IMPORTING

    await _until(commands, imported, poll)  # the image scanner checks and imports it
    return await image()


async def _until(commands: CommandService, done: Callable[[], Awaitable[bool]], poll: float) -> None:
    """Until ``done()``, looked at again whenever the log grows (at least every ``poll`` s)."""
    head = await commands.store.head()
    while not await done():
        head = await commands.store.wait_for_events(head, poll)
