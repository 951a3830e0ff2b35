"""Host operations through the API: maintenance, evacuate, remove, and the host states in
`GET /v1/hosts`; with the real scheduler on the process framework."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import open_store
from tests.support.gateway import ADMIN, Api, user, vm_body
from tests.support.hosts import up_host
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import SYSTEM
from ucloud.gateway.app import COMMANDS, GatewayConfig, init_app
from ucloud.processes.scheduler import Scheduler


@pytest.fixture(params=["memory", "sqlite"])
async def cloud(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Api, Api, CommandService]]:
    store = await open_store(request.param, tmp_path, request)
    app = init_app(GatewayConfig(store=store, read_timeout=5.0))
    async with TestClient(TestServer(app)) as client:
        commands = app[COMMANDS]
        task = asyncio.create_task(Scheduler(commands).run())
        try:
            yield Api(client, ADMIN), Api(client, user("alice")), commands
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    await store.close()


async def settle(alice: Api, vm: dict[str, Any], want: str) -> dict[str, Any]:
    shown: dict[str, Any] = {}
    for _ in range(200):
        shown = await alice.ok("GET", f"/v1/vms/{vm['id']}?position={vm['position']}")
        if shown["status"] == want:
            return shown
        await asyncio.sleep(0.05)
    raise AssertionError(shown)


async def hosts(admin: Api, position: int = 0) -> dict[str, dict[str, Any]]:
    listed = await admin.ok("GET", f"/v1/hosts?position={position}")
    return {h["hostname"]: h for h in listed["hosts"]}


async def test_only_up_hosts_not_in_maintenance_get_placements(cloud: tuple[Api, Api, CommandService]) -> None:
    admin, alice, commands = cloud
    registered = await admin.ok("POST", "/v1/hosts", {"hostname": "silent", "cores": 8, "ram": "16GB", "disk": "1TB"})
    assert (await hosts(admin, registered["position"]))["silent"]["status"] == "unknown"
    vm = await alice.ok("POST", "/v1/vms", vm_body("waits"))
    shown = await settle(alice, vm, "unschedulable")
    assert "no host takes placements" in shown["reason"] and "unknown: silent" in shown["reason"], shown
    # Its agent comes up: the waiting VM is placed there.
    await commands.mark_host_up(SYSTEM, uuid.UUID(registered["id"]), 1, 3.0)
    await settle(alice, vm, "scheduled")
    # In maintenance: no new placements, the VM stays.
    done = await admin.ok("POST", f"/v1/hosts/{registered['id']}/maintenance", {"maintenance": True})
    assert (await hosts(admin, done["position"]))["silent"]["status"] == "maintenance"
    other = await alice.ok("POST", "/v1/vms", vm_body("second"))
    await settle(alice, other, "unschedulable")
    assert (await alice.ok("GET", f"/v1/vms/{vm['id']}"))["status"] == "scheduled"
    await admin.ok("POST", f"/v1/hosts/{registered['id']}/maintenance", {"maintenance": False})
    await settle(alice, other, "scheduled")


async def test_remove_is_refused_while_vms_are_on_the_host_naming_them(cloud: tuple[Api, Api, CommandService]) -> None:
    admin, alice, commands = cloud
    host = (await up_host(commands, "busy", 8, "16GB", "1TB")).result
    vm = await alice.ok("POST", "/v1/vms", vm_body("stays"))
    await settle(alice, vm, "scheduled")
    status, problem, _ = await admin.call("DELETE", f"/v1/hosts/{host}")
    assert status == 422 and vm["id"] in problem["detail"] and "busy" in problem["detail"], problem
    status, problem, _ = await alice.call("DELETE", f"/v1/hosts/{host}")
    assert status == 404
    status, problem, _ = await admin.call("DELETE", f"/v1/hosts/{uuid.uuid4()}")
    assert status == 404, problem
    status, problem, _ = await admin.call("DELETE", "/v1/hosts/not-a-uuid")
    assert status == 400, problem
    status, problem, _ = await admin.call("POST", f"/v1/hosts/{host}/maintenance", {"maintenance": "yes"})
    assert status == 400 and "maintenance" in str(problem), problem
    # Deleted, the VM frees the host, which can then go.
    await alice.ok("DELETE", f"/v1/vms/{vm['id']}")
    await commands.evict(SYSTEM, host, [uuid.UUID(vm["id"])], "test: no agent to report the deletion")
    for _ in range(100):
        status, problem, _ = await admin.call("DELETE", f"/v1/hosts/{host}")
        if status == 200:
            break
        await asyncio.sleep(0.05)
    assert status == 200, problem
    assert (await hosts(admin, problem["position"]))["busy"]["status"] == "removed"


async def test_evacuating_waits_for_the_agent_to_stop_the_guests_then_moves_the_vms(
        cloud: tuple[Api, Api, CommandService]) -> None:
    admin, alice, commands = cloud
    first = (await up_host(commands, "first", 8, "16GB", "1TB")).result
    vms = [await alice.ok("POST", "/v1/vms", vm_body(f"v{i}")) for i in range(3)]
    for vm in vms:
        await settle(alice, vm, "scheduled")
    # The only host: evacuating it would strand its VMs.
    status, problem, _ = await admin.call("POST", f"/v1/hosts/{first}/evacuate")
    assert status == 422 and "no other host" in problem["detail"], problem
    second = (await up_host(commands, "second", 8, "16GB", "1TB")).result
    asked = await admin.ok("POST", f"/v1/hosts/{first}/evacuate", status=202)
    listed = await hosts(admin, asked["position"])
    assert listed["first"]["status"] == "evacuating" and listed["first"]["vms"] == 3
    await asyncio.sleep(0.3)  # the scheduler does not move VMs off a live host by itself
    assert (await hosts(admin))["first"]["vms"] == 3
    # What the host's agent does once its guests are stopped (hostagent/agent.py, _evacuate):
    await commands.evict(SYSTEM, first, [uuid.UUID(vm["id"]) for vm in vms], "its host was evacuated",
                         evacuated=True)
    for vm in vms:
        for _ in range(200):
            shown = await alice.ok("GET", f"/v1/vms/{vm['id']}")
            if shown["host_id"] == str(second) and shown["status"] == "scheduled":
                break
            await asyncio.sleep(0.05)
        assert shown["host_id"] == str(second) and "evacuated" not in shown["status"], shown
    listed = await hosts(admin)
    assert listed["first"]["vms"] == 0 and listed["first"]["status"] == "maintenance"
