"""Orders: with prices set, `ucloud vm create` shows the price and orders the VM (quoted →
confirmed → provisioned by the ordering process, or rejected / cancelled with the reason);
prepaid accounts need enough balance. A real served gateway, the real billing process
following the log on the gateway's loop, the CLI in this process."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tests.support.gateway import ServedGateway, served_gateway
from ucloud.cli.main import main
from ucloud.gateway.app import READ_MODELS
from ucloud.processes.billing import BillingProcess, BillingSettings
from ucloud.processes.framework import ProcessRunner


@pytest.fixture(scope="module")
def served() -> Iterator[ServedGateway]:
    with served_gateway() as gateway:
        process = BillingProcess(gateway.store, BillingSettings(tick=0.2))
        runner = ProcessRunner(process, gateway.store)  # no lease: the only instance
        running = asyncio.run_coroutine_threadsafe(runner.run(), gateway.loop)
        try:
            yield gateway
        finally:
            running.cancel()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served: ServedGateway) -> Path:
    for name in ("UCLOUD_API", "UCLOUD_USER", "UCLOUD_REALM", "UCLOUD_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("UCLOUD_API", served.url)
    return tmp_path


def ucloud(*args: str, user: str, input: str | None = None) -> Result:
    realm = ["--realm", "ucloud-admin"] if user == "root" else []
    return CliRunner().invoke(main, ["--user", user, *realm, *args], input=input, catch_exceptions=False)


def ok(*args: str, user: str, input: str | None = None) -> Result:
    result = ucloud(*args, user=user, input=input)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


def vms_of(served: ServedGateway, owner: str) -> list[Any]:
    async def read() -> list[Any]:
        return [row.vm for row in served.gateway.app[READ_MODELS].vms.owned_by(owner)]

    return served.run(read())


def test_a_priced_vm_is_quoted_confirmed_and_provisioned_and_refusals_say_why(home: Path, served: ServedGateway) -> None:
    alice, bob = f"a{uuid.uuid4().hex[:8]}", f"b{uuid.uuid4().hex[:8]}"
    ok("price", "set", "core", "0.036CHF/hour", user="root")  # 10 micros per core-second
    ok("price", "set", "disk", "0.72 CHF/month", user="root")

    # Asked, and declined: nothing ordered, no VM.
    declined = ucloud("vm", "create", "web", "--image", "debian-12", "--cores", "2", "--disk", "10GiB",
                      user=alice, input="n\n")
    assert declined.exit_code == 1 and "0.082 CHF per hour" in declined.stdout, (declined.stdout, declined.stderr)
    assert "not ordered" in declined.stderr
    assert vms_of(served, alice) == []

    # --yes: ordered at the quoted price and provisioned by the ordering process.
    created = json.loads(ok("vm", "create", "web", "--image", "debian-12", "--cores", "2", "--disk", "10GiB",
                            "--yes", "--json", user=alice).stdout)
    [vm] = vms_of(served, alice)
    assert str(vm.id) == created["id"] and vm.cores == 2 and vm.owner == alice
    shown = ok("vm", "create", "db", "--image", "debian-12", "--yes", user=alice).stdout
    assert "0.046 CHF per hour" in shown.splitlines()[0] and "VM db is requested" in shown  # 1 core + 10 GiB
    assert len(vms_of(served, alice)) == 2

    # Provisioning fails (no such SSH key): the order is cancelled with the reason.
    failed = ucloud("vm", "create", "x1", "--image", "debian-12", "--ssh-key", "nope", "--yes", user=alice)
    assert failed.exit_code == 1 and "cancelled" in failed.stderr and "no SSH key named 'nope'" in failed.stderr

    # Prepaid without enough balance: rejected with the reason; after a top-up it goes through.
    ok("account", "kind", bob, "prepaid", user="root")
    poor = ucloud("vm", "create", "app", "--image", "debian-12", "--yes", user=bob)
    assert poor.exit_code == 1 and "insufficient funds" in poor.stderr and "24 h" in poor.stderr
    assert vms_of(served, bob) == []
    ok("account", "credit", bob, "100 CHF", user="root")
    ok("vm", "create", "app", "--image", "debian-12", "--yes", user=bob)
    assert [vm.name for vm in vms_of(served, bob)] == ["app"]


def test_orders_are_private_and_ids_are_checked(home: Path, served: ServedGateway) -> None:
    import urllib.error
    import urllib.request

    def call(method: str, path: str, user: str, body: Any = None) -> tuple[int, Any]:
        request = urllib.request.Request(served.url + path, method=method, headers={
            "X-Ucloud-User": user, "Content-Type": "application/json"},
            data=json.dumps(body).encode() if body is not None else None)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    status, quoted = call("POST", "/v1/orders", "carol", {"name": "q", "cores": 1, "ram": "1GiB", "disk": "1GiB",
                                                           "image": "debian-12"})
    assert status == 201 and quoted["status"] == "quoted"
    assert call("GET", f"/v1/orders/{quoted['id']}", "mallory")[0] == 404
    assert call("POST", f"/v1/orders/{quoted['id']}/confirm", "mallory")[0] == 404
    status, problem = call("GET", "/v1/orders/not-a-uuid", "carol")
    assert status == 400 and problem["field"] == "id"
    status, problem = call("POST", "/v1/orders", "carol", {"name": "q", "cores": 1, "ram": "lots", "disk": "1GiB",
                                                            "image": "debian-12"})
    assert status == 400 and problem["field"] == "ram"
