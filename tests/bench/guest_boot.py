"""Boot time of the tiny guest: raw qemu-system-x86_64 versus through the QEMU driver.

Both runs use the same command line (the driver's build_argv); "raw" starts it
with subprocess and nothing else, "driver" goes through QemuDriver.start (run
directory preparation, QMP readiness check, metadata). The clock runs from the
moment we ask for the VM to the moment the guest's ready marker is in the serial
log. Run: .venv/bin/python tests/bench/guest_boot.py [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.qemu import (
    TINY_CACHE,
    kill_leftovers,
    short_run_root,
    tiny_spec,
    wait_for_marker,
)
from ucloud.hostagent.qemu import QemuDriver, build_argv
from ucloud.hostagent.tinyguest import MARKER, ensure_tiny_guest

UPTIME = re.compile(re.escape(MARKER) + r" uptime=([0-9.]+)")


def guest_uptime(serial: Path) -> float:
    match = UPTIME.search(serial.read_text(errors="replace"))
    return float(match.group(1)) if match else float("nan")


async def raw_boot(root: Path, accel: str, disk: Path | None = None) -> tuple[float, float]:
    """``disk``: a qcow2 to attach as the driver would (bench_control_plane passes the
    overlay a ucloud VM gets, so that both command lines match)."""
    guest = ensure_tiny_guest(TINY_CACHE)
    spec = tiny_spec(guest, name="raw", disk=disk)
    run_dir = root / str(spec.vm_id)
    run_dir.mkdir()
    # The same files the driver prepares for the event monitor (the argv needs them).
    (run_dir / "events.in").write_text('{"execute": "qmp_capabilities"}\n')
    (run_dir / "events.out").write_bytes(b"")
    argv = build_argv(spec, run_dir, accel)
    began = time.monotonic()
    proc = subprocess.Popen(  # noqa: ASYNC220 - the plain launch is what is measured
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        await wait_for_marker(run_dir / "serial.log")
        took = time.monotonic() - began
    finally:
        proc.kill()
        proc.wait()
    return took, guest_uptime(run_dir / "serial.log")


async def driver_boot(root: Path, accel: str) -> tuple[float, float, float]:
    guest = ensure_tiny_guest(TINY_CACHE)
    driver = QemuDriver(root, accel=accel)  # type: ignore[arg-type]
    spec = tiny_spec(guest, name="driver", vm_id=uuid.uuid4())
    began = time.monotonic()
    await driver.start(spec)
    started = time.monotonic() - began
    try:
        await wait_for_marker(driver.serial_log_path(spec.vm_id))
        took = time.monotonic() - began
    finally:
        await driver.kill(spec.vm_id)
    return took, started, guest_uptime(driver.serial_log_path(spec.vm_id))


async def main(runs: int) -> None:
    ensure_tiny_guest(TINY_CACHE)
    probe_driver = QemuDriver("/tmp/ucloud-bench-probe", accel="auto")
    accel = await probe_driver.accelerator()
    print(
        f"accelerator: {accel} ({probe_driver.accel_probe.reason if probe_driver.accel_probe else ''})"
    )
    raw: list[float] = []
    via: list[float] = []
    start_calls: list[float] = []
    uptimes_raw: list[float] = []
    uptimes_via: list[float] = []
    with short_run_root() as root:
        try:
            for _ in range(runs):  # alternate so that background load hits both alike
                took, up = await raw_boot(root, accel)
                raw.append(took)
                uptimes_raw.append(up)
                took, started, up = await driver_boot(root, accel)
                via.append(took)
                start_calls.append(started)
                uptimes_via.append(up)
        finally:
            kill_leftovers(root)

    def show(label: str, values: list[float]) -> None:
        print(
            f"{label:<34} median {statistics.median(values):6.2f}s  "
            f"min {min(values):6.2f}s  max {max(values):6.2f}s  (n={len(values)})"
        )

    show("raw qemu: start -> marker", raw)
    show("driver: start() -> marker", via)
    show("driver: start() returns (QMP up)", start_calls)
    show("guest uptime at marker (raw)", uptimes_raw)
    show("guest uptime at marker (driver)", uptimes_via)
    overhead = statistics.median(via) - statistics.median(raw)
    print(f"driver overhead (median difference): {overhead:+.2f}s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    asyncio.run(main(parser.parse_args().runs))
