"""Dead hosts, proven with every daemon its own process on a real etcd and real TCG guests:
`ucloud-host` agents and a `ucloud processes`; a host dies (its agent and its QEMUs
SIGKILLed at once) and every VM it ran comes up on another host; a hung agent (SIGSTOP)
is fenced by its `ucloud-watchdog` before any replacement starts; a host cut off from
etcd (its network namespace's link dropped) fences itself before its VMs start
elsewhere, and when the link returns rejoins without running them again; an evacuated
host stops its guests before they start elsewhere."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
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
    await wait_up(cluster, names)


async def wait_up(cluster: Cluster, names: list[str]) -> None:
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


# Killed-host trials (the issue asks for ten): UCLOUD_KILL_TRIALS to run fewer or more.
KILL_TRIALS = int(os.environ.get("UCLOUD_KILL_TRIALS", "10"))


async def test_a_killed_host_s_vms_run_on_other_hosts(cluster: tuple[Cluster, CommandService]) -> None:
    """KILL_TRIALS times: the host running the first VM dies (agent, watchdog and QEMUs
    SIGKILLed at once); its VMs run on other hosts with a new placement epoch, the others
    are untouched; a fresh host joins so that three are up for the next trial."""
    made, commands = cluster
    await start_hosts(made, ["ha", "hb", "hc"])
    vms = await create_running(made, commands, 3)
    moves = dict.fromkeys(vms, 0)
    for trial in range(KILL_TRIALS):
        models = await made.models()
        victim_id = models.vms.get(vms[0]).host_id
        victim = next(a for a in made.agents.values() if a.host_id == victim_id)
        moved = [v for v in vms if models.vms.get(v).host_id == victim_id]
        epochs = {v: models.vms.get(v).epoch for v in vms}
        made.kill_host(victim)

        async def replaced(moved: list[UUID] = moved, victim_id: UUID | None = victim_id) -> bool:
            models = await made.models()
            for vm_id in moved:
                vm = models.vms.get(vm_id)
                if vm is None or vm.status is not S.RUNNING or vm.host_id in (None, victim_id):
                    return False
            return True

        await made.wait(replaced, 120, f"trial {trial}: the dead host's VMs running elsewhere")
        models = await made.models()
        dead = models.hosts.by_id[victim_id]
        assert dead.status is host_domain.HostStatus.DEAD and dead.claims == {}
        assert "lease" in dead.reason
        for vm_id in moved:
            moves[vm_id] += 1
            vm = models.vms.get(vm_id)
            assert vm is not None and vm.epoch == epochs[vm_id] + 1
            survivor = next(a for a in made.agents.values() if a.host_id == vm.host_id)
            assert qemu_of(survivor, vm_id) is not None, "a real QEMU runs it on its new host"
            lost = [r for r in await made.store.read_stream(vm_domain.stream_name(vm_id))  # type: ignore[union-attr]
                    if r.type == "vm.host_lost"]
            assert len(lost) == moves[vm_id]
        # VMs elsewhere were not touched.
        for vm_id in set(vms) - set(moved):
            assert models.vms.get(vm_id).epoch == epochs[vm_id]
        if trial < KILL_TRIALS - 1:
            await start_hosts(made, [f"hx{trial}"])  # three hosts up again


# Hung-agent trials (the issue asks for twenty): UCLOUD_FENCE_TRIALS to run fewer or more.
FENCE_TRIALS = int(os.environ.get("UCLOUD_FENCE_TRIALS", "20"))


async def test_a_hung_agent_is_fenced_by_its_watchdog_before_any_replacement_starts(
        cluster: tuple[Cluster, CommandService]) -> None:
    """SIGSTOP the agent holding the VMs, FENCE_TRIALS times (the victims alternate): each
    time every old guest is dead before its replacement starts (zero overlaps), and the
    agent, woken again, rejoins and starts none of the VMs that moved away."""
    made, commands = cluster
    await start_hosts(made, ["wa", "wb"], watchdog=True)
    vms = await create_running(made, commands, 2)
    overlaps: list[str] = []
    for trial in range(FENCE_TRIALS):
        models = await made.models()
        victim_id = models.vms.get(vms[0]).host_id
        victim = next(a for a in made.agents.values() if a.host_id == victim_id)
        moved = [v for v in vms if models.vms.get(v).host_id == victim_id]
        dead_session = models.hosts.by_id[victim_id].session  # read before the hang: it may rejoin fast

        async def running_on_victim(victim: Agent = victim, moved: list[UUID] = moved) -> bool:
            return all(qemu_of(victim, v) is not None for v in moved)

        await made.wait(running_on_victim, 60, f"trial {trial}: the victim's guests run")
        old = {v: qemu_of(victim, v) for v in moved}
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
            overlaps += [f"trial {trial}: {vm_id}" for vm_id in moved
                         if vm_id not in died or died[vm_id] > born[vm_id]]
        finally:
            os.kill(victim.process.pid, signal.SIGCONT)
        # The agent wakes up, finds its VMs moved and its lease gone: it starts none of them again.

        async def rejoined(victim_id: UUID = victim_id, dead_session: int = dead_session) -> bool:
            host = (await made.models()).hosts.by_id[victim_id]
            return host.status is host_domain.HostStatus.UP and host.session != dead_session

        await made.wait(rejoined, 60, f"trial {trial}: the hung host rejoins")
        assert all(qemu_of(victim, v) is None for v in moved), "a moved VM must not run on its old host"
    assert overlaps == [], f"an old guest still ran when its replacement started: {overlaps}"
    time.sleep(3)  # noqa: ASYNC251 - give the last victim time to (wrongly) start something
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


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def cut_off_etcd(tmp_path: Path) -> Iterator[tuple[EtcdCluster, str, str, str]]:
    """An etcd reachable from the root namespace on loopback and from a network namespace
    over a veth pair whose root end the test can take down: (cluster, netns, root veth,
    the address etcd has on it)."""
    tag = uuid.uuid4().hex[:6]
    netns, outside, inside = f"uchf-{tag}", f"uh{tag}r", f"uh{tag}n"
    subnet = int(tag[:2], 16)
    address = f"10.213.{subnet}.1"
    ip("netns", "add", netns)
    cluster: EtcdCluster | None = None
    try:
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", netns)
        ip("addr", "add", f"{address}/30", "dev", outside)
        ip("link", "set", outside, "up")
        ip("-n", netns, "addr", "add", f"10.213.{subnet}.2/30", "dev", inside)
        ip("-n", netns, "link", "set", inside, "up")
        ip("-n", netns, "link", "set", "lo", "up")
        cluster = EtcdCluster(1)
        member = cluster.members[0]
        port = member.client_port
        member.extra_args += ["--listen-client-urls", f"http://127.0.0.1:{port},http://{address}:{port}"]
        cluster.start()
        yield cluster, netns, outside, f"{address}:{port}"
    finally:
        if cluster is not None:
            cluster.close()
        subprocess.run(["ip", "link", "del", outside], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


@pytest.mark.netns
async def test_a_host_cut_off_from_etcd_fences_itself_and_rejoins_without_restarting_moved_vms(
        cut_off_etcd: tuple[EtcdCluster, str, str, str], tmp_path: Path) -> None:
    etcd, netns, link, endpoint = cut_off_etcd
    made = Cluster(etcd.endpoints, tmp_path)
    try:
        commands = await made.open()
        made.start_processes("p1")
        made.start_agent("cut", watchdog=True, netns=netns, endpoint=endpoint)
        await wait_up(made, ["cut"])
        vms = await create_running(made, commands, 2)
        await start_hosts(made, ["keep"])
        victim = made.agents["cut"]
        victim_id = victim.host_id
        old = {v: qemu_of(victim, v) for v in vms}
        assert all(old.values())
        session = (await made.models()).hosts.by_id[victim_id].session
        ip("link", "set", link, "down")  # the host is alive, etcd out of its reach
        died: dict[UUID, float] = {}
        born: dict[UUID, float] = {}
        deadline = time.monotonic() + 120
        while len(born) < len(vms):
            assert time.monotonic() < deadline, made.log("agent-cut.log") + made.log("watchdog-cut.log")
            for vm_id, pid in old.items():
                if vm_id not in died and not alive(pid):  # type: ignore[arg-type]
                    died[vm_id] = time.monotonic()
            for vm_id in vms:
                if vm_id not in born and qemu_of(made.agents["keep"], vm_id) is not None:
                    born[vm_id] = time.monotonic()
            time.sleep(0.02)  # noqa: ASYNC251 - a tight observation loop
        assert all(died[v] <= born[v] for v in vms), "fenced before the replacements started"
        ip("link", "set", link, "up")

        async def rejoined() -> bool:
            host = (await made.models()).hosts.by_id[victim_id]
            return host.status is host_domain.HostStatus.UP and host.session != session

        await made.wait(rejoined, 90, "the cut-off host rejoins in a new session")
        time.sleep(4)  # noqa: ASYNC251 - room for a wrong restart to happen
        assert all(qemu_of(victim, v) is None for v in vms), "a moved VM must not run on its old host again"
        models = await made.models()
        keep_id = made.agents["keep"].host_id
        assert all(models.vms.get(v).host_id == keep_id and models.vms.get(v).status is S.RUNNING for v in vms)
        assert "fenced" in made.log("agent-cut.log") or "killing" in made.log("watchdog-cut.log")
    finally:
        await made.close()
