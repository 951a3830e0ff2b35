"""Is this file a qcow2 image ucloud may import? Decided by its content, never its name.

Two steps. First the qcow2 header is read here, in Python, before any tool opens the
file: the magic, the version, an encryption method, a backing file (a qcow2 naming a
backing file makes whoever opens it read the file it names: ``/etc/shadow``, another
tenant's disk) and the external-data-file feature (the same, for the data itself). A
file without the qcow2 magic is refused right there and is never handed to ``qemu-img``
(a VMDK descriptor, for one, names extent files that qemu would open). Second, only
for a header that passed, ``qemu-img info --output=json -f qcow2`` (which opens no
backing file) gives the virtual size and says whether the image is corrupt, and the
answers are checked again.
"""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

QCOW2_MAGIC = b"QFI\xfb"
# magic, version, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method
_V2 = struct.Struct(">4sIQIIQI")
_INCOMPATIBLE = struct.Struct(">Q")  # at offset 72 in a version 3 header
_EXTERNAL_DATA_FILE = 1 << 2
_KNOWN_INCOMPATIBLE = 0b11111  # dirty, corrupt, external data file, compression type, extended L2


class ImageRefused(Exception):
    """The file is not an image ucloud imports; the message says why, for the user."""


@dataclass(frozen=True)
class ImageInfo:
    virtual_size: int
    actual_size: int
    cluster_size: int


def check_header(path: Path, max_virtual_size: int) -> int:
    """The qcow2 header's checks (see the module), in Python: the virtual size it states;
    ImageRefused otherwise. A file that passed makes no tool that opens it open another."""
    try:
        with open(path, "rb") as source:
            head = source.read(104)
    except FileNotFoundError:
        raise ImageRefused("the file is gone") from None
    except IsADirectoryError:
        raise ImageRefused("not a file") from None
    if len(head) < 4 or head[:4] != QCOW2_MAGIC:
        raise ImageRefused("not a qcow2 file: it does not start with the qcow2 magic (QFI\\xfb); "
                           "convert it first, e.g. qemu-img convert -O qcow2 disk.raw disk.qcow2")
    if len(head) < _V2.size:
        raise ImageRefused("a truncated qcow2 file: its header is incomplete")
    _, version, backing_offset, backing_size, cluster_bits, size, crypt = _V2.unpack_from(head)
    if version not in (2, 3):
        raise ImageRefused(f"qcow2 version {version} is not supported (2 or 3 are)")
    if backing_offset or backing_size:
        raise ImageRefused("the qcow2 file names a backing file; only self-contained images are imported "
                           "(qemu-img convert -O qcow2 flattens one)")
    if crypt:
        raise ImageRefused("the qcow2 file is encrypted; only unencrypted images are imported")
    if not 9 <= cluster_bits <= 21:
        raise ImageRefused(f"the qcow2 header is invalid (cluster bits {cluster_bits})")
    if version == 3:
        if len(head) < 80:
            raise ImageRefused("a truncated qcow2 file: its header is incomplete")
        (incompatible,) = _INCOMPATIBLE.unpack_from(head, 72)
        if incompatible & _EXTERNAL_DATA_FILE:
            raise ImageRefused("the qcow2 file keeps its data in an external data file; only "
                               "self-contained images are imported")
        if incompatible & ~_KNOWN_INCOMPATIBLE:
            raise ImageRefused(f"the qcow2 file uses unknown incompatible features ({incompatible:#x})")
    if size > max_virtual_size:
        raise ImageRefused(f"its virtual size ({size} bytes) is above this installation's limit "
                           f"({max_virtual_size} bytes)")
    return int(size)


async def inspect_qcow2(path: Path, max_virtual_size: int, pass_fds: tuple[int, ...] = ()) -> ImageInfo:
    """What ``qemu-img`` says of a qcow2 that passed the header checks; ImageRefused otherwise.
    ``pass_fds``: descriptors ``path`` names (``/dev/fd/N``) that qemu-img inherits."""
    path = Path(path)
    await asyncio.to_thread(check_header, path, max_virtual_size)
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "info", "--output=json", "-f", "qcow2", str(path),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip().splitlines()
        raise ImageRefused("qemu-img cannot read it as qcow2: " + (message[-1] if message else "unknown error")
                           .replace(str(path), "the file"))
    info = json.loads(out)
    if info.get("format") != "qcow2":
        raise ImageRefused(f"not a qcow2 file (qemu-img reads it as {info.get('format')})")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise ImageRefused("the qcow2 file names a backing file; only self-contained images are imported")
    data = info.get("format-specific", {}).get("data", {})
    if data.get("data-file") or data.get("data-file-raw"):
        raise ImageRefused("the qcow2 file keeps its data in an external data file")
    if data.get("corrupt"):
        raise ImageRefused("the qcow2 file is marked corrupt (qemu-img check -r all may repair it)")
    # Metadata consistency: a file cut short or with clusters pointing outside it reads
    # back as zeros or garbage instead of failing; qemu-img check says so (3: leaks only,
    # which cost space and nothing else).
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "check", "--output=json", "-f", "qcow2", str(path),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds)
    out, err = await proc.communicate()
    if proc.returncode not in (0, 3):
        try:
            report = json.loads(out)
        except ValueError:
            report = {}
        found = report.get("corruptions", 0) or report.get("check-errors", 0)
        raise ImageRefused(f"the qcow2 file is corrupt or truncated (qemu-img check found {found} error(s))")
    virtual_size = int(info["virtual-size"])
    if virtual_size > max_virtual_size:
        raise ImageRefused(f"its virtual size ({virtual_size} bytes) is above this installation's limit "
                           f"({max_virtual_size} bytes)")
    return ImageInfo(virtual_size=virtual_size, actual_size=int(info.get("actual-size", 0)),
                     cluster_size=int(info.get("cluster-size", 0)))
