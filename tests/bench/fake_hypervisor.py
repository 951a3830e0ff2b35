"""A host agent with a pretend hypervisor, for the start-up benchmark only (bench_startup.py).

    python -m tests.bench.fake_hypervisor --store sqlite:///… --state-dir DIR --hostname NAME

Not a benchmark itself (tests/bench/run.py skips it): the benchmark starts it as its own
process, as it starts `ucloud-host`. It runs the real host agent
(``ucloud.hostagent.main.run_agent``: the same lease, registration, slice catch-up,
snapshots and reconcile passes) with ``FakeHypervisor`` instead of QEMU and without a
network driver. Why: a host with about 100 running guests is what the benchmark
simulates, a thousand times over in its log; 100 TCG guests do not fit on this machine,
and a start-up figure is about reading the log, not about booting.

``FakeHypervisor`` keeps the guests it "runs" in a JSON file (a list of VM ids) under the
state dir, so an agent started again adopts them as it adopts the QEMU guests that
outlive it. Start, stop, kill and reboot take no time; disks are empty files. It is
never used by the product: ``ucloud-host`` has no option that selects it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path
from typing import ClassVar
from uuid import UUID

from ucloud.hostagent.hypervisor import (
    ExitReason,
    HypervisorDriver,
    NetworkInterface,
    VmHandle,
    VmNotRunning,
    VmSpec,
    VmState,
    VmStatus,
)
from ucloud.hostagent.main import NetworkOptions, run_agent

GUESTS_FILE = "fake-guests.json"


class FakeHypervisor(HypervisorDriver):
    """Guests that are only ids in a file (see the module's docstring)."""

    name: ClassVar[str] = "fake"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.file = root / GUESTS_FILE
        try:
            self.running: set[UUID] = {UUID(v) for v in json.loads(self.file.read_text())}
        except FileNotFoundError:
            self.running = set()
        self.ended: set[UUID] = set()

    @staticmethod
    def write(root: Path, running: list[UUID]) -> None:
        """The guests a host runs before its agent starts."""
        root.mkdir(parents=True, exist_ok=True)
        (root / GUESTS_FILE).write_text(json.dumps(sorted(str(v) for v in running)))

    def _save(self) -> None:
        self.write(self.root, list(self.running))

    def _status(self, vm_id: UUID) -> VmStatus:
        if vm_id in self.running:
            return VmStatus(vm_id=vm_id, state=VmState.RUNNING, pid=1)
        if vm_id in self.ended:
            return VmStatus(vm_id=vm_id, state=VmState.STOPPED, exit_reason=ExitReason.STOPPED_BY_HOST)
        return VmStatus(vm_id=vm_id, state=VmState.ABSENT)

    async def start(self, spec: VmSpec) -> VmHandle:
        started = spec.vm_id not in self.running
        self.running.add(spec.vm_id)
        self.ended.discard(spec.vm_id)
        self._save()
        return VmHandle(vm_id=spec.vm_id, pid=1, run_dir=str(self.run_dir(spec.vm_id)), accel="fake",
                        started=started)

    async def stop(self, vm_id: UUID, timeout: float = 30.0) -> VmStatus:
        return await self.kill(vm_id)

    async def kill(self, vm_id: UUID) -> VmStatus:
        if vm_id in self.running:
            self.running.discard(vm_id)
            self.ended.add(vm_id)
            self._save()
        return self._status(vm_id)

    async def reboot(self, vm_id: UUID) -> None:
        if vm_id not in self.running:
            raise VmNotRunning(f"VM {vm_id} does not run")

    async def status(self, vm_id: UUID) -> VmStatus:
        return self._status(vm_id)

    async def wait_exit(self, vm_id: UUID, timeout: float | None = None) -> VmStatus:
        if vm_id in self.running:
            raise TimeoutError(f"VM {vm_id} still runs")
        return self._status(vm_id)

    async def interfaces(self, vm_id: UUID) -> tuple[NetworkInterface, ...]:
        return ()

    async def attach_interface(self, vm_id: UUID, nic: NetworkInterface) -> None:
        return None

    async def detach_interface(self, vm_id: UUID, tap: str, timeout: float = 60.0) -> None:
        return None

    async def list_running(self) -> list[UUID]:
        return sorted(self.running)

    async def remove(self, vm_id: UUID) -> None:
        self.ended.discard(vm_id)

    async def create_disk(self, image: Path, target: Path, size: int | None = None, *, linked: bool = True) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
        return target

    async def delete_disk(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def run_dir(self, vm_id: UUID) -> Path:
        return self.root / "run" / str(vm_id)

    def console_path(self, vm_id: UUID) -> Path:
        return self.run_dir(vm_id) / "console.sock"

    def vnc_socket_path(self, vm_id: UUID) -> Path:
        return self.run_dir(vm_id) / "vnc.sock"

    def serial_log_path(self, vm_id: UUID) -> Path:
        return self.run_dir(vm_id) / "serial.log"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--hostname", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    state_dir = args.state_dir.absolute()
    asyncio.run(run_agent(args.store, state_dir, args.hostname, "tcg", False,
                          network=NetworkOptions(enabled=False), driver=FakeHypervisor(state_dir)))


if __name__ == "__main__":
    main()
