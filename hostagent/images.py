"""The host's image catalogue: a name -> the base disk (and, for direct kernel boot,
kernel, initrd and command line). Files live under ``<root>/<name>/``.

The built-in image ``tiny`` is the busybox guest from tinyguest.py; real images
(qcow2 uploads, Ceph RBD) come with the images issue behind this same lookup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class ImageNotFound(LookupError):
    pass


@dataclass(frozen=True)
class Image:
    name: str
    disk: Path
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None


class ImageCatalogue:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def get(self, name: str) -> Image:
        if not _NAME.match(name):
            raise ImageNotFound(f"{name!r} is not an image name")
        directory = self.root / name
        disk = directory / "disk.qcow2"
        if not disk.exists():
            raise ImageNotFound(f"image {name!r} is not on this host (no {disk})")
        kernel = directory / "kernel"
        initrd = directory / "initrd"
        cmdline = directory / "cmdline"
        return Image(
            name=name,
            disk=disk,
            kernel=kernel if kernel.exists() else None,
            initrd=initrd if initrd.exists() else None,
            append=cmdline.read_text().strip() if cmdline.exists() else None,
        )

    def install_tiny(self, cache_dir: Path | str | None = None) -> Image:
        """Build (or reuse) the tiny guest and publish it as the image ``tiny``."""
        from .tinyguest import ensure_tiny_guest

        guest = ensure_tiny_guest(cache_dir)
        return self._publish("tiny", guest.disk_image, guest.kernel, guest.initrd, guest.append)

    def install_debian12(self, cache_dir: Path | str | None = None) -> Image:
        """Build (or reuse) the stock Debian 12 guest (cloud-init, ssh) and publish it as
        the image ``debian-12``."""
        from .debianimage import ensure_debian_image

        image = ensure_debian_image(cache_dir)
        return self._publish("debian-12", image.disk_image, image.kernel, image.initrd, image.append)

    def _publish(self, name: str, disk: Path, kernel: Path, initrd: Path, append: str) -> Image:
        directory = self.root / name
        directory.mkdir(parents=True, exist_ok=True)
        for link, target in (("disk.qcow2", disk), ("kernel", kernel), ("initrd", initrd)):
            path = directory / link
            if path.is_symlink() or path.exists():
                if path.resolve() == Path(target).resolve():
                    continue
                path.unlink()
            path.symlink_to(Path(target).resolve())
        (directory / "cmdline").write_text(append + "\n")
        return self.get(name)
