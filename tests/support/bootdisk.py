"""A BIOS-bootable qcow2 made from the project's own tiny guest, for the image tests
(the builder is ucloud.imagestore.bootdisk, which also makes the built-in image ``tiny``)."""

from __future__ import annotations

from pathlib import Path

from ucloud.hostagent.tinyguest import TinyGuest
from ucloud.imagestore.bootdisk import build_boot_disk as _build


def build_boot_disk(guest: TinyGuest, workdir: Path, *, append: str | None = None) -> Path:
    """``workdir/boot.qcow2``: boots the tiny guest from disk (no -kernel)."""
    workdir.mkdir(parents=True, exist_ok=True)
    return _build(guest.kernel, guest.initrd, append or guest.append, workdir / "boot.qcow2")
