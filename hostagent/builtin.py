"""The files of the built-in images: ``tiny`` and ``debian-12`` as qcow2s that boot from
their own disks.

``tiny`` (tinyguest.py: a Debian kernel and a busybox initramfs) and ``debian-12``
(debianimage.py: a stock Debian 12 with cloud-init and openssh on an ext4 file system)
are written as BIOS-bootable qcow2s (imagestore/bootdisk.py: syslinux on a FAT partition
holding the kernel, the initrd and the command line; Debian's file system follows as the
second partition, its /etc/fstab naming the root by label). Such a file is then an image
like any user's: `ucloud up` (processes/builtin_images.py) or an admin (`ucloud image
builtin NAME`) puts it among the admin's files and makes a public image of it, which the
image scanner checks and imports into a store; a VM of it is a clone in that store and
boots from it.
"""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
from pathlib import Path

from ucloud.imagestore.bootdisk import BootDiskError, build_boot_disk

from .debianimage import KERNEL_APPEND as DEBIAN_APPEND
from .debianimage import ensure_debian_image
from .tinyguest import ensure_tiny_guest

BUILTIN_IMAGES = ("tiny", "debian-12")
# Debian's root is the boot disk's second partition; fstab finds it by its label.
DEBIAN_BOOT_APPEND = DEBIAN_APPEND.replace("root=/dev/vda ", "root=/dev/vda2 ")
DEBIAN_FSTAB = "LABEL=root / ext4 defaults,errors=remount-ro 0 1\n"


class UnknownBuiltin(ValueError):
    pass


def _version(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BootDiskError(f"{' '.join(argv)}: {done.stderr.strip()[-1000:]}")


def build_builtin(name: str, cache_root: Path) -> Path:
    """The bootable qcow2 of the built-in image ``name``, built into ``cache_root`` (its
    ``tinyguest/`` or ``debian-12/``) unless the same version is there already."""
    if name == "tiny":
        cache = Path(cache_root) / "tinyguest"
        guest = ensure_tiny_guest(cache)
        target = cache / f"tiny-boot-{_version(guest.version, guest.append)}.qcow2"
        if not target.is_file():
            build_boot_disk(guest.kernel, guest.initrd, guest.append, target)
        return target
    if name == "debian-12":
        cache = Path(cache_root) / "debian-12"
        image = ensure_debian_image(cache)
        target = cache / f"debian-12-boot-{_version(image.version, DEBIAN_BOOT_APPEND, DEBIAN_FSTAB)}.qcow2"
        if not target.is_file():
            with tempfile.TemporaryDirectory(prefix=".boot-", dir=cache) as scratch_name:
                scratch = Path(scratch_name)
                root, fstab = scratch / "root.raw", scratch / "fstab"
                _run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image.disk_image), str(root))
                fstab.write_text(DEBIAN_FSTAB)
                fstab.chmod(0o644)
                # The file system's own fstab, changed without mounting it (debugfs, e2fsprogs).
                _run("debugfs", "-w", "-R", "rm /etc/fstab", str(root))
                _run("debugfs", "-w", "-R", f"write {fstab} /etc/fstab", str(root))
                build_boot_disk(image.kernel, image.initrd, DEBIAN_BOOT_APPEND, target, root=root)
        return target
    raise UnknownBuiltin(f"no built-in image named {name!r} (there are {', '.join(BUILTIN_IMAGES)})")
