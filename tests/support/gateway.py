"""A real gateway for tests: in-process through aiohttp's TestClient, or served on a
free loopback port from a background thread with its own event loop (for the CLI)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from tests.support.hosts import up_host
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import SYSTEM
from ucloud.domain import vm as vm_domain
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.memory import MemoryEventStore
from ucloud.gateway.app import COMMANDS, GatewayConfig, RunningGateway, start

T = TypeVar("T")
ADMIN = {"X-Ucloud-User": "root", "X-Ucloud-Realm": "ucloud-admin"}
PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICvYBsl/DgCvGh/DMo+nY6kmlyPI24+sT5OvcdsYbW6Q alice@laptop"
OTHER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIG2N9j80sbaY1nmljEToRcN55XktyW4TR4LTP2exYzp bob@desk"


def user(name: str, realm: str | None = None) -> dict[str, str]:
    headers = {"X-Ucloud-User": name}
    if realm is not None:
        headers["X-Ucloud-Realm"] = realm
    return headers


@dataclass
class Api:
    """Calls one gateway as one user; answers (status, decoded JSON or text, response)."""

    client: TestClient[Any, Any]
    headers: Mapping[str, str]

    async def call(self, method: str, path: str, json: Any = None, headers: Mapping[str, str] | None = None,
                   data: bytes | None = None) -> tuple[int, Any, ClientResponse]:
        merged = {**self.headers, **(headers or {})}
        response = await self.client.request(method, path, json=json, data=data, headers=merged)
        if response.content_type.endswith("json"):
            body: Any = await response.json(content_type=None)
        else:
            body = await response.text()
        return response.status, body, response

    async def ok(self, method: str, path: str, json: Any = None, status: int | None = None,
                 headers: Mapping[str, str] | None = None) -> Any:
        got, body, _ = await self.call(method, path, json, headers)
        assert got < 300 if status is None else got == status, (got, body)
        return body


def vm_body(name: str = "web1", **overrides: Any) -> dict[str, Any]:
    return {"name": name, "cores": 2, "ram": "2GB", "disk": "10GB", "image": "debian-12", **overrides}


async def drive_to_running(commands: CommandService, vm_id: UUID, hostname: str = "host1") -> UUID:
    """Do what the scheduler and a host agent would: register a host, place, report started."""
    host = await up_host(commands, hostname, 64, "256GiB", "10TiB")
    await commands.place_vm(SYSTEM, vm_id, host.result)
    await commands.report(SYSTEM, vm_domain.ReportStarted(vm_id=vm_id, host_id=host.result, accelerator="tcg"))
    return host.result


@dataclass
class ServedGateway:
    """A gateway served on a loopback port from its own thread and event loop."""

    url: str
    loop: asyncio.AbstractEventLoop
    gateway: RunningGateway
    store: EventStore

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the gateway's loop (the store belongs to that loop)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def commands(self) -> CommandService:
        return self.gateway.app[COMMANDS]


@contextmanager
def served_gateway(store_factory: Any = MemoryEventStore, **config: Any) -> Iterator[ServedGateway]:
    """``config``: further GatewayConfig fields (files_root, ...)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-gateway", daemon=True)
    thread.start()

    async def open_gateway() -> tuple[RunningGateway, EventStore]:
        store = store_factory()
        gateway = await start(GatewayConfig(store=store, listen=("127.0.0.1",), port=0, **config))
        return gateway, store

    gateway, store = asyncio.run_coroutine_threadsafe(open_gateway(), loop).result(30)
    served = ServedGateway(gateway.url, loop, gateway, store)
    try:
        yield served
    finally:
        async def close() -> None:
            await gateway.stop()
            await store.close()

        asyncio.run_coroutine_threadsafe(close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@contextmanager
def gateway_process(root: Path, *args: str) -> Iterator[str]:
    """`ucloud gateway --insecure-header-auth` as a process of its own on a SQLite log under
    ``root``, on a free loopback port; yields its base URL."""
    from tests.support.slapd import free_port

    port = free_port()
    log_path = root / "gateway.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "ucloud"), "gateway", "--store", f"sqlite://{root / 'events.sqlite'}",
             "--state-dir", str(root / "state"), "--listen", "127.0.0.1", "--port", str(port),
             "--insecure-header-auth", *args], stdout=log, stderr=log, start_new_session=True)
    api = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{api}/healthz", timeout=1):
                    break
            except OSError:
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        yield api
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
