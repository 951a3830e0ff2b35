"""The files of the built-in images: ``tiny`` as a qcow2 that boots from its own disk.

``tiny`` (tinyguest.py: a Debian kernel and a busybox initramfs) is written as a
BIOS-bootable qcow2 (imagestore/bootdisk.py: syslinux on a FAT partition holding the
kernel, the initrd and the command line). That file is then an image like any user's:
`ucloud up` (processes/builtin_images.py) or an admin (`ucloud image builtin tiny`)
puts it among the admin's files and makes a public image of it, which the image scanner
checks and imports into a store; a VM of it is a clone in that store and boots from it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ucloud.imagestore.bootdisk import build_boot_disk

from .tinyguest import ensure_tiny_guest

BUILTIN_IMAGES = ("tiny",)


class UnknownBuiltin(ValueError):
    pass


def build_builtin(name: str, cache_root: Path) -> Path:
    """The bootable qcow2 of the built-in image ``name``, built into ``cache_root`` unless
    the same version is there already."""
    if name != "tiny":
        raise UnknownBuiltin(f"no built-in image named {name!r} (there is {', '.join(BUILTIN_IMAGES)})")
    cache = Path(cache_root) / "tinyguest"
    guest = ensure_tiny_guest(cache)
    version = hashlib.sha256(f"{guest.version}\0{guest.append}".encode()).hexdigest()[:16]
    target = cache / f"tiny-boot-{version}.qcow2"
    if not target.is_file():
        build_boot_disk(guest.kernel, guest.initrd, guest.append, target)
    return target
