"""Host credentials at the gateway, with real authentication (built-in directory, TOTP,
sessions, a SQLite log): an admin issues each host its own credential; with it a host
writes only about itself and only reports on the VMs placed on it; nothing else accepts it,
and it accepts nothing else. The agent's gateway adapter (hostagent/writes.py) is driven
against the same gateway."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from uuid import UUID

import pytest

from tests.support.auth_stack import ADMIN, USER, Stack, auth_stack
from tests.support.hosts import up_host
from tests.support.slapd import free_port
from ucloud.commands.aggregates import HOST
from ucloud.commands.unit_of_work import SYSTEM, Actor
from ucloud.domain import host as host_domain
from ucloud.domain import vm as vm_domain
from ucloud.domain.errors import Forbidden, Rejected
from ucloud.eventstore.errors import UnavailableError
from ucloud.eventstore.leases import leases_for
from ucloud.hostagent.writes import CredentialError, GatewayWrites, read_credential


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with auth_stack(tmp_path, "builtin") as running:
        yield running


async def placed_vm(stack: Stack, host_id: UUID) -> UUID:
    created = await stack.commands.create_vm(Actor("alice"), name=f"vm-{uuid.uuid4().hex[:6]}", cores=1,
                                             ram="256MiB", disk="1GiB", image="tiny")
    await stack.commands.place_vm(SYSTEM, created.result, host_id)
    return created.result


async def issue(stack: Stack, host_id: UUID, admin: dict[str, str]) -> str:
    status, body, _ = await stack.call("POST", f"/v1/hosts/{host_id}/credential", admin)
    assert status == 201, body
    assert body["id"] == str(host_id) and body["credential"].startswith("uch1.")
    return str(body["credential"])


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


async def vm_stream(stack: Stack, vm_id: UUID) -> list[str]:
    return [r.type for r in await stack.store.read_stream(vm_domain.stream_name(vm_id))]


async def test_a_host_reports_on_its_own_vm_and_is_refused_on_another_hosts(stack: Stack) -> None:
    admin = await stack.session("root", ADMIN)
    a = (await up_host(stack.commands, "host-a", 8, "16GiB", "100GiB")).result
    b = (await up_host(stack.commands, "host-b", 8, "16GiB", "100GiB")).result
    mine, theirs = await placed_vm(stack, a), await placed_vm(stack, b)
    credential = await issue(stack, a, admin)
    # Only the digest is in the log, never the credential.
    issued = [r for r in await stack.store.read_stream(host_domain.stream_name(a))
              if r.type == "host.credential_issued"]
    assert len(issued) == 1 and credential.encode() not in issued[0].data
    assert host_domain.credential_digest(credential).encode() in issued[0].data

    status, body, _ = await stack.call("POST", f"/v1/host-agent/vms/{mine}/reports", bearer(credential),
                                       json={"observed": "started", "accelerator": "tcg"})
    assert status == 200, body
    started = (await stack.store.read_stream(vm_domain.stream_name(mine)))[-1]
    assert started.type == "vm.started" and started.actor == "host/host-a@ucloud-system"

    head = await stack.store.head()
    before = await vm_stream(stack, theirs)
    for observed in ("started", "stopped", "crashed", "failed", "deleted", "rebooted"):
        status, body, _ = await stack.call("POST", f"/v1/host-agent/vms/{theirs}/reports", bearer(credential),
                                           json={"observed": observed, "reason": "x"})
        assert status == 403, (observed, body)
        assert body["type"] == "urn:ucloud:problem:forbidden"
        assert str(theirs) in body["detail"] and str(b) in body["detail"] and str(a) in body["detail"], body
    status, body, _ = await stack.call("POST", f"/v1/host-agent/vms/{uuid.uuid4()}/reports", bearer(credential),
                                       json={"observed": "started"})
    assert status == 404, body
    assert await stack.store.head() == head and await vm_stream(stack, theirs) == before  # nothing appended

    # The agent's own adapter, with a command that names host B: the host is still A's.
    writes = GatewayWrites(stack.url, credential)
    try:
        with pytest.raises(Forbidden, match=str(theirs)):
            await writes.report(vm_domain.ReportCrashed(vm_id=theirs, host_id=b, reason="forged"))
        assert await stack.store.head() == head
        position = await writes.report(vm_domain.ReportStopped(vm_id=mine, host_id=b, reason="asked"))
        stopped = (await stack.store.read_stream(vm_domain.stream_name(mine)))[-1]
        assert stopped.position == position and stopped.type == "vm.stopped"
        assert b"host-a" not in stopped.data and str(a).encode() in stopped.data
    finally:
        await writes.close()


async def test_a_host_writes_only_about_itself(stack: Stack) -> None:
    admin = await stack.session("root", ADMIN)
    a = (await up_host(stack.commands, "host-a", 8, "16GiB", "100GiB")).result
    b = (await up_host(stack.commands, "host-b", 8, "16GiB", "100GiB")).result
    credential = await issue(stack, a, admin)
    writes = GatewayWrites(stack.url, credential)
    try:
        await writes.register(16, 64 * 2**30, 2**40, "qemu", ("local",))
        # Up only in a session of the heartbeat lease it really holds.
        leases = leases_for(stack.store)
        head = await stack.store.head()
        with pytest.raises(Rejected, match="holds no heartbeat lease 77"):
            await writes.up(77, 3.0)
        assert await stack.store.head() == head
        grant = await leases.acquire(host_domain.slice_name(a), "host-a", 30)
        assert grant is not None
        await writes.up(grant.token, grant.ttl)
        views = stack.commands
        host_a = (await views.repository.load(HOST, host_domain.stream_name(a))).state
        assert host_a is not None and (host_a.cores, host_a.session, host_a.stores) == (16, grant.token, ("local",))
        # Another host's lease is not this host's session.
        other = await leases.acquire(host_domain.slice_name(b), "host-b", 30)
        assert other is not None
        with pytest.raises(Rejected, match="holds no heartbeat lease"):
            await writes.up(other.token, 3.0)
        await leases.close()
        # No way to name another host: the body has no host, an unknown field is refused.
        head = await stack.store.head()
        status, body, _ = await stack.call("POST", "/v1/host-agent/register", bearer(credential),
                                           json={"hostname": "host-b", "cores": 1, "ram": "1GiB", "disk": "1GiB"})
        assert status == 400 and body["field"] == "hostname", body
        status, body, _ = await stack.call("POST", "/v1/host-agent/up", bearer(credential),
                                           json={"session": 1, "lease_ttl": 3, "host_id": str(b)})
        assert status == 400 and body["field"] == "host_id", body
        # An evacuation nobody asked for is refused; another host's VM is never touched.
        theirs = await placed_vm(stack, b)
        head = await stack.store.head()
        with pytest.raises(Rejected, match="not asked to evacuate"):
            await writes.evacuated([theirs])
        assert await stack.store.head() == head
        await stack.commands.host_command(SYSTEM, host_domain.Evacuate(host_id=a))
        await writes.evacuated([theirs])
        assert (await vm_stream(stack, theirs))[-1] == "vm.scheduled"  # still on B
    finally:
        await writes.close()


async def test_only_the_current_credential_of_an_existing_host_is_accepted(stack: Stack) -> None:
    admin = await stack.session("root", ADMIN)
    a = (await up_host(stack.commands, "host-a", 8, "16GiB", "100GiB")).result
    first = await issue(stack, a, admin)
    leases = leases_for(stack.store)
    grant = await leases.acquire(host_domain.slice_name(a), "host-a", 60)
    assert grant is not None
    await leases.close()
    up = {"session": grant.token, "lease_ttl": 3}
    assert (await stack.call("POST", "/v1/host-agent/up", bearer(first), json=up))[0] == 200
    status, listed, _ = await stack.call("GET", "/v1/hosts", admin, query={"position": str(await stack.store.head())})
    assert status == 200 and [h["credential"] for h in listed["hosts"] if h["id"] == str(a)] == [True], listed
    second = await issue(stack, a, admin)
    status, body, headers = await stack.call("POST", "/v1/host-agent/up", bearer(first), json=up)
    assert status == 401 and "not a valid host credential" in body["detail"], body
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert (await stack.call("POST", "/v1/host-agent/up", bearer(second), json=up))[0] == 200
    # A credential with another host's id in it, or changed by one character, proves nothing.
    other = (await up_host(stack.commands, "host-b", 8, "16GiB", "100GiB")).result
    forged = second.replace(a.hex, other.hex)
    tampered = second[:-1] + ("A" if second[-1] != "A" else "B")
    for wrong in (forged, tampered, "uch1.x", "", second + "x"):
        status, body, _ = await stack.call("POST", "/v1/host-agent/up", bearer(wrong), json=up)
        assert status == 401, (wrong, body)
    # Removing the host revokes its credential (registering it again does not bring it back).
    await stack.commands.host_command(SYSTEM, host_domain.RemoveHost(host_id=a))
    assert (await stack.call("POST", "/v1/host-agent/up", bearer(second), json=up))[0] == 401
    await stack.commands.register_host(SYSTEM, "host-a", 8, "16GiB", "100GiB")
    assert (await stack.call("POST", "/v1/host-agent/up", bearer(second), json=up))[0] == 401
    # A credential for a host that does not exist cannot be issued.
    status, body, _ = await stack.call("POST", f"/v1/hosts/{uuid.uuid4()}/credential", admin)
    assert status == 404, body


async def test_user_credentials_do_not_open_host_routes_and_a_host_credential_opens_nothing_else(
        stack: Stack) -> None:
    admin = await stack.session("root", ADMIN)
    a = (await up_host(stack.commands, "host-a", 8, "16GiB", "100GiB")).result
    vm = await placed_vm(stack, a)
    credential = await issue(stack, a, admin)
    for who in (admin, await stack.session("alice", USER), stack.totp("root", ADMIN), {}):
        status, body, _ = await stack.call("POST", f"/v1/host-agent/vms/{vm}/reports", who,
                                           json={"observed": "started"})
        assert status == 401, (who, body)
    for method, path in (("GET", "/v1/vms"), ("GET", "/v1/hosts"), ("POST", f"/v1/hosts/{a}/credential"),
                         ("POST", f"/v1/vms/{vm}/stop"), ("GET", "/v1/users")):
        status, body, _ = await stack.call(method, path, bearer(credential))
        assert status == 401, (method, path, body)
    # Nobody but an admin issues credentials.
    status, body, _ = await stack.call("POST", f"/v1/hosts/{a}/credential", await stack.session("alice", USER))
    assert status == 404, body



async def test_an_unreachable_gateway_is_unavailable_and_a_bad_credential_file_is_refused(tmp_path: Path) -> None:
    credential = host_domain.credential_for(uuid.uuid4(), os.urandom(32))
    writes = GatewayWrites(f"http://127.0.0.1:{free_port()}", credential)
    try:
        with pytest.raises(UnavailableError, match="cannot be reached"):  # retried by the agent, not fatal
            await writes.up(1, 3.0)
    finally:
        await writes.close()
    path = tmp_path / "credential"
    path.write_text(credential + "\n")
    path.chmod(0o600)
    assert read_credential(path) == credential
    path.chmod(0o640)
    with pytest.raises(CredentialError, match="readable by others"):
        read_credential(path)
    path.write_text("not a credential\n")
    path.chmod(0o600)
    with pytest.raises(CredentialError, match="holds no host credential"):
        read_credential(path)
    with pytest.raises(CredentialError, match="cannot read"):
        read_credential(tmp_path / "missing")
