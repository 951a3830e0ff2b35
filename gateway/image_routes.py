"""Files, images and VM resize over HTTP.

An upload is streamed to ``<files_root>/<user>/.upload-*`` while its sha256 is computed,
bounded by the gateway's per-file limit and the user's quota (413 the moment either is
passed, the partial file removed), checked against ``X-Ucloud-Sha256`` when the client
sends it (422 on a mismatch), and only then renamed into place and recorded
(``file.appeared``/``file.changed``): a refused upload leaves nothing behind. Images are
made from a user's files by the image scanner (processes/images.py); these routes ask
for them, list them and delete them.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeAlias
from uuid import UUID

import msgspec
from aiohttp import web

from ucloud.domain import file as file_domain
from ucloud.domain import image as image_domain
from ucloud.domain.errors import InvalidValue, NotFound, Rejected
from ucloud.domain.names import NAME_MAX_LENGTH, NAME_PATTERN
from ucloud.domain.units import format_size

from .inputs import check_value
from .keys import COMMANDS, CONFIG, READ_MODELS, actor_of
from .routes import (
    BODY_LIMIT,
    OWNER_PARAM,
    VM_ID,
    Accepted,
    ApiDoc,
    Param,
    UserName,
    _cores,
    _meta,
    _size,
    _visible_owner,
    answer,
    api_on,
    reach_position,
)

image_routes = web.RouteTableDef()
SHA256_HEADER = "X-Ucloud-Sha256"
CHUNK = 1024 * 1024
RESERVE_STEP = 64 * 1024 * 1024  # what a chunked upload reserves of the quota at a time


api = api_on(image_routes)


FileName = Annotated[str, _meta(max_length=file_domain.FILE_NAME_MAX_LENGTH, pattern=file_domain.FILE_NAME_PATTERN,
                                examples=["debian-12.qcow2"])]
Sha256 = Annotated[str, _meta(min_length=64, max_length=64, pattern=file_domain.SHA256_PATTERN)]
ImageName = Annotated[str, _meta(max_length=NAME_MAX_LENGTH, pattern=NAME_PATTERN, examples=["debian-12-custom"])]
StoreName = Annotated[str, _meta(max_length=NAME_MAX_LENGTH, pattern=NAME_PATTERN, examples=["local"])]

if TYPE_CHECKING:
    VmCores: TypeAlias = int | str
    VmRam: TypeAlias = int | str
    VmDisk: TypeAlias = int | str
else:
    VmCores, VmRam, VmDisk = _cores("vm_cores"), _size("vm_ram"), _size("vm_disk")

FILE_NAME = Param.of("name", "path", "The file's name in your directory.", FileName)
IMAGE_NAME = Param.of("name", "path", "The image's name.", ImageName)
SHA_PARAM = Param.of(SHA256_HEADER, "header", "The sha256 of the body (hex); the upload is refused (422) and "
                     "nothing kept when the body does not have it.", Sha256)
PUBLIC_PARAM = Param.of("public", "query", "The public image of that name (admins).", bool)


class FileOut(msgspec.Struct, kw_only=True):
    name: str
    owner: str
    size: int
    sha256: str
    updated_at: datetime


class FileAccepted(msgspec.Struct, kw_only=True):
    name: str
    size: int
    sha256: str
    position: int


class FileList(msgspec.Struct, kw_only=True):
    files: list[FileOut]
    position: int


class CreateImageBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: ImageName
    file: FileName
    public: bool = False  # admins: an image every user may create VMs from
    store: StoreName | None = None  # default: the installation's first store
    owner: UserName | None = None  # admins: another user's file and image


class ResizeBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    cores: VmCores | None = None
    ram: VmRam | None = None
    disk: VmDisk | None = None


class ImageOut(msgspec.Struct, kw_only=True):
    id: UUID
    name: str
    owner: str
    public: bool
    store: str
    status: str
    reason: str
    progress: int
    file: str
    file_sha256: str
    virtual_size: int
    stored_size: int
    used_by: list[UUID]
    created_at: datetime


class ImageList(msgspec.Struct, kw_only=True):
    images: list[ImageOut]
    position: int


# ResizeBody: a JSON number with no fraction is an integer (as in gateway/routes.py);
# CreateImageBody has no numbers, and strict decoding keeps 0 from passing as false.
_DECODERS: dict[type, msgspec.json.Decoder[Any]] = {
    CreateImageBody: msgspec.json.Decoder(CreateImageBody), ResizeBody: msgspec.json.Decoder(ResizeBody, strict=False)}


async def _decode(request: web.Request, body_type: type[Any]) -> Any:
    raw = await request.read()
    if not raw.strip():
        raise InvalidValue("body", "the request needs a JSON object body")
    return _DECODERS[body_type].decode(raw)


def _files_root(request: web.Request) -> Path:
    root = request.app[CONFIG].files_root
    if root is None:
        raise web.HTTPNotImplemented(text="this gateway keeps no files (it has no files root configured)")
    return root


def _file_out(views: Any, file: file_domain.File) -> FileOut:
    return FileOut(name=file.name, owner=file.owner, size=file.size, sha256=file.sha256,
                   updated_at=views.files.updated[file.id])


def _image_out(views: Any, image: image_domain.Image) -> ImageOut:
    return ImageOut(id=image.id, name=image.name, owner=image.owner, public=image.public, store=image.store,
                    status=image.status.value, reason=image.reason, progress=image.progress, file=image.file_name,
                    file_sha256=image.file_sha256, virtual_size=image.virtual_size, stored_size=image.stored_size,
                    used_by=sorted(image.users, key=str), created_at=views.images.created[image.id])


def _user_dir(root: Path, owner: str) -> Path:
    """``<files_root>/<owner>``; a user name longer than a file name may be has none."""
    if len(owner) > 255:
        raise Rejected(f"owner: a user name of {len(owner)} characters has no files directory (255 at most)",
                       "owner")
    return root / owner


def _used(directory: Path, *but: str) -> int:
    """The bytes of the files in ``directory`` (uploads under way at what they reserved)."""
    if not directory.is_dir():
        return 0
    total = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name in but:
                continue
            try:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:  # a refused upload's partial file, removed meanwhile
                pass
    return total


@dataclass(frozen=True)
class Grant:
    reserved: int  # the upload's reservation now (its partial file's size)
    used: int  # by the user's other files and the other uploads under way


def _reserve(directory: Path, out: Any, partial: str, name: str, want: int, quota: int) -> Grant:
    """Grow this upload's reservation to ``want`` bytes if the user's quota has room for it
    besides everything else in their directory; decided under a lock on the directory
    (``flock``: on one machine, or a files root whose file system carries it), so that
    concurrent uploads (in this gateway or another on the same files root) see each other's
    reservations. The reservation is the partial file's size (``ftruncate``: sparse, no
    data written), which is what every other upload's count reads."""
    lock = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the directory itself: released when closed
        used = _used(directory, partial, name)
        reserved = os.fstat(out.fileno()).st_size
        if want > reserved and used + want <= quota:
            os.ftruncate(out.fileno(), want)
            reserved = want
        return Grant(reserved, used)
    finally:
        os.close(lock)


def _finish(out: Any, size: int) -> None:
    """The reservation down to what arrived, and on disk."""
    out.flush()
    os.ftruncate(out.fileno(), size)
    os.fsync(out.fileno())


def _too_large(text: str, limit: int) -> web.HTTPRequestEntityTooLarge:
    return web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=limit + 1, text=text)


# -- files ------------------------------------------------------------------------------------------


@api("PUT", "/v1/files/{name}", ApiDoc(
    "Upload a file", "uploadFile", "files", status=201, also=(200,), response=FileAccepted,
    upload="application/octet-stream", params=(FILE_NAME, SHA_PARAM), errors=(400, 404, 409, 413, 422, 501, 503),
    description="Stored in your directory under this name (201; 200 when it replaced a file of that name) "
                "and recorded with its size and sha256. 413 past the gateway's per-file limit or your quota; "
                "nothing of a refused upload is kept."))
async def upload_file(request: web.Request) -> web.Response:
    root = _files_root(request)
    config = request.app[CONFIG]
    actor = actor_of(request)
    name = file_domain.check_file_name(request.match_info["name"])
    expected = request.headers.get(SHA256_HEADER)
    directory = _user_dir(root, actor.name)
    limit, quota = config.max_file_size, config.file_quota
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(f"the body ({format_size(declared)}) is too large: a file may be at most "
                         f"{format_size(limit)}", limit)

    def over_quota(grant: Grant, wanted: int) -> web.HTTPRequestEntityTooLarge:
        room = max(0, quota - grant.used)
        return _too_large(f"over your quota: {format_size(wanted)} would not fit; {format_size(grant.used)} of "
                          f"your quota of {format_size(quota)} is used by your other files and uploads under way",
                          room)

    # The quota counts what is on disk (uploads and sftp alike), not a read model that may
    # lag behind the user's last upload, and every upload under way at what it reserved: a
    # declared length is reserved whole before a byte is accepted, a chunked body in steps
    # as it arrives, each step decided under the user's lock (see _reserve).
    directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    partial = directory / f".upload-{uuid.uuid4().hex}"
    digest = hashlib.sha256()
    size = 0
    try:
        # Disk writes and the fsync run in a thread: the event loop keeps serving others.
        out = await asyncio.to_thread(open, partial, "xb")
        try:
            grant = Grant(0, 0)
            if declared is not None:
                grant = await asyncio.to_thread(_reserve, directory, out, partial.name, name, declared, quota)
                if grant.reserved < declared:
                    raise over_quota(grant, declared)
            async for chunk in request.content.iter_chunked(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise _too_large(f"the body is too large: a file may be at most {format_size(limit)}", limit)
                if size > grant.reserved:  # a chunked body (or more than declared): reserve the next step
                    if declared is not None:
                        raise _too_large(f"the body is longer than its Content-Length ({declared})", declared)
                    # A step ahead; where the quota has no room for that, what arrived.
                    for want in (min(limit, max(size, grant.reserved + RESERVE_STEP)), size):
                        grant = await asyncio.to_thread(_reserve, directory, out, partial.name, name, want, quota)
                        if grant.reserved >= size:
                            break
                    else:
                        raise over_quota(grant, size)
                digest.update(chunk)
                await asyncio.to_thread(out.write, chunk)
            await asyncio.to_thread(_finish, out, size)
        finally:
            out.close()
        sha256 = digest.hexdigest()
        if expected is not None and expected != sha256:
            raise Rejected(f"{SHA256_HEADER}: the body's sha256 is {sha256}, not {expected}; nothing was kept",
                           SHA256_HEADER)
        replaced = (directory / name).exists()
        os.replace(partial, directory / name)
        st = os.stat(directory / name, follow_symlinks=False)  # after the rename: it moves ctime
        signature = file_domain.signature_of(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    finally:
        partial.unlink(missing_ok=True)
    outcome = await request.app[COMMANDS].record_file(actor, name, size, sha256, signature=signature)
    return answer(FileAccepted(name=name, size=size, sha256=sha256, position=outcome.position),
                  200 if replaced else 201, outcome.position, {"Location": f"/v1/files/{name}"})


@api("GET", "/v1/files", ApiDoc(
    "List files", "listFiles", "files", response=FileList, params=(OWNER_PARAM,), errors=(400, 404), reads=True,
    description="Your files (uploaded, or put into your directory by sftp), by name; admins: everyone's or "
                "?owner='s."))
async def list_files(request: web.Request) -> web.Response:
    position = await reach_position(request)
    owner = _visible_owner(actor_of(request), request.query.get("owner"))
    views = request.app[READ_MODELS]
    return answer(FileList(files=[_file_out(views, f) for f in views.files.of(owner)], position=position),
                  position=position)


@api("DELETE", "/v1/files/{name}", ApiDoc(
    "Delete a file", "deleteFile", "files", response=Accepted, params=(FILE_NAME, OWNER_PARAM),
    errors=(404, 409, 422, 501, 503), description="Removed from your directory; images made from it stay."))
async def delete_file(request: web.Request) -> web.Response:
    root = _files_root(request)
    actor = actor_of(request)
    name = file_domain.check_file_name(request.match_info["name"])
    owner = request.query.get("owner") or actor.name
    if owner != actor.name and not actor.is_admin:
        raise NotFound("only the admin realm may act for another user")
    path = _user_dir(root, owner) / name
    on_disk = path.is_file()
    if on_disk:
        path.unlink(missing_ok=True)
    # Not on disk and not in the log: 404. On disk only (the scanner has not seen it yet):
    # removed, and nothing to record. A failed append leaves the file scanner to record it.
    outcome = await request.app[COMMANDS].remove_file(actor, name, owner, missing_ok=on_disk)
    return answer(Accepted(position=outcome.position), position=outcome.position)


# -- images -----------------------------------------------------------------------------------------


@api("POST", "/v1/images", ApiDoc(
    "Create an image from a file", "createImage", "images", status=202, response=Accepted, body=CreateImageBody,
    max_body=BODY_LIMIT, errors=(400, 404, 409, 422, 503),
    description="Recorded as importing; the image scanner checks the file (qcow2 only: no backing file, no "
                "external data file, a virtual size within the limit) and imports it into the store. Follow "
                "GET /v1/images/{name}: importing -> ready, or failed with the reason."))
async def create_image(request: web.Request) -> web.Response:
    body: CreateImageBody = await _decode(request, CreateImageBody)
    outcome = await request.app[COMMANDS].create_image(actor_of(request), body.name, body.file, public=body.public,
                                                       store=body.store, owner=body.owner)
    return answer(Accepted(id=outcome.result, position=outcome.position, status="importing"), 202, outcome.position,
                  {"Location": f"/v1/images/{body.name}"})


@api("GET", "/v1/images", ApiDoc(
    "List images", "listImages", "images", response=ImageList, params=(OWNER_PARAM,), errors=(400, 404), reads=True,
    description="The public images and yours (admins: everyone's, or ?owner='s and the public ones)."))
async def list_images(request: web.Request) -> web.Response:
    position = await reach_position(request)
    owner = _visible_owner(actor_of(request), request.query.get("owner"))
    views = request.app[READ_MODELS]
    images = [_image_out(views, i) for i in views.images.visible_to(owner)]
    return answer(ImageList(images=images, position=position), position=position)


def _image(request: web.Request) -> image_domain.Image:
    actor = actor_of(request)
    name = request.match_info["name"]
    public = bool(check_value("public", {"type": "boolean"}, request.query.get("public", "false")))
    owner = request.query.get("owner") or actor.name
    if owner != actor.name and not actor.is_admin:
        raise NotFound(f"no image named {name!r}")
    images = request.app[READ_MODELS].images
    image = images.by_id.get(image_domain.image_id_for("", name)) if public else images.find(owner, name)
    if image is None:
        raise NotFound(f"no image named {name!r}")
    return image


@api("GET", "/v1/images/{name}", ApiDoc(
    "Show an image", "getImage", "images", response=ImageOut, params=(IMAGE_NAME, PUBLIC_PARAM, OWNER_PARAM),
    errors=(400, 404), reads=True, description="Your image of that name, else the public one."))
async def get_image(request: web.Request) -> web.Response:
    position = await reach_position(request)
    return answer(_image_out(request.app[READ_MODELS], _image(request)), position=position)


@api("DELETE", "/v1/images/{name}", ApiDoc(
    "Delete an image", "deleteImage", "images", status=202, response=Accepted,
    params=(IMAGE_NAME, PUBLIC_PARAM, OWNER_PARAM), errors=(400, 404, 409, 422, 503),
    description="Refused (422, naming them) while VMs' disks are clones of it; the image scanner then "
                "removes it from its store. ?public=true: the public image (admins)."))
async def delete_image(request: web.Request) -> web.Response:
    actor = actor_of(request)
    public = bool(check_value("public", {"type": "boolean"}, request.query.get("public", "false")))
    outcome = await request.app[COMMANDS].delete_image(actor, request.match_info["name"], public=public,
                                                       owner=request.query.get("owner"))
    return answer(Accepted(id=outcome.result, position=outcome.position), 202, outcome.position)


# -- resize -----------------------------------------------------------------------------------------


@api("POST", "/v1/vms/{id}/resize", ApiDoc(
    "Resize a VM", "resizeVm", "vms", status=202, response=Accepted, body=ResizeBody, params=(VM_ID,),
    max_body=BODY_LIMIT, errors=(400, 404, 409, 422, 503),
    description="The disk grows at any time (a running guest sees it at once, through QMP); cores and RAM "
                "change while the VM is stopped. The host's claim changes in the same append: 422 when the "
                "host has no room for the new size, or the disk would shrink."))
async def resize_vm(request: web.Request) -> web.Response:
    vm_id = UUID(check_value("id", VM_ID.schema, request.match_info["id"]))
    body: ResizeBody = await _decode(request, ResizeBody)
    outcome = await request.app[COMMANDS].resize_vm(actor_of(request), vm_id, cores=body.cores, ram=body.ram,
                                                    disk=body.disk)
    return answer(Accepted(id=vm_id, position=outcome.position), 202, outcome.position)
