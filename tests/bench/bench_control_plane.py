"""Control-plane overhead: a raw QEMU boot versus `ucloud vm create --wait`, to the same marker.

    .venv/bin/python -m tests.bench.run control_plane                  # through the runner
    .venv/bin/python -m tests.bench.bench_control_plane [--runs 5]

In one run of this script:
- raw:    qemu-system-x86_64 started by hand (subprocess, nothing else) with the command
          line the QEMU driver builds for the tiny guest (build_argv, through
          tests/bench/guest_boot.raw_boot), with the same kind of qcow2 overlay disk a
          ucloud VM gets; clock from Popen to UCLOUD-GUEST-READY on its serial log.
- ucloud: `ucloud up` (gateway with real authentication, scheduler, host agent with the
          QEMU driver; log on SQLite; state in a short temp dir under /tmp) runs as a
          subprocess; the clock runs from spawning `ucloud vm create --image tiny --cores 1
          --ram 256MiB --disk 1GiB --wait --json` to the same marker on the new VM's
          serial log. The CLI's own start-up (Python, credentials) is included: it is
          what a user waits for.
Both use the accelerator the driver's probe picks (TCG here: KVM does not work on this
machine). Raw and ucloud boots alternate, so background load hits both alike; one
ucloud VM is created and deleted first, untimed (first-start costs). Each ucloud VM is
deleted (--wait) before the next boot. Reported: medians over the runs, the difference
(the control plane's overhead), and where the ucloud time goes, from the log's own
event times: CLI start -> vm.requested -> vm.scheduled -> vm.started -> marker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.bench.guest_boot import raw_boot
from tests.support.etcd import free_port
from tests.support.qemu import TINY_CACHE, kill_leftovers, short_run_root, wait_for_marker
from ucloud.eventstore.url import open_store
from ucloud.hostagent.qemu import QemuDriver
from ucloud.hostagent.tinyguest import ensure_tiny_guest

BIN = Path(sys.executable).parent
GiB = 1024**3


@dataclass
class UcloudBoot:
    total: float  # CLI spawned -> marker
    cli: float  # CLI spawned -> CLI returned (VM running)
    to_requested: float  # CLI spawned -> vm.requested (event time)
    requested_to_scheduled: float
    scheduled_to_started: float
    started_to_marker: float


class Cloud:
    """`ucloud up` on SQLite in a short temp dir, and the CLI pointed at it."""

    def __init__(self, accel: str) -> None:
        # Short: QMP/VNC/console unix socket paths under <state>/run/<uuid>/ must stay < 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="ucb-", dir="/tmp"))
        self.store_url = f"sqlite://{self.root / 'events.sqlite'}"
        self.port = free_port()
        self.env = {**os.environ, "XDG_CONFIG_HOME": str(self.root / "config"),
                    "XDG_STATE_HOME": str(self.root / "xdg-state")}
        self.env.pop("UCLOUD_API", None)
        # The tiny guest is already built in the shared cache: no kernel download.
        (self.root / "cache").mkdir()
        (self.root / "cache" / "tinyguest").symlink_to(Path(TINY_CACHE).resolve())
        self.log = open(self.root / "up.log", "ab")
        self.process = subprocess.Popen(
            [str(BIN / "ucloud"), "up", "--store", self.store_url, "--state-dir", str(self.root),
             "--listen", "127.0.0.1", "--port", str(self.port), "--hostname", "bench", "--accel", accel],
            stdout=self.log, stderr=self.log, env=self.env, start_new_session=True,
        )

    def ucloud(self, *args: str, timeout: float = 180) -> str:
        done = subprocess.run([str(BIN / "ucloud"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"ucloud {' '.join(args)}: {done.stderr}\n{self.log_tail()}")
        return done.stdout

    def log_tail(self) -> str:
        return (self.root / "up.log").read_text(errors="replace")[-3000:]

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ucloud up exited with {self.process.returncode}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ucloud up not ready after {timeout}s\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1):
                    pass
                if (self.root / "config" / "ucloud" / "credentials").exists():
                    hosts = json.loads(self.ucloud("host", "list", "--json", timeout=30))
                    if any(h["hostname"] == "bench" for h in hosts):
                        return
            except (OSError, RuntimeError):
                pass
            time.sleep(0.3)

    def run_dir(self, vm_id: str) -> Path:
        return self.root / "run" / vm_id

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        # Guests outlive `ucloud up` by design; ours end with the benchmark.
        kill_leftovers(self.root / "run")
        shutil.rmtree(self.root, ignore_errors=True)


async def event_times(store_url: str, vm_id: str) -> dict[str, float]:
    store = open_store(store_url)
    try:
        records = await store.read_stream(f"vm-{vm_id}")
    finally:
        await store.close()
    times: dict[str, float] = {}
    for record in records:
        times.setdefault(record.type, record.time.timestamp())
    return times


async def ucloud_boot(cloud: Cloud) -> UcloudBoot:
    began_wall = time.time()
    began = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "ucloud"), "vm", "create", "--image", "tiny", "--cores", "1", "--ram", "256MiB",
        "--disk", "1GiB", "--wait", "--timeout", "150", "--json",
        env=cloud.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    cli = time.monotonic() - began
    if proc.returncode != 0:
        raise RuntimeError(f"ucloud vm create: {err.decode()}\n{cloud.log_tail()}")
    vm = json.loads(out)
    if vm["status"] != "running":
        raise RuntimeError(f"the VM is {vm['status']}: {vm.get('reason')}")
    await wait_for_marker(cloud.run_dir(vm["id"]) / "serial.log", timeout=120)
    total = time.monotonic() - began
    marker_wall = began_wall + total
    times = await event_times(cloud.store_url, vm["id"])
    await asyncio.to_thread(cloud.ucloud, "vm", "delete", vm["id"], "--wait", "--timeout", "60")
    return UcloudBoot(
        total=total, cli=cli, to_requested=times["vm.requested"] - began_wall,
        requested_to_scheduled=times["vm.scheduled"] - times["vm.requested"],
        scheduled_to_started=times["vm.started"] - times["vm.scheduled"],
        started_to_marker=marker_wall - times["vm.started"],
    )


async def measure(runs: int) -> None:
    guest = ensure_tiny_guest(TINY_CACHE)
    probe = QemuDriver("/tmp/ucloud-bench-probe", accel="auto")
    accel = await probe.accelerator()
    print(f"accelerator: {accel} ({probe.accel_probe.reason if probe.accel_probe else ''})", flush=True)
    cloud = Cloud(accel)
    raw: list[float] = []
    boots: list[UcloudBoot] = []
    try:
        await asyncio.to_thread(cloud.wait_ready)
        await ucloud_boot(cloud)  # warm-up, untimed
        with short_run_root() as root:
            driver = QemuDriver(root / "disks", accel=accel)  # type: ignore[arg-type]
            try:
                for run in range(runs):
                    # The same overlay a ucloud VM gets (untimed), then the plain launch.
                    disk = await driver.create_disk(guest.disk_image, root / "disks" / f"raw{run}.qcow2", GiB)
                    took, _ = await raw_boot(root, accel, disk=disk)
                    raw.append(took)
                    boot = await ucloud_boot(cloud)
                    boots.append(boot)
                    print(f"run {run + 1}: raw {took:.2f}s, ucloud {boot.total:.2f}s "
                          f"(CLI returned {boot.cli:.2f}s)", flush=True)
            finally:
                kill_leftovers(root)
    finally:
        cloud.stop()

    def show(label: str, values: list[float], ms: bool = False) -> None:
        scale, unit, digits = (1000, "ms", 0) if ms else (1, "s", 2)
        low, mid, high = (f"{v * scale:7.{digits}f}{unit}" for v in (min(values), statistics.median(values), max(values)))
        print(f"{label:<46} median {mid}  min {low}  max {high}  (n={len(values)})")

    show("raw qemu: Popen -> marker", raw)
    show("ucloud vm create --wait: spawn -> marker", [b.total for b in boots])
    overhead = statistics.median([b.total for b in boots]) - statistics.median(raw)
    print(f"control-plane overhead (difference of medians): {overhead:+.2f}s")
    show("  CLI spawn -> vm.requested", [b.to_requested for b in boots], ms=True)
    show("  vm.requested -> vm.scheduled", [b.requested_to_scheduled for b in boots], ms=True)
    show("  vm.scheduled -> vm.started (disk, QEMU, QMP)", [b.scheduled_to_started for b in boots], ms=True)
    show("  vm.started -> marker (guest boot)", [b.started_to_marker for b in boots])
    show("  CLI spawn -> CLI returned (VM running)", [b.cli for b in boots])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one run (a smoke test)")
    args = parser.parse_args(argv)
    asyncio.run(measure(1 if args.quick else args.runs))


if __name__ == "__main__":
    main()
