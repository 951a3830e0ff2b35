"""Files: what each user has under the files root (``<files-root>/<user>/<name>``).

A file's stream is keyed by (owner, name). The file scanner records what it finds on
disk, and the gateway records what a user uploads through it; either way a file is
known by its size and sha256, so an image made from it names exactly the bytes it was
made from. Recording the same size and digest again changes nothing.
"""

from __future__ import annotations

import re
import uuid
from uuid import UUID

import msgspec

from .errors import InvalidValue, NotFound, Rejected
from .events import Command, Event

FILE_NAMESPACE = uuid.UUID("6f1f1d2e-8d53-4c1e-9a0e-4b2f5bd0c010")
FILE_NAME_MAX_LENGTH = 255
# A plain file name: no path separators, no leading dot (hidden and partial uploads),
# ASCII only, so it is the same name on disk, in a URL and in a shell.
FILE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$"
_FILE_NAME = re.compile(FILE_NAME_PATTERN[1:-1], re.ASCII)
SHA256_PATTERN = r"^[0-9a-f]{64}$"
_SHA256 = re.compile(SHA256_PATTERN[1:-1], re.ASCII)


def check_file_name(value: object, field: str = "name") -> str:
    if not isinstance(value, str):
        raise InvalidValue(field, "must be a string")
    if len(value) > FILE_NAME_MAX_LENGTH or not _FILE_NAME.fullmatch(value):
        shown = value if len(value) <= 70 else value[:64] + "…"
        raise InvalidValue(field, f"{shown!r} is not a file name: 1-255 ASCII letters, digits and ._+-, "
                                  "starting with a letter or digit")
    return value


def check_sha256(value: object, field: str = "sha256") -> str:
    if not isinstance(value, str) or len(value) != 64 or not _SHA256.fullmatch(value):
        raise InvalidValue(field, "must be 64 lower-case hexadecimal digits (a sha256)")
    return value


def signature_of(inode: int, size: int, mtime_ns: int, ctime_ns: int) -> str:
    return f"{inode}:{size}:{mtime_ns}:{ctime_ns}"


def file_id_for(owner: str, name: str) -> UUID:
    return uuid.uuid5(FILE_NAMESPACE, f"{owner}\0{name}")


class FileAppeared(Event, tag="file.appeared", frozen=True):
    """A file appeared in a user's directory (uploaded, or put there by sftp)."""

    file_id: UUID
    owner: str
    name: str
    size: int
    sha256: str
    # "inode:size:mtime_ns:ctime_ns" when the digest was taken: while a file still has it,
    # its content is the one hashed (ctime moves on every change, and no user can set it).
    signature: str = ""


class FileChanged(Event, tag="file.changed", frozen=True):
    """A known file has new content."""

    file_id: UUID
    size: int
    sha256: str
    signature: str = ""


class FileRemoved(Event, tag="file.removed", frozen=True):
    """A file is gone from the user's directory."""

    file_id: UUID


FileEvent = FileAppeared | FileChanged | FileRemoved
FILE_EVENT_TYPES: tuple[type[Event], ...] = FileEvent.__args__


class RecordFile(Command, tag="file.record", frozen=True):
    owner: str
    name: str
    size: int
    sha256: str
    signature: str = ""


class RemoveFile(Command, tag="file.remove", frozen=True):
    owner: str
    name: str
    missing_ok: bool = False  # the scanner: a file it never recorded is no error


class File(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    id: UUID
    owner: str
    name: str
    size: int
    sha256: str
    removed: bool = False
    signature: str = ""


def evolve(file: File | None, event: Event) -> File | None:
    match event:
        case FileAppeared():
            return File(id=event.file_id, owner=event.owner, name=event.name, size=event.size, sha256=event.sha256,
                        signature=event.signature)
    if file is None:
        return None
    match event:
        case FileChanged():
            return msgspec.structs.replace(file, size=event.size, sha256=event.sha256, removed=False,
                                           signature=event.signature)
        case FileRemoved():
            return msgspec.structs.replace(file, removed=True)
    return file


def decide(file: File | None, command: Command) -> list[Event]:
    match command:
        case RecordFile():
            check_file_name(command.name)
            check_sha256(command.sha256)
            if command.size < 0:
                raise InvalidValue("size", "must not be negative")
            file_id = file_id_for(command.owner, command.name)
            if file is None or file.removed:
                return [FileAppeared(file_id=file_id, owner=command.owner, name=command.name,
                                     size=command.size, sha256=command.sha256, signature=command.signature)]
            if (file.size, file.sha256, file.signature) == (command.size, command.sha256, command.signature):
                return []
            return [FileChanged(file_id=file_id, size=command.size, sha256=command.sha256,
                                signature=command.signature)]
        case RemoveFile():
            if file is None or file.removed:
                if command.missing_ok:
                    return []
                raise NotFound(f"no file named {command.name!r}")
            return [FileRemoved(file_id=file.id)]
    raise Rejected(f"{type(command).__name__} is not a file command")


def stream_name(file_id: UUID) -> str:
    return f"file-{file_id}"
