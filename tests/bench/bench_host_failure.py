"""Host death to replacement QEMUs running elsewhere, and leader fail-over.

    .venv/bin/python -m tests.bench.run host_failure
    .venv/bin/python -m tests.bench.bench_host_failure --trials 10 --vms 5

Every part real and its own process: a 1-member etcd on tmpfs, `ucloud processes`,
three `ucloud-host` agents (default --lease-ttl 3, --lease-margin 0.5) running TCG tiny
guests. Each trial uses a fresh log prefix: the victim host comes up alone and gets
``--vms`` VMs, the two others come up, then the victim dies (its agent and all its QEMUs
SIGKILLed at once). Measured from that SIGKILL:

- detection: until ``host.declared_dead`` is in the log (its record time);
- replacement: until every one of its VMs has a live QEMU under another host's run
  directory (QEMU's pid-file lock, polled every 20 ms).

Then leader fail-over: two `ucloud processes`, the leader SIGKILLed, a VM created at once;
measured until the other instance has placed it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from uuid import UUID

from tests.support.cluster import ALICE, Cluster
from tests.support.etcd import etcd_cluster
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.domain import host as host_domain
from ucloud.domain import vm as vm_domain
from ucloud.eventstore.leases import EtcdLeases
from ucloud.hostagent.qemu import PID_FILE, _lock_holder

ADMIN = Actor("root", "ucloud-admin", is_admin=True)


async def _up(cluster: Cluster, names: list[str]) -> None:
    async def all_up() -> bool:
        hosts = (await cluster.models()).hosts.by_id
        return all((h := hosts.get(host_domain.host_id_for(n))) is not None and h.status is host_domain.HostStatus.UP
                   for n in names)

    await cluster.wait(all_up, 240, f"hosts {names} up")


async def host_trial(endpoints: list[str], root: Path, vms_count: int) -> tuple[float, float]:
    cluster = Cluster(endpoints, root)
    try:
        commands = await cluster.open()
        cluster.start_processes("p1")
        victim = cluster.start_agent("victim")
        await _up(cluster, ["victim"])
        vms = [(await commands.create_vm(ALICE, name=f"b{i}", cores=1, ram="128MB", disk="1GB", image="tiny")).result
               for i in range(vms_count)]

        async def running() -> bool:
            models = await cluster.models()
            return all((v := models.vms.get(vm)) is not None and v.status is vm_domain.Status.RUNNING for vm in vms)

        await cluster.wait(running, 240, "VMs running on the victim")
        others = [cluster.start_agent(name) for name in ("other1", "other2")]
        await _up(cluster, ["other1", "other2"])
        killed_wall = time.time()
        killed = time.monotonic()
        cluster.kill_host(victim)
        born: dict[UUID, float] = {}
        deadline = killed + 120
        while len(born) < len(vms):
            if time.monotonic() > deadline:
                raise RuntimeError(f"replacements not all started: {len(born)}/{len(vms)}")
            for vm in vms:
                if vm not in born and any(_lock_holder(o.state_dir / "run" / str(vm) / PID_FILE) for o in others):
                    born[vm] = time.monotonic()
            await asyncio.sleep(0.02)
        assert cluster.store is not None
        (declared,) = await cluster.store.read_all(types=["host.declared_dead"])
        return declared.time.timestamp() - killed_wall, max(born.values()) - killed
    finally:
        await cluster.close()


async def failover_trial(endpoints: list[str], root: Path) -> float:
    cluster = Cluster(endpoints, root)
    try:
        commands: CommandService = await cluster.open()
        assert cluster.store is not None
        leases = EtcdLeases(cluster.store.client, cluster.store.prefix)
        daemons = {name: cluster.start_processes(name) for name in ("p1", "p2")}
        host = (await commands.register_host(ADMIN,
                                             "fake", 64, "256GB", "1TB")).result
        grant = await leases.acquire(host_domain.slice_name(host), "fake", 30)
        assert grant is not None
        await commands.mark_host_up(ADMIN, host, grant.token, 30)
        while (leader := (await leases.holders("pm-scheduler")).get("pm-scheduler")) is None:  # noqa: ASYNC110 - polling etcd
            await asyncio.sleep(0.05)
        first = (await commands.create_vm(ALICE, name="warm", cores=1, ram="128MB", disk="1GB", image="tiny")).result
        await cluster.wait(lambda: _placed(cluster, first), 60, "first VM placed")
        killed = time.monotonic()
        os.killpg(daemons[leader].pid, signal.SIGKILL)
        vm = (await commands.create_vm(ALICE, name="after", cores=1, ram="128MB", disk="1GB", image="tiny")).result
        await cluster.wait(lambda: _placed(cluster, vm), 60, "VM placed by the new leader")
        return time.monotonic() - killed
    finally:
        await cluster.close()


async def _placed(cluster: Cluster, vm: UUID) -> bool:
    found = (await cluster.models()).vms.get(vm)
    return found is not None and found.host_id is not None


def summary(name: str, values: list[float]) -> str:
    ordered = sorted(values)
    return (f"{name}: p50 {statistics.median(ordered):.2f} s, max {ordered[-1]:.2f} s, "
            f"min {ordered[0]:.2f} s over {len(ordered)} trials")


async def main(trials: int, vms: int, failovers: int) -> None:
    with etcd_cluster(1) as etcd:
        detections, replacements, takeovers = [], [], []
        for trial in range(trials):
            root = Path(tempfile.mkdtemp(prefix=f"bench-hf-{trial}-"))
            detection, replacement = await host_trial(etcd.endpoints, root, vms)
            detections.append(detection)
            replacements.append(replacement)
            print(f"trial {trial + 1}: declared dead after {detection:.2f} s, "
                  f"all {vms} replacement QEMUs started after {replacement:.2f} s", flush=True)
        for trial in range(failovers):
            root = Path(tempfile.mkdtemp(prefix=f"bench-fo-{trial}-"))
            takeovers.append(await failover_trial(etcd.endpoints, root))
            print(f"fail-over {trial + 1}: a VM created after the leader's SIGKILL placed after "
                  f"{takeovers[-1]:.2f} s", flush=True)
        if detections:
            print(summary("host death -> host.declared_dead", detections))
            print(summary(f"host death -> all {vms} replacement QEMUs started", replacements))
        if takeovers:
            print(summary("leader SIGKILL -> next VM placed", takeovers))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--vms", type=int, default=5)
    parser.add_argument("--failovers", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 trial of 2 VMs, 1 fail-over (no figures)")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.vms, args.failovers = 1, 2, 1
    asyncio.run(main(args.trials, args.vms, args.failovers))
