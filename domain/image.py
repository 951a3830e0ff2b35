"""Images: a user's (or a public) qcow2, imported from one of their files into an image store.

Status machine:

    importing ──imported──► ready ──(no VM uses it)──► deleted
        └──import_failed──► failed ─────────────────────► deleted

The image scanner (processes/images.py) imports an ``image.requested`` image: it checks
the file with ``qemu-img info`` (qcow2 only, no backing file, no external data file,
virtual size within the limit) and writes it into the named store. A VM disk is a
copy-on-write clone of a ready image: creating the VM records ``image.used`` on the
image's stream in the same append, and its deletion ``image.released``, so an image is
never deleted under a VM that depends on it (the two appends meet on this stream's
version) and the refusal names the VMs.
"""

from __future__ import annotations

import enum
import uuid
from uuid import UUID

import msgspec

from .errors import NotFound, Rejected
from .events import Command, Event

IMAGE_NAMESPACE = uuid.UUID("6f1f1d2e-8d53-4c1e-9a0e-4b2f5bd0c011")


def image_id_for(owner: str, name: str) -> UUID:
    """An image's id follows from (owner, name): one image of a name per owner."""
    return uuid.uuid5(IMAGE_NAMESPACE, f"{owner}\0{name}")


def image_key(owner: str, name: str, public: bool) -> UUID:
    """Public images share one namespace (their names are global); others are per owner."""
    return image_id_for("" if public else owner, name)


class ImageStatus(enum.StrEnum):
    IMPORTING = "importing"
    READY = "ready"
    FAILED = "failed"
    DELETED = "deleted"


class ImageRequested(Event, tag="image.requested", frozen=True):
    """A user asked for an image made from one of their files, in a named store."""

    image_id: UUID
    owner: str
    name: str
    public: bool
    store: str
    file_id: UUID
    file_name: str
    file_size: int
    file_sha256: str
    file_signature: str = ""  # the file's signature when hashed (domain/file.py)


class ImageImportProgressed(Event, tag="image.import_progressed", frozen=True):
    """How far the import is (0-100)."""

    image_id: UUID
    percent: int


class ImageImported(Event, tag="image.imported", frozen=True):
    """The image is in its store and ready: ``location`` is where the store keeps it."""

    image_id: UUID
    virtual_size: int
    stored_size: int
    location: str


class ImageImportFailed(Event, tag="image.import_failed", frozen=True):
    """The file was refused or the import failed; nothing of it is left in the store."""

    image_id: UUID
    reason: str


class ImageUsed(Event, tag="image.used", frozen=True):
    """A VM's disk is (to be) a clone of this image; appended with vm.requested."""

    image_id: UUID
    vm_id: UUID
    vm_name: str


class ImageReleased(Event, tag="image.released", frozen=True):
    """A VM that used this image is deleted; appended with vm.deleted."""

    image_id: UUID
    vm_id: UUID


class ImageDeleted(Event, tag="image.deleted", frozen=True):
    """The image is gone from the catalogue; the scanner removes it from its store."""

    image_id: UUID


ImageEvent = (ImageRequested | ImageImportProgressed | ImageImported | ImageImportFailed | ImageUsed
              | ImageReleased | ImageDeleted)
IMAGE_EVENT_TYPES: tuple[type[Event], ...] = ImageEvent.__args__


class CreateImage(Command, tag="image.create", frozen=True):
    owner: str
    name: str
    public: bool
    store: str
    file_id: UUID
    file_name: str
    file_size: int
    file_sha256: str
    file_signature: str = ""


class ReportImportProgress(Command, tag="image.report_progress", frozen=True):
    image_id: UUID
    percent: int


class ReportImported(Command, tag="image.report_imported", frozen=True):
    image_id: UUID
    virtual_size: int
    stored_size: int
    location: str


class ReportImportFailed(Command, tag="image.report_failed", frozen=True):
    image_id: UUID
    reason: str


class UseImage(Command, tag="image.use", frozen=True):
    image_id: UUID
    vm_id: UUID
    vm_name: str


class ReleaseImage(Command, tag="image.release", frozen=True):
    image_id: UUID
    vm_id: UUID


class DeleteImage(Command, tag="image.delete", frozen=True):
    image_id: UUID


class Image(msgspec.Struct, frozen=True, kw_only=True):
    id: UUID
    owner: str
    name: str
    public: bool
    store: str
    file_id: UUID
    file_name: str
    file_size: int
    file_sha256: str
    status: ImageStatus
    file_signature: str = ""
    reason: str = ""
    progress: int = 0
    virtual_size: int = 0
    stored_size: int = 0
    location: str = ""
    users: dict[UUID, str] = {}  # VM id -> VM name, the VMs whose disks are clones of it


def evolve(image: Image | None, event: Event) -> Image | None:
    match event:
        case ImageRequested():
            return Image(id=event.image_id, owner=event.owner, name=event.name, public=event.public,
                         store=event.store, file_id=event.file_id, file_name=event.file_name,
                         file_size=event.file_size, file_sha256=event.file_sha256, status=ImageStatus.IMPORTING,
                         file_signature=event.file_signature)
    if image is None:
        return None
    match event:
        case ImageImportProgressed():
            return msgspec.structs.replace(image, progress=event.percent)
        case ImageImported():
            return msgspec.structs.replace(image, status=ImageStatus.READY, progress=100,
                                           virtual_size=event.virtual_size, stored_size=event.stored_size,
                                           location=event.location)
        case ImageImportFailed():
            return msgspec.structs.replace(image, status=ImageStatus.FAILED, reason=event.reason)
        case ImageUsed():
            return msgspec.structs.replace(image, users={**image.users, event.vm_id: event.vm_name})
        case ImageReleased():
            return msgspec.structs.replace(image, users={k: v for k, v in image.users.items() if k != event.vm_id})
        case ImageDeleted():
            return msgspec.structs.replace(image, status=ImageStatus.DELETED)
    return image


def describe_users(users: dict[UUID, str]) -> str:
    shown = [f"{name} ({vm_id})" for vm_id, name in sorted(users.items(), key=lambda item: item[1])]
    more = f" and {len(shown) - 10} more" if len(shown) > 10 else ""
    return ", ".join(shown[:10]) + more


def decide(image: Image | None, command: Command) -> list[Event]:
    match command:
        case CreateImage():
            if image is not None and image.status is not ImageStatus.DELETED:
                raise Rejected(f"an image named {command.name!r} already exists ({image.status})", "name")
            return [ImageRequested(
                image_id=image_key(command.owner, command.name, command.public), owner=command.owner, name=command.name,
                public=command.public, store=command.store, file_id=command.file_id, file_name=command.file_name,
                file_size=command.file_size, file_sha256=command.file_sha256, file_signature=command.file_signature)]
    if image is None or image.status is ImageStatus.DELETED:
        raise NotFound(f"image {getattr(command, 'image_id', '?')} does not exist")
    match command:
        case ReportImportProgress():
            if image.status is not ImageStatus.IMPORTING:
                return []
            percent = max(0, min(100, command.percent))
            return [ImageImportProgressed(image_id=image.id, percent=percent)] if percent > image.progress else []
        case ReportImported():
            if image.status is not ImageStatus.IMPORTING:
                raise Rejected(f"image {image.name!r} is {image.status}, not importing")
            return [ImageImported(image_id=image.id, virtual_size=command.virtual_size,
                                  stored_size=command.stored_size, location=command.location)]
        case ReportImportFailed():
            if image.status is not ImageStatus.IMPORTING:
                raise Rejected(f"image {image.name!r} is {image.status}, not importing")
            return [ImageImportFailed(image_id=image.id, reason=command.reason[:1000])]
        case UseImage():
            if image.status is ImageStatus.IMPORTING:
                raise Rejected(f"image: {image.name!r} is still importing ({image.progress}%); "
                               "create the VM once it is ready", "image")
            if image.status is ImageStatus.FAILED:
                raise Rejected(f"image: {image.name!r} failed to import: {image.reason}", "image")
            if command.vm_id in image.users:
                return []
            return [ImageUsed(image_id=image.id, vm_id=command.vm_id, vm_name=command.vm_name)]
        case ReleaseImage():
            if command.vm_id not in image.users:
                return []
            return [ImageReleased(image_id=image.id, vm_id=command.vm_id)]
        case DeleteImage():
            if image.users:
                raise Rejected(f"image {image.name!r} is in use by {len(image.users)} VM(s): "
                               f"{describe_users(image.users)}; delete them first")
            return [ImageDeleted(image_id=image.id)]
    raise Rejected(f"{type(command).__name__} is not an image command")


def stream_name(image_id: UUID) -> str:
    return f"image-{image_id}"
