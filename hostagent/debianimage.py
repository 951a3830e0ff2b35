"""Build the stock Debian 12 guest (the image ``debian-12``) from Debian packages.

``mmdebstrap`` (with the machine's own apt configuration) makes a minimal bookworm tree
with the cloud kernel, systemd, cloud-init, openssh-server and ifupdown; the tree gets a
few files of ours (fstab, SLAAC on eth0, cloud-init reading NoCloud then OpenStack and
leaving the network to ifupdown), becomes an ext4 file system with ``mkfs.ext4 -d`` (no
loop mounts) and a qcow2 base disk. The kernel and initrd from its /boot boot it directly.

Run ``python -m ucloud.hostagent.debianimage [--cache DIR]`` (default
``$UCLOUD_CACHE/debian-12`` or ``/var/cache/ucloud/debian-12``). A manifest records what
was built; a rebuild happens only when this recipe changes. Building takes a minute or
two and ~500 MB of downloads; booting it under TCG takes a minute or more.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

RECIPE_VERSION = 3
SUITE = "bookworm"
# cloud-guest-utils: growpart, so that cloud-init grows the root partition of the bootable
# disk (hostagent/builtin.py) to the VM's disk; the bare file system grows without it.
PACKAGES = ("systemd-sysv", "linux-image-cloud-amd64", "cloud-init", "openssh-server", "ifupdown", "netbase",
            "iproute2", "udev", "sudo", "ca-certificates", "cloud-guest-utils")
DISK_SIZE = "2G"
# Classic interface names (eth0) so that one ifupdown stanza fits every machine type.
KERNEL_APPEND = "root=/dev/vda rw console=ttyS0 net.ifnames=0"
DEFAULT_CACHE = Path("/var/cache/ucloud/debian-12")

FILES = {
    "etc/fstab": "/dev/vda / ext4 defaults,errors=remount-ro 0 1\n",
    "etc/hostname": "debian\n",
    # IPv6 only: SLAAC from the network's router advertisements (EUI-64 addresses, which
    # is what the metadata server identifies a NIC by).
    "etc/network/interfaces": "auto lo\niface lo inet loopback\n\nallow-hotplug eth0\niface eth0 inet6 auto\n",
    "etc/sysctl.d/90-ucloud.conf": "net.ipv6.conf.default.addr_gen_mode = 0\nnet.ipv6.conf.all.use_tempaddr = 0\n",
    # NoCloud only: Debian 12's cloud-init reads its seed URL from the SMBIOS serial, the
    # only IPv6 path it has; its OpenStack datasource knows 169.254.169.254 alone and on an
    # IPv6-only network spent a minute of every boot failing. ifupdown keeps the network.
    "etc/cloud/cloud.cfg.d/90-ucloud.cfg": "datasource_list: [NoCloud, None]\nnetwork: {config: disabled}\n",
}


class DebianImageError(RuntimeError):
    """The image could not be built; the message says which step failed."""


@dataclass(frozen=True)
class DebianImage:
    kernel: Path
    initrd: Path
    disk_image: Path
    version: str
    append: str = KERNEL_APPEND


def _run(argv: list[str], what: str, timeout: float = 1800) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise DebianImageError(f"{what} failed ({' '.join(argv[:3])} ...): {done.stderr.strip()[-1500:]}")
    return done.stdout


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def wanted_version() -> str:
    return f"{SUITE};{','.join(PACKAGES)};recipe={RECIPE_VERSION}"


def default_cache_dir() -> Path:
    root = os.environ.get("UCLOUD_CACHE")
    return Path(root) / "debian-12" if root else DEFAULT_CACHE


def ensure_debian_image(cache_dir: Path | str | None = None) -> DebianImage:
    """Build the image into cache_dir unless this recipe's build is already there."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    version = wanted_version()
    with _locked(cache):
        manifest = cache / "manifest.json"
        if manifest.is_file():
            known = json.loads(manifest.read_text())
            image = DebianImage(kernel=cache / known["kernel"], initrd=cache / known["initrd"],
                                disk_image=cache / known["disk_image"], version=known["version"])
            if known["version"] == version and all(p.is_file() for p in (image.kernel, image.initrd,
                                                                           image.disk_image)):
                return image
        return _build(cache, version)


def _build(cache: Path, version: str) -> DebianImage:
    for tool in ("mmdebstrap", "mkfs.ext4", "qemu-img", "tar"):
        if shutil.which(tool) is None:
            raise DebianImageError(f"{tool} is missing: ./bootstrap installs mmdebstrap, e2fsprogs and qemu-utils")
    with tempfile.TemporaryDirectory(prefix="build-", dir=cache) as scratch_name:
        scratch = Path(scratch_name)
        tarball, tree = scratch / "rootfs.tar", scratch / "tree"
        _run(["mmdebstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(tarball)],
             "mmdebstrap")
        tree.mkdir()
        _run(["tar", "-xpf", str(tarball), "-C", str(tree), "--numeric-owner"], "unpacking the tree")
        for relative, text in FILES.items():
            path = tree / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        kernels = sorted((tree / "boot").glob("vmlinuz-*"))
        initrds = sorted((tree / "boot").glob("initrd.img-*"))
        if not kernels or not initrds:
            raise DebianImageError("the tree has no /boot/vmlinuz-* or /boot/initrd.img-*")
        raw = scratch / "disk.raw"
        _run(["mkfs.ext4", "-q", "-L", "root", "-d", str(tree), str(raw), DISK_SIZE], "mkfs.ext4 -d")
        disk = cache / f"debian-12-r{RECIPE_VERSION}.qcow2"
        _run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(disk)], "qemu-img convert")
        kernel, initrd = cache / f"vmlinuz-r{RECIPE_VERSION}", cache / f"initrd-r{RECIPE_VERSION}.img"
        shutil.copy2(kernels[-1], kernel)
        shutil.copy2(initrds[-1], initrd)
    manifest = {"version": version, "kernel": kernel.name, "initrd": initrd.name, "disk_image": disk.name}
    (cache / "manifest.json.tmp").write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(cache / "manifest.json.tmp", cache / "manifest.json")
    # Earlier recipes' disks stay: VMs' overlays name their base disk by path.
    return DebianImage(kernel=kernel, initrd=initrd, disk_image=disk, version=version)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the stock Debian 12 guest image (cloud-init, ssh).")
    parser.add_argument("--cache", type=Path, default=None, help="where to build and keep it")
    args = parser.parse_args(argv)
    try:
        image = ensure_debian_image(args.cache)
    except DebianImageError as error:
        print(f"debianimage: {error}", file=sys.stderr)
        return 1
    print(f"kernel {image.kernel}\ninitrd {image.initrd}\ndisk   {image.disk_image}\ncmdline {image.append}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
