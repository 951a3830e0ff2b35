"""Image stores behind one interface: where imported images live and how a VM disk is
cloned from one.

- ``FsStore`` (the default): the image is a read-only qcow2 file under the store's root;
  a VM disk is a qcow2 overlay whose backing file is the image, so a clone costs the
  same for any image size, and deleting the VM removes the overlay, never the image.
- ``RbdStore`` (imagestore/rbd.py): the image is a raw RBD image in a Ceph pool with a
  protected snapshot; a VM disk is a copy-on-write RBD clone of that snapshot.

The image scanner imports into a store (``import_image``); the host agent clones,
grows and removes VM disks (``clone``, ``grow``, ``remove_clone``). A store is named in
configuration (``NAME=fs:/path``, ``NAME=rbd:POOL[:CEPH_CONF]``); hosts declare the
stores they reach, and placement goes only to those.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

Progress = Callable[[int], Awaitable[None]]
_PROGRESS = re.compile(rb"\(([0-9]+(?:\.[0-9]+)?)/100%\)")
_STORE_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)


class StoreError(Exception):
    """A store operation failed; the message says what and why."""


@dataclass(frozen=True)
class Imported:
    location: str
    stored_size: int


@dataclass(frozen=True)
class Disk:
    """A VM disk as QEMU opens it: a file path, or ``rbd:pool/name:conf=...`` (raw)."""

    path: str
    format: str


class ImageStore(ABC):
    name: str
    kind: str

    @abstractmethod
    async def import_image(self, image_id: UUID, source: Path, progress: Progress,
                           pass_fds: tuple[int, ...] = ()) -> Imported:
        """Copy a checked qcow2 into the store; leaves nothing behind when it fails.
        ``pass_fds``: descriptors ``source`` names (``/dev/fd/N``) that qemu-img inherits."""

    @abstractmethod
    async def remove(self, image_id: UUID, location: str) -> None:
        """Remove an imported image (idempotent)."""

    @abstractmethod
    async def clone(self, location: str, vm_id: UUID, size: int, disks: Path) -> Disk:
        """A copy-on-write VM disk of ``size`` bytes on the image (idempotent: an
        existing clone is returned as it is)."""

    @abstractmethod
    async def clone_size(self, vm_id: UUID, disks: Path) -> int | None:
        """The clone's virtual size in bytes, None if it does not exist."""

    @abstractmethod
    async def grow(self, vm_id: UUID, size: int, disks: Path) -> None:
        """Grow a clone no VM has open (a running guest's disk grows through QMP)."""

    @abstractmethod
    async def remove_clone(self, vm_id: UUID, disks: Path) -> None:
        """Remove a VM's clone (idempotent)."""

    @abstractmethod
    def disk(self, vm_id: UUID, disks: Path) -> Disk:
        """Where a VM's clone is (whether or not it exists yet)."""


async def run(*argv: str, what: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise StoreError(f"{what}: {argv[0]} {argv[1]} failed: {err.decode(errors='replace').strip()[-500:]}")
    return out


async def convert(source: Path, target: str, target_format: str, progress: Progress, *extra: str,
                  pass_fds: tuple[int, ...] = ()) -> None:
    """``qemu-img convert -p`` from a qcow2, reporting whole percents as they pass."""
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "convert", "-p", "-f", "qcow2", "-O", target_format, *extra, str(source), target,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds)
    assert proc.stdout is not None and proc.stderr is not None
    reported = 0
    buffer = b""
    try:
        while chunk := await proc.stdout.read(4096):
            buffer = (buffer + chunk)[-256:]
            matches = _PROGRESS.findall(buffer)
            if matches:
                percent = int(float(matches[-1]))
                if percent > reported and percent < 100:
                    reported = percent
                    await progress(percent)
        err = await proc.stderr.read()
        code = await proc.wait()
    except BaseException:  # cancelled (the file was refused meanwhile) or failed: stop writing at once
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if code != 0:
        raise StoreError(f"qemu-img convert failed: {err.decode(errors='replace').strip()[-500:]}")


class FsStore(ImageStore):
    kind = "fs"

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = Path(root).absolute()

    def __repr__(self) -> str:
        return f"FsStore({self.name!r}, {str(self.root)!r})"

    def path_of(self, image_id: UUID) -> Path:
        return self.root / f"{image_id}.qcow2"

    async def import_image(self, image_id: UUID, source: Path, progress: Progress,
                           pass_fds: tuple[int, ...] = ()) -> Imported:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path_of(image_id)
        partial = self.root / f".importing-{image_id}.qcow2"
        partial.unlink(missing_ok=True)  # an import that died half-way
        try:
            await convert(source, str(partial), "qcow2", progress, pass_fds=pass_fds)
            os.chmod(partial, 0o444)  # the base of every clone: nothing writes to it again
            os.replace(partial, final)
        finally:
            partial.unlink(missing_ok=True)
        return Imported(location=str(final), stored_size=final.stat().st_size)

    async def remove(self, image_id: UUID, location: str) -> None:
        path = Path(location)
        if path.parent != self.root:
            raise StoreError(f"{location} is not in store {self.name}")
        path.unlink(missing_ok=True)

    def disk(self, vm_id: UUID, disks: Path) -> Disk:
        return Disk(str(Path(disks).absolute() / f"{vm_id}.qcow2"), "qcow2")

    async def clone(self, location: str, vm_id: UUID, size: int, disks: Path) -> Disk:
        disk = self.disk(vm_id, disks)
        if Path(disk.path).exists():
            return disk
        base = Path(location)
        if not base.is_file():
            raise StoreError(f"image {base.name} is not in store {self.name} on this host")
        Path(disks).mkdir(parents=True, exist_ok=True)
        partial = Path(disk.path).with_name(f".{vm_id}.qcow2")
        partial.unlink(missing_ok=True)
        await run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(partial), str(size),
                  what=f"cloning {base.name}")
        os.replace(partial, disk.path)
        return disk

    async def clone_size(self, vm_id: UUID, disks: Path) -> int | None:
        disk = self.disk(vm_id, disks)
        if not Path(disk.path).exists():
            return None
        info = json.loads(await run("qemu-img", "info", "--output=json", "-U", "-f", "qcow2", disk.path,
                                    what="reading a VM disk"))
        return int(info["virtual-size"])

    async def grow(self, vm_id: UUID, size: int, disks: Path) -> None:
        await run("qemu-img", "resize", "-q", "-f", "qcow2", self.disk(vm_id, disks).path, str(size),
                  what="growing a VM disk")

    async def remove_clone(self, vm_id: UUID, disks: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            Path(self.disk(vm_id, disks).path).unlink()


def parse_store(spec: str) -> ImageStore:
    """``NAME=fs:/path`` or ``NAME=rbd:POOL[:CEPH_CONF]`` -> a store; ValueError naming what is wrong."""
    name, sep, rest = spec.partition("=")
    kind, sep2, where = rest.partition(":")
    if not sep or not sep2 or not where:
        raise ValueError(f"image store {spec!r}: write NAME=fs:/path or NAME=rbd:POOL[:CEPH_CONF]")
    if not _STORE_NAME.fullmatch(name):
        raise ValueError(f"image store {spec!r}: the name must be 1-63 of a-z 0-9 '-'")
    if kind == "fs":
        if not where.startswith("/"):
            raise ValueError(f"image store {spec!r}: the path must be absolute")
        return FsStore(name, Path(where))
    if kind == "rbd":
        from .rbd import RbdStore

        pool, _, conf = where.partition(":")
        if not _STORE_NAME.fullmatch(pool) or (conf and not conf.startswith("/")):
            raise ValueError(f"image store {spec!r}: write NAME=rbd:POOL[:/path/to/ceph.conf]")
        return RbdStore(name, pool, Path(conf) if conf else Path("/etc/ceph/ceph.conf"))
    raise ValueError(f"image store {spec!r}: the kind must be fs or rbd, not {kind!r}")


def parse_stores(specs: tuple[str, ...] | list[str]) -> dict[str, ImageStore]:
    stores: dict[str, ImageStore] = {}
    for spec in specs:
        store = parse_store(spec)
        if store.name in stores:
            raise ValueError(f"two image stores are named {store.name!r}")
        stores[store.name] = store
    return stores
