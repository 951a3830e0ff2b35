"""An unschedulable VM says, through the API, what it needs and the most any host has free."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from uuid import UUID

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import open_store
from tests.support.gateway import ADMIN, Api, user, vm_body
from ucloud.commands.unit_of_work import SYSTEM
from ucloud.gateway.app import COMMANDS, GatewayConfig, init_app
from ucloud.processes.scheduler import Scheduler


async def test_an_unschedulable_vm_shows_its_needs_and_the_largest_free_in_readable_units(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = await open_store("sqlite", tmp_path, request)
    app = init_app(GatewayConfig(store=store, read_timeout=5.0))
    try:
        async with TestClient(TestServer(app)) as client:
            admin, alice = Api(client, ADMIN), Api(client, user("alice"))
            host = await admin.ok("POST", "/v1/hosts", {"hostname": "vm", "cores": 8, "ram": "24GiB", "disk": "1TiB"})
            await app[COMMANDS].mark_host_up(SYSTEM, UUID(host["id"]), 1, 3.0)  # as its agent would
            scheduler = Scheduler(app[COMMANDS])
            task = asyncio.create_task(scheduler.run())
            try:
                fits = await alice.ok("POST", "/v1/vms", vm_body("fits", ram="2GiB"))
                huge = await alice.ok("POST", "/v1/vms", vm_body("huge", ram="500GiB"))
                status: dict[str, str] = {}
                for _ in range(200):
                    status = await alice.ok("GET", f"/v1/vms/{huge['id']}/status?position={huge['position']}")
                    if status["status"] != "requested":
                        break
                    await asyncio.sleep(0.05)
                assert status["status"] == "unschedulable", status
                assert ("needs 500 GiB RAM; the largest free is 22 GiB on host vm" in status["reason"]), status
                placed = await alice.ok("GET", f"/v1/vms/{fits['id']}?position={status['position']}")
                assert placed["status"] == "scheduled" and placed["reason"] == ""
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        await store.close()
