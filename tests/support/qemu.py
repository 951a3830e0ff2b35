"""Helpers for tests and benchmarks that boot the real tiny guest under QEMU."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ucloud.hostagent.hypervisor import MIB, NetworkInterface, VmSpec
from ucloud.hostagent.tinyguest import DEFAULT_CACHE, MARKER, RECIPE_VERSION, TinyGuest

# A stable cache per recipe, so that reruns do not rebuild the guest and branches with
# different recipes (run side by side on one machine) do not rebuild each other's. The
# kernel .deb already downloaded into the default cache is shared, not fetched again.
TINY_CACHE = DEFAULT_CACHE.parent / f"{DEFAULT_CACHE.name}-r{RECIPE_VERSION}"


def _share_debs() -> None:
    source, target = DEFAULT_CACHE / "debs", TINY_CACHE / "debs"
    with contextlib.suppress(OSError):
        if source.is_dir() and not any(target.glob("*.deb")):
            target.mkdir(parents=True, exist_ok=True)
            for deb in source.glob("*.deb"):
                os.link(deb, target / deb.name)


_share_debs()


def tiny_spec(
    guest: TinyGuest,
    *,
    name: str = "tiny",
    disk: Path | None = None,
    interfaces: tuple[NetworkInterface, ...] = (),
    ram_mib: int = 256,
    vm_id: uuid.UUID | None = None,
) -> VmSpec:
    return VmSpec(
        vm_id=vm_id or uuid.uuid4(),
        name=name,
        cores=1,
        ram_bytes=ram_mib * MIB,
        disk_path=str(disk) if disk else None,
        kernel=str(guest.kernel),
        initrd=str(guest.initrd),
        append=guest.append,
        interfaces=interfaces,
    )


@contextlib.contextmanager
def short_run_root() -> Iterator[Path]:
    """A run root short enough for unix socket paths (pytest's tmp_path can be too long)."""
    root = Path(tempfile.mkdtemp(prefix="ucvm-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def markers(serial_log: Path) -> int:
    try:
        return serial_log.read_text(errors="replace").count(MARKER)
    except FileNotFoundError:
        return 0


async def wait_for_marker(serial_log: Path, count: int = 1, timeout: float = 90.0) -> None:
    """Wait until the guest's ready marker has appeared count times on its console."""
    deadline = time.monotonic() + timeout
    while markers(serial_log) < count:
        if time.monotonic() >= deadline:
            tail = serial_log.read_text(errors="replace")[-800:] if serial_log.exists() else ""
            raise TimeoutError(f"marker #{count} not in {serial_log} after {timeout}s: {tail!r}")
        await asyncio.sleep(0.1)


async def wait_for_pattern(serial_log: Path, pattern: str, timeout: float = 30.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while True:
        text = serial_log.read_text(errors="replace") if serial_log.exists() else ""
        match = regex.search(text)
        if match:
            return match
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{pattern!r} not in {serial_log} after {timeout}s: {text[-800:]!r}")
        await asyncio.sleep(0.1)


def console_send(console: Path, line: str) -> None:
    """Type one line into the guest's serial console (its unix socket)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(console))
        sock.sendall(line.encode() + b"\n")
        # Give QEMU a moment to read before the socket closes.
        time.sleep(0.2)


def qemu_processes(vm_id: uuid.UUID) -> list[int]:
    """Pids of live qemu-system processes whose command line names vm_id (like pgrep -f)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and str(vm_id).encode() in cmdline:
            pids.append(int(entry.name))
    return pids


@contextlib.contextmanager
def host_tap(name: str) -> Iterator[str]:
    """A tap device on this host for one test, removed afterwards."""
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)


def qemu_img_info(path: Path) -> dict[str, Any]:
    done = subprocess.run(
        ["qemu-img", "info", "--output=json", "--force-share", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    info: dict[str, Any] = json.loads(done.stdout)
    return info


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kill_leftovers(run_root: Path) -> None:
    """SIGKILL every QEMU that still holds a pid file under run_root (test cleanup)."""
    for pidfile in run_root.glob("*/pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            # A stale pid file may name a reused pid: kill only our own QEMU.
            if str(run_root).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, 9)
