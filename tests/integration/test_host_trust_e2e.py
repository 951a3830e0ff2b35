"""The trust boundary around the log, end to end with every daemon its own process on a real
etcd with TLS and authentication: a `ucloud gateway` and a `ucloud processes` with the
control role; a host joined with `ucloud host add` + `ucloud host join` (its credential in a
0600 file); its `ucloud-host` with only that credential and the host's etcd role
(docs/operations.md, "Host credentials"), running a real tiny guest under TCG.

The agent registers, comes up, starts, stops and deletes its VM, all through the gateway;
meanwhile, with the same two credentials, a report about another host's VM is refused by
the gateway process and nothing is appended, and etcd refuses any append."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest

from tests.support.etcd_secure import SecureEtcd, secure_etcd
from tests.support.qemu import TINY_CACHE
from tests.support.slapd import free_port
from tests.support.up import BIN, home_env
from ucloud.commands.aggregates import HOST, VM
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import SYSTEM, Actor
from ucloud.domain import host as host_domain
from ucloud.domain import vm as vm_domain
from ucloud.eventstore.errors import AccessDenied
from ucloud.eventstore.etcd import EtcdEventStore
from ucloud.eventstore.leases import EtcdLeases
from ucloud.eventstore.records import NewEvent, StreamAppend
from ucloud.eventstore.url import open_store
from ucloud.hostagent.etcdrole import host_role_grants
from ucloud.hostagent.watchdog import guests

pytestmark = [pytest.mark.etcd, pytest.mark.qemu, pytest.mark.slow]

PREFIX = "/v1"


@pytest.fixture(scope="module")
def etcd() -> Iterator[SecureEtcd]:
    with secure_etcd() as server:
        for command in host_role_grants("ucloud-host-node1", "node1", PREFIX):
            server.etcdctl(*command)
        server.etcdctl("user", "add", "host-node1", "--new-user-password", "node1-password")
        server.etcdctl("user", "grant-role", "host-node1", "ucloud-host-node1")
        yield server


def url(etcd: SecureEtcd, user: str, password: str) -> str:
    password_file = etcd.password_file(user, password)
    return (f"etcd://{etcd.endpoint}{PREFIX}?ca={etcd.ca}&cert={etcd.directory / 'client.pem'}"
            f"&key={etcd.directory / 'client-key.pem'}&user={user}&password_file={password_file}&timeout=5")


class Daemons:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.processes: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        out = open(self.root / f"{name}.log", "ab")
        process = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=out, stderr=out, start_new_session=True)
        out.close()
        self.processes.append(process)
        return process

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


def post(api: str, path: str, body: object, credential: str) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(api + path, data=json.dumps(body).encode(), method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {credential}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def wait(predicate, timeout: float, what: str, daemons: Daemons) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout}s\n{daemons.logs()}")
        await asyncio.sleep(0.2)


async def _placed_on(commands: CommandService, vm_id: UUID) -> UUID | None:
    loaded = await commands.repository.load(VM, vm_domain.stream_name(vm_id))
    return loaded.state.host_id if loaded.state is not None else None


async def test_a_host_with_only_its_own_credentials_runs_its_vm_and_cannot_write_anything_else(
        etcd: SecureEtcd, tmp_path: Path) -> None:
    daemons = Daemons(tmp_path)
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    state = Path(tempfile.mkdtemp(prefix="ucnode1-", dir="/tmp"))  # short: QMP socket paths
    (state / "cache").mkdir()
    (state / "cache" / "tinyguest").symlink_to(TINY_CACHE)
    control = open_store(url(etcd, "control", "control-password"))
    assert isinstance(control, EtcdEventStore)
    try:
        daemons.spawn("gateway", "ucloud", "gateway", "--store", url(etcd, "control", "control-password"),
                      "--insecure-header-auth", "--listen", "127.0.0.1", "--port", str(port),
                      "--state-dir", str(tmp_path / "gateway"))
        daemons.spawn("processes", "ucloud", "processes", "--store", url(etcd, "control", "control-password"),
                      "--instance", "p1", "--lease-ttl", "2")

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(api + "/healthz", timeout=2) as answer:
                    return bool(answer.status == 200)
            except OSError:
                return False

        async def serving() -> bool:
            return await asyncio.to_thread(healthy)

        await wait(serving, 60, "the gateway serving", daemons)
        # The admin joins the host: registered, then its own credential in a 0600 file.
        admin = ["--api", api, "--user", "root", "--realm", "ucloud-admin"]
        credential_file = state / "credential"
        for args in (["host", "add", "node1", "--cores", "4", "--ram", "4GB", "--disk", "50GB"],
                     ["host", "join", "node1", "--credential-file", str(credential_file)]):
            done = await asyncio.to_thread(subprocess.run, [str(BIN / "ucloud"), *admin, *args],
                                           env=home_env(tmp_path / "home"), capture_output=True, text=True,
                                           timeout=60)
            assert done.returncode == 0, (args, done.stdout, done.stderr)
        assert "--credential-file" in done.stdout and (credential_file.stat().st_mode & 0o777) == 0o600
        credential = credential_file.read_text().strip()
        assert credential not in done.stdout  # written, not shown
        listed = await asyncio.to_thread(subprocess.run, [str(BIN / "ucloud"), *admin, "host", "list", "--json"],
                                         env=home_env(tmp_path / "home"), capture_output=True, text=True, timeout=60)
        assert [h["credential"] for h in json.loads(listed.stdout) if h["hostname"] == "node1"] == [True], listed

        host_url = url(etcd, "host-node1", "node1-password")
        agent_args = ["ucloud-host", "--store", host_url, "--state-dir", str(state), "--hostname", "node1",
                      "--accel", "tcg", "--no-network", "--gateway", api, "--credential-file", str(credential_file)]
        # A credential file others can read is refused before anything starts.
        credential_file.chmod(0o644)
        refused = await asyncio.to_thread(subprocess.run, [str(BIN / agent_args[0]), *agent_args[1:]],
                                          capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "readable by others" in refused.stderr, refused.stderr
        credential_file.chmod(0o600)
        daemons.spawn("agent-node1", *agent_args)

        commands = CommandService(control)
        node1 = host_domain.host_id_for("node1")

        async def host_up() -> bool:
            loaded = await commands.repository.load(HOST, host_domain.stream_name(node1))
            return loaded.state is not None and loaded.state.status is host_domain.HostStatus.UP

        await wait(host_up, 240, "node1 up", daemons)
        vm = (await commands.create_vm(Actor("alice"), name="web", cores=1, ram="128MB", disk="1GB",
                                       image="tiny")).result

        async def vm_in(status: vm_domain.Status) -> bool:
            loaded = await commands.repository.load(VM, vm_domain.stream_name(vm))
            return loaded.state is not None and loaded.state.status is status

        await wait(lambda: vm_in(vm_domain.Status.RUNNING), 180, "the VM running on node1", daemons)
        assert guests(state / "run"), "no QEMU runs for the VM"
        records = await control.read_stream(host_domain.stream_name(node1))
        written_by_host = {r.type for r in records if r.actor == "host/node1@ucloud-system"}
        assert {"host.up", "host.capacity_changed"} <= written_by_host, written_by_host
        started = [r for r in await control.read_stream(vm_domain.stream_name(vm)) if r.type == "vm.started"]
        assert started and started[0].actor == "host/node1@ucloud-system"

        # Another host's VM: node1's credential cannot report about it; nothing is appended.
        # (node2 holds a real heartbeat lease, so the failure detector leaves its VM there.)
        other = (await commands.register_host(SYSTEM, "node2", 4, "4GiB", "50GiB")).result
        leases = EtcdLeases(control.client, control.prefix)
        grant = await leases.acquire(host_domain.slice_name(other), "node2", 300)
        assert grant is not None
        await commands.mark_host_up(SYSTEM, other, grant.token, grant.ttl)
        theirs = (await commands.create_vm(Actor("bob"), name="db", cores=1, ram="128MB", disk="1GB",
                                           image="tiny")).result
        await commands.place_vm(SYSTEM, theirs, other)
        head = await control.head()
        status, problem = await asyncio.to_thread(post, api, f"/v1/host-agent/vms/{theirs}/reports",
                                                  {"observed": "crashed", "reason": "forged"}, credential)
        assert status == 403 and str(theirs) in str(problem["detail"]), problem
        assert await control.head() == head
        # Its etcd credential cannot append, nor write any key of the log.
        async with open_store(host_url) as as_host:
            with pytest.raises(AccessDenied):
                await as_host.append(StreamAppend(vm_domain.stream_name(theirs), 2, [
                    NewEvent(type="vm.crashed", data=b"{}")]))
        assert await control.head() == head

        # The user's intent reaches the host through the log; its observations come back through the gateway.
        await commands.vm_command(Actor("alice"), vm_domain.StopVm(vm_id=vm))
        await wait(lambda: vm_in(vm_domain.Status.STOPPED), 120, "the VM stopped by node1", daemons)
        assert [r.actor for r in await control.read_stream(vm_domain.stream_name(vm))
                if r.type == "vm.stopped"] == ["host/node1@ucloud-system"]
        await commands.vm_command(Actor("alice"), vm_domain.DeleteVm(vm_id=vm))
        await wait(lambda: vm_in(vm_domain.Status.DELETED), 120, "the VM deleted by node1", daemons)
        deleted = (await control.read_stream(vm_domain.stream_name(vm)))[-1]
        assert deleted.type == "vm.deleted" and deleted.actor == "host/node1@ucloud-system"
        assert not guests(state / "run")
        status, problem = await asyncio.to_thread(post, api, f"/v1/host-agent/vms/{theirs}/reports",
                                                  {"observed": "started"}, credential)
        assert status == 403 and await _placed_on(commands, theirs) == other, problem
        await leases.release(grant)
    finally:
        daemons.stop()
        for pid in guests(state / "run"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await control.close()
        shutil.rmtree(state, ignore_errors=True)

