"""A BIOS-bootable qcow2 made from the project's own tiny guest, for the image tests.

The disk a user would upload: an MBR (syslinux's), one active FAT partition holding
SYSLINUX, the tiny guest's kernel and initrd and a syslinux.cfg with its command line.
SeaBIOS boots it like any disk; nothing is mounted (mtools writes the FAT image,
``syslinux --install`` installs into it through mtools) and the partition table is
written here. Debian packages: syslinux, syslinux-common, mtools, dosfstools.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

from ucloud.hostagent.tinyguest import TinyGuest

MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
SECTOR = 512
START = 2048  # the partition starts at 1 MiB
FAT_MIB = 48


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


def build_boot_disk(guest: TinyGuest, workdir: Path, *, append: str | None = None) -> Path:
    """``workdir/boot.qcow2``: boots the tiny guest from disk (no -kernel)."""
    workdir.mkdir(parents=True, exist_ok=True)
    fat = workdir / "fat.img"
    fat.unlink(missing_ok=True)
    _run("mkfs.vfat", "-C", "-n", "UCLOUD", str(fat), str(FAT_MIB * 1024))
    config = workdir / "syslinux.cfg"
    config.write_text(f"DEFAULT ucloud\nPROMPT 0\nTIMEOUT 0\nLABEL ucloud\n  KERNEL /vmlinuz\n  INITRD /initrd\n"
                      f"  APPEND {append or guest.append}\n")
    for source, name in ((guest.kernel, "vmlinuz"), (guest.initrd, "initrd"), (config, "syslinux.cfg")):
        _run("mcopy", "-i", str(fat), str(source), f"::{name}")
    _run("syslinux", "--install", str(fat))
    raw = workdir / "boot.raw"
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
    target = workdir / "boot.qcow2"
    target.unlink(missing_ok=True)
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(target))
    raw.unlink()
    fat.unlink()
    return target
