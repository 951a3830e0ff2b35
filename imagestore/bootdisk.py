"""A BIOS-bootable qcow2 from a kernel, an initrd and a command line.

The disk: an MBR (syslinux's), one active FAT partition holding SYSLINUX, the kernel,
the initrd and a syslinux.cfg with the command line. SeaBIOS boots it like any disk;
nothing is mounted (mtools writes the FAT image, ``syslinux --install`` installs into it
through mtools) and the partition table is written here. Debian packages: syslinux,
syslinux-common, mtools, dosfstools.

This is how the built-in image ``tiny`` becomes an ordinary image of the catalogue
(hostagent/builtin.py): a qcow2 that boots from its own disk, imported like a user's.
"""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Any

MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
SECTOR = 512
START = 2048  # the partition starts at 1 MiB
FAT_MIB = 48


class BootDiskError(RuntimeError):
    """The disk could not be built; the message names the step."""


def _run(*argv: str) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise BootDiskError(f"{argv[0]} is not installed (Debian: syslinux mtools dosfstools qemu-utils)") from None
    if done.returncode != 0:
        raise BootDiskError(f"{' '.join(argv)}: {done.stderr.strip()[-1000:]}")


def _copy_sparse(source: Path, disk: Any, offset: int) -> None:
    """``source`` into ``disk`` at ``offset``, leaving its runs of zeros unwritten (holes)."""
    with open(source, "rb") as data:
        position = offset
        while chunk := data.read(4 * 1024 * 1024):
            if chunk.count(0) != len(chunk):
                disk.seek(position)
                disk.write(chunk)
            position += len(chunk)


def build_boot_disk(kernel: Path, initrd: Path, append: str, target: Path, *, root: Path | None = None) -> Path:
    """``target``: a qcow2 that boots ``kernel`` with ``initrd`` and ``append`` (written
    under a temporary name and renamed, so a half-built disk never has the target's name).
    ``root``: a raw file system image that becomes the second partition (``/dev/vda2`` in
    the guest), after the boot partition."""
    if not MBR.is_file():
        raise BootDiskError(f"{MBR} is missing: install syslinux")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bootdisk-", dir=target.parent) as scratch_name:
        scratch = Path(scratch_name)
        fat = scratch / "fat.img"
        _run("mkfs.vfat", "-C", "-n", "UCLOUD", str(fat), str(FAT_MIB * 1024))
        config = scratch / "syslinux.cfg"
        config.write_text(f"DEFAULT ucloud\nPROMPT 0\nTIMEOUT 0\nLABEL ucloud\n  KERNEL /vmlinuz\n  INITRD /initrd\n"
                          f"  APPEND {append}\n")
        for source, name in ((kernel, "vmlinuz"), (initrd, "initrd"), (config, "syslinux.cfg")):
            _run("mcopy", "-i", str(fat), str(source), f"::{name}")
        _run("syslinux", "--install", str(fat))
        raw = scratch / "boot.raw"
        sectors = fat.stat().st_size // SECTOR
        root_start = START + sectors
        root_sectors = -(-root.stat().st_size // SECTOR) if root is not None else 0
        with open(raw, "wb") as disk:
            disk.truncate((root_start + root_sectors) * SECTOR)
            mbr = bytearray(MBR.read_bytes()[:440].ljust(SECTOR, b"\0"))
            # An active FAT16 (LBA) partition, then a Linux one; CHS fields say "use LBA".
            mbr[446:462] = struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", 0x0E, b"\xfe\xff\xff", START, sectors)
            if root is not None:
                mbr[462:478] = struct.pack("<B3sB3sII", 0x00, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff",
                                           root_start, root_sectors)
            mbr[510:512] = b"\x55\xaa"
            disk.write(mbr)
            disk.seek(START * SECTOR)
            disk.write(fat.read_bytes())
            if root is not None:
                _copy_sparse(root, disk, root_start * SECTOR)
        partial = scratch / "boot.qcow2"
        _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(partial))
        os.replace(partial, target)
    return target
