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


def build_boot_disk(kernel: Path, initrd: Path, append: str, target: Path) -> Path:
    """``target``: a qcow2 that boots ``kernel`` with ``initrd`` and ``append`` (written
    under a temporary name and renamed, so a half-built disk never has the target's name)."""
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
        with open(raw, "wb") as disk:
            disk.truncate((START + sectors) * SECTOR)
            mbr = bytearray(MBR.read_bytes()[:440].ljust(SECTOR, b"\0"))
            # One active FAT16 (LBA) partition; CHS fields say "use LBA".
            mbr[446:462] = struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", 0x0E, b"\xfe\xff\xff", START, sectors)
            mbr[510:512] = b"\x55\xaa"
            disk.write(mbr)
            disk.seek(START * SECTOR)
            disk.write(fat.read_bytes())
        partial = scratch / "boot.qcow2"
        _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(partial))
        os.replace(partial, target)
    return target
