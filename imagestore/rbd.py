"""The Ceph RBD image store, through Ceph's own Python bindings (rados, rbd).

An image is converted to raw into the pool as ``image-<id>`` (Ceph clones raw images
only), written under a partial name first and renamed when complete; then snapshotted
(``base``) and the snapshot protected. A VM disk is a copy-on-write clone of that
snapshot, ``vm-<vm id>``, grown to the VM's size: a clone costs the same for any image
size. QEMU opens it natively (``rbd:pool/vm-<id>:conf=...``, qemu-block-extra). Deleting
the VM removes its clone; an image with clones cannot be removed (the snapshot stays
protected). The bindings block, so every call runs in a thread.

The bindings are Debian's python3-rbd/python3-rados; ``./bootstrap ceph-bindings`` (run by
``./bootstrap up|test``) makes them visible to the virtualenv.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from .stores import Disk, ImageStore, Imported, Progress, StoreError, convert

T = TypeVar("T")
SNAPSHOT = "base"
CONNECT_TIMEOUT = 20


def _bindings() -> tuple[Any, Any]:
    try:
        import rados
        import rbd
    except ImportError as error:
        raise StoreError("the Ceph bindings (python3-rados, python3-rbd) are not importable here; "
                         "run ./bootstrap ceph-bindings") from error
    return rados, rbd


class RbdStore(ImageStore):
    kind = "rbd"

    def __init__(self, name: str, pool: str, conf: Path) -> None:
        self.name = name
        self.pool = pool
        self.conf = Path(conf)

    def __repr__(self) -> str:
        return f"RbdStore({self.name!r}, pool {self.pool!r}, {str(self.conf)!r})"

    @contextmanager
    def _ioctx(self) -> Iterator[Any]:
        rados, _ = _bindings()
        try:
            cluster = rados.Rados(conffile=str(self.conf))
            cluster.connect(timeout=CONNECT_TIMEOUT)
        except rados.Error as error:
            raise StoreError(f"store {self.name}: cannot reach Ceph ({self.conf}): {error}") from error
        try:
            with cluster.open_ioctx(self.pool) as ioctx:
                yield ioctx
        except rados.Error as error:
            raise StoreError(f"store {self.name}: pool {self.pool}: {error}") from error
        finally:
            cluster.shutdown()

    async def _call(self, work: Callable[[Any], T]) -> T:
        def run() -> T:
            with self._ioctx() as ioctx:
                return work(ioctx)

        return await asyncio.to_thread(run)

    def _uri(self, image: str) -> str:
        return f"rbd:{self.pool}/{image}:conf={self.conf}"

    async def import_image(self, image_id: UUID, source: Path, progress: Progress,
                           pass_fds: tuple[int, ...] = ()) -> Imported:
        _, rbd = _bindings()
        final, partial = f"image-{image_id}", f"image-{image_id}.importing"
        await self._call(lambda ioctx: _remove_quietly(rbd, ioctx, partial))  # an import that died half-way
        try:
            await convert(source, self._uri(partial), "raw", progress, pass_fds=pass_fds)

            def seal(ioctx: Any) -> int:
                rbd.RBD().rename(ioctx, partial, final)
                with rbd.Image(ioctx, final) as image:
                    image.create_snap(SNAPSHOT)
                    image.protect_snap(SNAPSHOT)
                    return int(image.size())

            size = await self._call(seal)
        except BaseException:
            await self._call(lambda ioctx: _remove_quietly(rbd, ioctx, partial))
            raise
        return Imported(location=f"{self.pool}/{final}", stored_size=size)

    def _image_name(self, location: str) -> str:
        pool, _, name = location.partition("/")
        if pool != self.pool or not name.startswith("image-"):
            raise StoreError(f"{location} is not in store {self.name}")
        return name

    async def remove(self, image_id: UUID, location: str) -> None:
        _, rbd = _bindings()
        name = self._image_name(location)

        def remove(ioctx: Any) -> None:
            try:
                with rbd.Image(ioctx, name) as image:
                    if any(s["name"] == SNAPSHOT for s in image.list_snaps()):
                        if image.is_protected_snap(SNAPSHOT):
                            image.unprotect_snap(SNAPSHOT)  # refused while clones exist
                        image.remove_snap(SNAPSHOT)
            except rbd.ImageNotFound:
                return
            except rbd.Error as error:
                raise StoreError(f"store {self.name}: cannot remove {name}: {error}") from error
            rbd.RBD().remove(ioctx, name)

        await self._call(remove)

    def disk(self, vm_id: UUID, disks: Path) -> Disk:
        return Disk(self._uri(f"vm-{vm_id}"), "raw")

    async def clone(self, location: str, vm_id: UUID, size: int, disks: Path) -> Disk:
        _, rbd = _bindings()
        name = self._image_name(location)
        target = f"vm-{vm_id}"

        def clone(ioctx: Any) -> None:
            try:
                rbd.RBD().clone(ioctx, name, SNAPSHOT, ioctx, target, features=rbd.RBD_FEATURE_LAYERING)
            except rbd.ImageExists:
                return  # made on an earlier start
            except rbd.ImageNotFound as error:
                raise StoreError(f"image {name} is not in store {self.name}") from error
            with rbd.Image(ioctx, target) as image:
                if image.size() < size:
                    image.resize(size)

        await self._call(clone)
        return self.disk(vm_id, disks)

    async def clone_size(self, vm_id: UUID, disks: Path) -> int | None:
        _, rbd = _bindings()

        def size(ioctx: Any) -> int | None:
            try:
                with rbd.Image(ioctx, f"vm-{vm_id}", read_only=True) as image:
                    return int(image.size())
            except rbd.ImageNotFound:
                return None

        return await self._call(size)

    async def grow(self, vm_id: UUID, size: int, disks: Path) -> None:
        _, rbd = _bindings()

        def grow(ioctx: Any) -> None:
            with rbd.Image(ioctx, f"vm-{vm_id}") as image:
                if image.size() < size:
                    image.resize(size)

        await self._call(grow)

    async def remove_clone(self, vm_id: UUID, disks: Path) -> None:
        _, rbd = _bindings()
        await self._call(lambda ioctx: _remove_quietly(rbd, ioctx, f"vm-{vm_id}"))


def _remove_quietly(rbd: Any, ioctx: Any, name: str) -> None:
    try:
        rbd.RBD().remove(ioctx, name)
    except rbd.ImageNotFound:
        pass
    except rbd.ImageBusy as error:  # a client still watches it (a killed QEMU's watch times out)
        raise StoreError(f"{name} is still open somewhere; try again shortly") from error
