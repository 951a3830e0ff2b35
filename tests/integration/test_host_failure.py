"""Dead hosts, proven with every daemon its own process on a real etcd and real TCG guests:
three `ucloud-host` agents and a `ucloud processes`; a host dies (its agent and its QEMUs
SIGKILLed at once) and every VM it ran comes up on another host; a hung agent (SIGSTOP)
is fenced by its `ucloud-watchdog` before any replacement starts."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from uuid import UUID

import pytest

from tests.support.cluster import ALICE, Agent, Cluster
from tests.support.etcd import EtcdCluster
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import SYSTEM
from ucloud.domain import host as host_domain
from ucloud.domain import vm as vm_domain

pytestmark = [pytest.mark.etcd, pytest.mark.qemu, pytest.mark.slow]

S = vm_domain.Status


@pytest.fixture
async def cluster(etcd: EtcdCluster, tmp_path: Path) -> AsyncIterator[tuple[Cluster, CommandService]]:
    made = Cluster(etcd.endpoints, tmp_path)
    try:
        commands = await made.open()
        made.start_processes("p1")
        yield made, commands
    finally:
        await made.close()


async def start_hosts(cluster: Cluster, names: list[str], *, watchdog: bool = False) -> None:
    for name in names:
        cluster.start_agent(name, watchdog=watchdog)

    async def all_up() -> bool:
        hosts = (await cluster.models()).hosts.by_id
        return all(host_domain.host_id_for(n) in hosts and hosts[host_domain.host_id_for(n)].status
                   is host_domain.HostStatus.UP for n in names)

    await cluster.wait(all_up, 240, "every host up")


async def create_running(cluster: Cluster, commands: CommandService, count: int) -> list[UUID]:
    vms = [(await commands.create_vm(ALICE, name=f"vm{i}", cores=1, ram="128MB", disk="1GB", image="tiny")).result
           for i in range(count)]

    async def running() -> bool:
        models = await cluster.models()
        return all((vm := models.vms.get(v)) is not None and vm.status is S.RUNNING for v in vms)

    await cluster.wait(running, 180, "every VM running")
    return vms


def alive(pid: int) -> bool:
    """Running, not a zombie (a killed QEMU whose stopped parent agent cannot reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def qemu_of(agent: Agent, vm_id: UUID) -> int | None:
    from ucloud.hostagent.qemu import PID_FILE, _lock_holder

    return _lock_holder(agent.state_dir / "run" / str(vm_id) / PID_FILE)


async def test_a_killed_host_s_vms_run_on_other_hosts(cluster: tuple[Cluster, CommandService]) -> None:
    made, commands = cluster
    await start_hosts(made, ["ha", "hb", "hc"])
    vms = await create_running(made, commands, 3)
    models = await made.models()
    victim_id = models.vms.get(vms[0]).host_id
    victim = next(a for a in made.agents.values() if a.host_id == victim_id)
    moved = [v for v in vms if models.vms.get(v).host_id == victim_id]
    made.kill_host(victim)

    async def replaced() -> bool:
        models = await made.models()
        for vm_id in moved:
            vm = models.vms.get(vm_id)
            if vm is None or vm.status is not S.RUNNING or vm.host_id in (None, victim_id):
                return False
        return True

    await made.wait(replaced, 120, "the dead host's VMs running elsewhere")
    models = await made.models()
    dead = models.hosts.by_id[victim_id]
    assert dead.status is host_domain.HostStatus.DEAD and dead.claims == {}
    assert "lease" in dead.reason
    for vm_id in moved:
        vm = models.vms.get(vm_id)
        assert vm is not None and vm.epoch == 2
        survivor = next(a for a in made.agents.values() if a.host_id == vm.host_id)
        assert qemu_of(survivor, vm_id) is not None, "a real QEMU runs it on its new host"
        lost = [r for r in await made.store.read_stream(vm_domain.stream_name(vm_id))  # type: ignore[union-attr]
                if r.type == "vm.host_lost"]
        assert len(lost) == 1
    # VMs elsewhere were not touched.
    for vm_id in set(vms) - set(moved):
        assert models.vms.get(vm_id).epoch == 1


async def test_a_hung_agent_is_fenced_by_its_watchdog_before_any_replacement_starts(
        cluster: tuple[Cluster, CommandService]) -> None:
    made, commands = cluster
    await start_hosts(made, ["wa", "wb"], watchdog=True)
    vms = await create_running(made, commands, 2)
    models = await made.models()
    victim_id = models.vms.get(vms[0]).host_id
    victim = next(a for a in made.agents.values() if a.host_id == victim_id)
    moved = [v for v in vms if models.vms.get(v).host_id == victim_id]
    old = {v: qemu_of(victim, v) for v in moved}
    assert all(old.values())
    assert victim.process is not None
    os.kill(victim.process.pid, signal.SIGSTOP)  # hung: it renews nothing, fences nothing
    try:
        # Poll fast: note when each old guest died and when each replacement appeared.
        died: dict[UUID, float] = {}
        born: dict[UUID, float] = {}
        deadline = time.monotonic() + 120
        while len(born) < len(moved):
            assert time.monotonic() < deadline, made.log("watchdog-" + victim.hostname + ".log")
            now = time.monotonic()
            for vm_id, pid in old.items():
                if vm_id not in died and not alive(pid):
                    died[vm_id] = now
            for vm_id in moved:
                if vm_id in born:
                    continue
                for agent in made.agents.values():
                    if agent is not victim and qemu_of(agent, vm_id) is not None:
                        born[vm_id] = time.monotonic()
            time.sleep(0.02)  # noqa: ASYNC251 - a tight observation loop; nothing else runs here
        for vm_id in moved:
            assert vm_id in died and died[vm_id] <= born[vm_id], "the old guest died before its replacement"
    finally:
        os.kill(victim.process.pid, signal.SIGCONT)
    # The agent wakes up, finds its VMs moved and its lease gone: it starts none of them again.
    dead_session = (await made.models()).hosts.by_id[victim_id].session

    async def rejoined() -> bool:
        host = (await made.models()).hosts.by_id[victim_id]
        return host.status is host_domain.HostStatus.UP and host.session != dead_session

    await made.wait(rejoined, 60, "the hung host rejoins")
    time.sleep(3)  # noqa: ASYNC251 - give it time to (wrongly) start something
    assert all(qemu_of(victim, v) is None for v in moved), "a moved VM must not run on its old host"


async def test_an_evacuated_host_s_guests_stop_before_they_start_elsewhere(
        cluster: tuple[Cluster, CommandService]) -> None:
    made, commands = cluster
    await start_hosts(made, ["ea", "eb"])
    vms = await create_running(made, commands, 2)
    models = await made.models()
    source_id = models.vms.get(vms[0]).host_id
    source = next(a for a in made.agents.values() if a.host_id == source_id)
    moving = [v for v in vms if models.vms.get(v).host_id == source_id]
    old = {v: qemu_of(source, v) for v in moving}
    await commands.host_command(SYSTEM, host_domain.Evacuate(host_id=source_id))
    died: dict[UUID, float] = {}
    born: dict[UUID, float] = {}
    deadline = time.monotonic() + 120
    while len(born) < len(moving):
        assert time.monotonic() < deadline, made.log(f"agent-{source.hostname}.log")
        for vm_id, pid in old.items():
            if vm_id not in died and (pid is None or not alive(pid)):
                died[vm_id] = time.monotonic()
        for vm_id in moving:
            if vm_id not in born and any(qemu_of(a, vm_id) for a in made.agents.values() if a is not source):
                born[vm_id] = time.monotonic()
        time.sleep(0.02)  # noqa: ASYNC251 - a tight observation loop
    assert all(died[v] <= born[v] for v in moving), "a guest stopped here before it started elsewhere"
    models = await made.models()
    host = models.hosts.by_id[source_id]
    assert host.maintenance and not host.evacuating and host.claims == {}
    assert all(models.vms.get(v).host_id not in (None, source_id) for v in moving)
