"""What the trust boundary costs a host agent's report (issue 7, item 2).

    .venv/bin/python -m tests.bench.bench_host_reports [VMS] [--dir DIR]

A host agent reports what it observed of its VMs either straight into the command side
(DirectWrites: `ucloud up`) or through the gateway's host routes with its own credential
(GatewayWrites: `ucloud-host --gateway`), where the gateway authenticates the credential
(after catching its read models up with the log's head) and judges the report against the
VM's placement in the appending transaction. This times VMS reports of each kind (each VM
reported started: one append of vm.started), one after another and 16 at once, on a
SQLite log in DIR (default /var/tmp, a disk) with a gateway served on loopback in the same
process and event loop as the client (so the figure holds both sides' CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from uuid import UUID

from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import SYSTEM, Actor
from ucloud.domain import vm as vm_domain
from ucloud.eventstore.sqlite import SqliteEventStore
from ucloud.gateway.app import COMMANDS, GatewayConfig, start
from ucloud.hostagent.writes import DirectWrites, GatewayWrites, HostWrites


async def placed(commands: CommandService, host_id: UUID, count: int) -> list[UUID]:
    vms = []
    for n in range(count):
        created = await commands.create_vm(Actor("alice"), name=f"vm{n}", cores=1, ram="64MiB", disk="1GiB",
                                           image="tiny")
        await commands.place_vm(SYSTEM, created.result, host_id)
        vms.append(created.result)
    return vms


async def timed(writes: HostWrites, host_id: UUID, vms: list[UUID], parallel: int) -> float:
    start = time.perf_counter()
    for first in range(0, len(vms), parallel):
        await asyncio.gather(*(writes.report(vm_domain.ReportStarted(vm_id=vm, host_id=host_id, accelerator="tcg"))
                               for vm in vms[first:first + parallel]))
    return time.perf_counter() - start


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("vms", nargs="?", type=int, default=500)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="ucloud-bench-reports-") as tmp:
        store = SqliteEventStore(Path(tmp) / "events.sqlite")
        gateway = await start(GatewayConfig(store=store, listen=("127.0.0.1",), port=0, authenticator="header"))
        commands = gateway.app[COMMANDS]
        try:
            host = await commands.register_host(SYSTEM, "node1", 1024, "4TiB", "1PiB")
            await commands.mark_host_up(SYSTEM, host.result, 1, 3.0)
            credential = (await commands.issue_host_credential(SYSTEM, host.result)).result
            print(f"{args.vms} reports per row (vm.started); SQLite log in {tmp}")
            for name, writes in (("direct", DirectWrites(commands, "node1")),
                                 ("gateway", GatewayWrites(gateway.url, credential))):
                try:
                    figures = []
                    for parallel in (1, 16):
                        vms = await placed(commands, host.result, args.vms)
                        elapsed = await timed(writes, host.result, vms, parallel)
                        figures.append(f"{parallel:2} at once: {elapsed / args.vms * 1e3:6.2f} ms/report "
                                       f"({args.vms / elapsed:6.0f}/s)")
                    print(f"{name:8} " + " | ".join(figures))
                finally:
                    await writes.close()
        finally:
            await gateway.stop()
            await store.close()


if __name__ == "__main__":
    asyncio.run(main())
