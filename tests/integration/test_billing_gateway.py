"""Billing through the real gateway and the real billing process on every backend:
prices, usage, invoices (numbered gap-free, re-derivable), balance, credit and coupons."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import BACKENDS, open_store
from tests.support.gateway import ADMIN, Api, drive_to_running, user
from ucloud.commands.unit_of_work import SYSTEM
from ucloud.domain import vm as vm_domain
from ucloud.domain.catalogue import build_codec
from ucloud.domain.invoice import InvoiceIssued
from ucloud.domain.metering import PeriodPolicy
from ucloud.eventstore.interface import EventStore
from ucloud.gateway.app import COMMANDS, GatewayConfig, init_app
from ucloud.processes.billing import BillingProcess, BillingSettings
from ucloud.projections.billing import BillingView
from ucloud.projections.runner import ProjectionRunner

PROBLEM = "application/problem+json"
HOUR = PeriodPolicy(seconds=3600)


@dataclass
class Gateway:
    app: web.Application
    client: TestClient[Any, Any]
    store: EventStore

    def as_(self, name: str) -> Api:
        return Api(self.client, user(name))

    @property
    def admin(self) -> Api:
        return Api(self.client, ADMIN)

    def process(self, chunk: int = 50, after: int | None = None) -> BillingProcess:
        """A billing process whose clock reads 10 s after the end of the hour holding ``after``
        (default: now): it closes that hour and those before it, no later one."""
        end = HOUR.bounds(int(time.time()) if after is None else after)[1]
        return BillingProcess(self.store, BillingSettings(periods=HOUR, close_delay=5, chunk=chunk),
                              clock=lambda: end + 10)


@pytest.fixture(params=BACKENDS)
async def gw(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gateway]:
    if request.param == "etcd":
        request.applymarker(pytest.mark.etcd)
    monkeypatch.setenv("UCLOUD_BILLING_PERIOD", "3600s")
    store = await open_store(request.param, tmp_path, request)
    app = init_app(GatewayConfig(store=store, read_timeout=5.0))
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield Gateway(app, client, store)
    finally:
        await client.close()
        await store.close()


def assert_problem(status: int, body: Any, expected: int, field: str | None = None, detail: str = "") -> None:
    assert status == expected, body
    assert body["status"] == expected and body["detail"], body
    assert detail in body["detail"], body
    if field is not None:
        assert body.get("field") == field, body


async def _run_vm(gw: Gateway, owner: str, name: str, cores: int = 2) -> tuple[uuid.UUID, uuid.UUID]:
    commands = gw.app[COMMANDS]
    created = await commands.create_vm(SYSTEM, name=name, cores=cores, ram="1GiB", disk="2GiB", image="debian-12",
                                       owner=owner)
    host = await drive_to_running(commands, created.result, hostname=f"host-{name}")
    return created.result, host


async def _times(store: EventStore, vm_id: uuid.UUID) -> dict[str, int]:
    """Each event type of a VM -> its record time in whole seconds (what the meter sees)."""
    return {r.type: int(r.time.timestamp()) for r in await store.read_stream(vm_domain.stream_name(vm_id))}


# -- prices -----------------------------------------------------------------------------------------


async def test_prices_are_set_by_admins_listed_by_everyone_and_bad_ones_name_the_field(gw: Gateway) -> None:
    done = await gw.admin.ok("POST", "/v1/prices", {"resource": "core", "amount": "0.01 CHF/hour"}, status=201)
    assert done["status"] == "version 1"
    await gw.admin.ok("POST", "/v1/prices", {"resource": "ram", "amount": "0.000002 CHF/second"}, status=201)
    listing = await gw.as_("alice").ok("GET", f"/v1/prices?position={done['position'] + 1}")
    assert [(p["resource"], p["micros"], p["per"], p["quantum"]) for p in listing["prices"]] == [
        ("core", 10_000, "hour", "core"), ("ram", 2, "second", "GiB")]
    assert listing["current"] == {"core": 1, "ram": 2}
    assert listing["prices"][0]["display"] == "0.01 CHF per core per hour"

    # Malformed (400: outside the declared schema) or well-formed but not acceptable here
    # (422: another currency, a time in the past or that names no real moment).
    cases = [
        ({"resource": "core", "amount": "-1 CHF/hour"}, 400, "amount", "negative"),
        ({"resource": "core", "amount": "1 CHF"}, 400, "amount", "AMOUNT/UNIT"),
        ({"resource": "gpu", "amount": "1 CHF/hour"}, 400, "resource", "enum"),
        ({"resource": "disk", "amount": "1 CHF/month", "effective_from": "2027-01-01T00:00:00"}, 400,
         "effective_from", "time zone"),
        ({"resource": "disk", "amount": "1 EUR/month"}, 422, "amount", "does not match"),
        ({"resource": "disk", "amount": "1 CHF/month", "effective_from": "2001-01-01T00:00:00Z"}, 422,
         "effective_from", "past"),
        ({"resource": "disk", "amount": "1 CHF/month", "effective_from": "2027-02-30T00:00:00Z"}, 422,
         "effective_from", "not a real moment"),
        ({"resource": "disk", "amount": "1 CHF/month", "colour": "red"}, 400, None, "colour"),
    ]
    for body, expected, field, detail in cases:
        status, problem, response = await gw.admin.call("POST", "/v1/prices", body)
        assert response.content_type == PROBLEM
        assert_problem(status, problem, expected, field, detail)
    status, problem, _ = await gw.as_("alice").call("POST", "/v1/prices", {"resource": "core", "amount": "0 CHF/h"})
    assert_problem(status, problem, 404)
    after = await gw.admin.ok("GET", "/v1/prices")
    assert len(after["prices"]) == 2  # nothing half-written


# -- metering, invoices, balance ----------------------------------------------------------------------


async def test_a_stopped_vm_is_invoiced_price_times_seconds_numbered_and_re_derivable(gw: Gateway) -> None:
    await gw.admin.ok("POST", "/v1/prices", {"resource": "core", "amount": "0.36 CHF/hour"}, status=201)  # 100 µ/s
    await gw.admin.ok("POST", "/v1/prices", {"resource": "disk", "amount": "3.6 CHF/hour"}, status=201)
    commands = gw.app[COMMANDS]
    alice_vm, host = await _run_vm(gw, "alice", "web", cores=2)
    bob_vm, _ = await _run_vm(gw, "bob", "db", cores=1)

    # Usage so far: the running VM counts at least 60 s.
    usage = await gw.as_("alice").ok("GET", "/v1/usage")
    [core] = [line for line in usage["lines"] if line["resource"] == "core"]
    left = (datetime.fromisoformat(usage["period_end"]) - datetime.fromisoformat(usage["until"])).total_seconds()
    assert core["quantity_seconds"] >= 2 * min(60, left) and core["vm_name"] == "web"  # the minimum may cross the hour

    await asyncio.sleep(1.2)
    await commands.report(SYSTEM, vm_domain.ReportStopped(vm_id=alice_vm, host_id=host))
    await commands.vm_command(SYSTEM, vm_domain.DeleteVm(vm_id=alice_vm))
    deleted = await commands.report(SYSTEM, vm_domain.ReportDeleted(vm_id=alice_vm, host_id=host))
    times = await _times(gw.store, alice_vm)

    # Close the hour (the process's clock runs two hours ahead) and issue invoices.
    # (every hour the run touched, its 60 s minimum included, is closed)
    await gw.process(after=max(times["vm.stopped"], times["vm.started"] + 60)).run_until_idle()
    head = await gw.store.head()
    assert head > deleted.position
    invoices = (await gw.as_("alice").ok("GET", f"/v1/invoices?position={head}"))["invoices"]
    # One invoice, or two if the wall clock crossed the hour while the VM ran: the sums hold either way.
    assert 1 <= len(invoices) <= 2
    invoice = invoices[-1]
    run_seconds = max(times["vm.stopped"], times["vm.started"] + 60) - times["vm.started"]
    disk_seconds = times["vm.deleted"] - times["vm.requested"]
    lines: dict[str, dict[str, int]] = {}
    for each in invoices:
        for line in each["lines"]:
            summed = lines.setdefault(line["resource"], {"quantity_seconds": 0, "amount_micros": 0})
            summed["quantity_seconds"] += line["quantity_seconds"]
            summed["amount_micros"] += line["amount_micros"]
        assert each["total_micros"] == sum(line["amount_micros"] for line in each["lines"])
        assert each["reference"].startswith(f"UC-{each['number']:06d}-")
    assert lines["core"]["quantity_seconds"] == 2 * run_seconds
    assert lines["core"]["amount_micros"] == 2 * run_seconds * 100  # price x seconds, to the micro-unit
    assert lines["disk"]["quantity_seconds"] == 2 * (1 << 30) * disk_seconds
    assert lines["disk"]["amount_micros"] == 2 * disk_seconds * 1000
    assert set(lines) == {"core", "disk"}  # RAM is unpriced: free

    # Numbers are gap-free across owners; bob's still-running VM is cut at the hour.
    everyone = (await gw.admin.ok("GET", f"/v1/invoices?owner=bob&position={head}"))["invoices"]
    numbers = sorted([*(i["number"] for i in invoices), *(i["number"] for i in everyone)])
    assert numbers == list(range(1, len(numbers) + 1)) and everyone

    # Another user does not see alice's invoice; the HTML rendering has the lines.
    status, _, _ = await gw.as_("bob").call("GET", f"/v1/invoices/{invoice['number']}")
    assert status == 404
    status, page, response = await gw.as_("alice").call("GET", f"/v1/invoices/{invoice['number']}?format=html")
    assert status == 200 and response.content_type == "text/html"
    assert f"Invoice {invoice['number']}" in page and invoice["lines"][0]["amount"] in page and "web" in page

    # Re-derivable: a fresh fold of the whole log, in another view, gives the recorded lines.
    fresh = BillingView(HOUR)
    await ProjectionRunner(gw.store, build_codec(), [fresh], name="check").catch_up()
    for recorded in fresh.invoices.values():
        assert tuple(fresh.meter.lines(recorded.owner, int(recorded.period_start.timestamp()))) == recorded.lines

    # Balance: a grant minus what was invoiced; a postpaid account may go below zero.
    granted = await gw.admin.ok("POST", "/v1/accounts/alice/credits", {"amount": "1 CHF"}, status=201)
    balance = await gw.as_("alice").ok("GET", f"/v1/balance?position={granted['position']}")
    assert balance["credited_micros"] == 1_000_000
    invoiced = sum(each["total_micros"] for each in invoices)
    assert balance["invoiced_micros"] == invoiced
    assert balance["balance_micros"] == 1_000_000 - invoiced - balance["unbilled_micros"]
    assert balance["kind"] == "postpaid"


async def test_two_billing_processes_issue_each_invoice_once_with_gap_free_numbers(gw: Gateway) -> None:
    await gw.admin.ok("POST", "/v1/prices", {"resource": "core", "amount": "1 CHF/hour"}, status=201)
    for index in range(7):
        await _run_vm(gw, f"user{index}", f"vm{index}")
    first, second = gw.process(chunk=3), gw.process(chunk=3)
    await asyncio.gather(first.run_until_idle(), second.run_until_idle())
    await first.run_until_idle()
    codec = build_codec()
    invoices = [codec.decode(r.type, r.schema, r.data) for r in await gw.store.read_stream("invoices")]
    assert all(isinstance(i, InvoiceIssued) for i in invoices)
    issued = [i for i in invoices if isinstance(i, InvoiceIssued)]
    assert [i.number for i in issued] == list(range(1, len(issued) + 1))  # gap-free
    periods = await gw.store.read_stream("billing-periods")
    # Each owner once per closed hour (two hours only if the clock turned while the VMs started).
    assert len({(i.owner, i.period_start) for i in issued}) == len(issued) == 7 * len(periods)
    assert {i.owner for i in issued} == {f"user{i}" for i in range(7)}


# -- accounts, credit, coupons ---------------------------------------------------------------------


async def test_coupons_credit_once_and_refuse_reuse_expiry_and_bad_input(gw: Gateway) -> None:
    await gw.admin.ok("POST", "/v1/prices", {"resource": "core", "amount": "1 CHF/hour"}, status=201)
    expires = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    await gw.admin.ok("POST", "/v1/coupons", {"code": "WELCOME-2027", "amount": "5 CHF", "expires": expires}, status=201)
    redeemed = await gw.as_("alice").ok("POST", "/v1/coupons/redeem", {"code": "WELCOME-2027"})
    assert redeemed["credited_micros"] == 5_000_000 and redeemed["credited"] == "5.00 CHF"
    status, problem, _ = await gw.as_("bob").call("POST", "/v1/coupons/redeem", {"code": "WELCOME-2027"})
    assert_problem(status, problem, 422, detail="redeemed already")
    status, problem, _ = await gw.as_("bob").call("POST", "/v1/coupons/redeem", {"code": "NO-SUCH-CODE"})
    assert_problem(status, problem, 404)
    status, problem, _ = await gw.admin.call("POST", "/v1/coupons", {"code": "EUROS-123", "amount": "5 EUR",
                                                                     "expires": expires})
    assert_problem(status, problem, 422, "amount")  # well-formed, not this installation's currency
    status, problem, _ = await gw.admin.call("POST", "/v1/coupons", {"code": "OLD-CODE", "amount": "5 CHF",
                                                                     "expires": "2001-01-01T00:00:00Z"})
    assert_problem(status, problem, 422, "expires")
    status, problem, _ = await gw.admin.call("POST", "/v1/coupons", {"code": "x", "amount": "5 CHF",
                                                                     "expires": expires})
    assert_problem(status, problem, 400, "code")
    status, problem, _ = await gw.as_("alice").call("POST", "/v1/coupons", {"code": "MINE-123", "amount": "5 CHF",
                                                                            "expires": expires})
    assert_problem(status, problem, 404)
    balance = await gw.as_("alice").ok("GET", f"/v1/balance?position={redeemed['position']}")
    assert balance["credited_micros"] == 5_000_000
    assert (await gw.as_("bob").ok("GET", "/v1/balance"))["credited_micros"] == 0


async def test_credit_and_account_kind_are_admin_only_and_checked(gw: Gateway) -> None:
    await gw.admin.ok("POST", "/v1/prices", {"resource": "core", "amount": "1 CHF/hour"}, status=201)
    status, problem, _ = await gw.as_("alice").call("POST", "/v1/accounts/alice/credits", {"amount": "100 CHF"})
    assert_problem(status, problem, 404)
    for body, expected, field in (({"amount": "0 CHF"}, 422, "amount"), ({"amount": "-5 CHF"}, 400, "amount"),
                                  ({"amount": "5 EUR"}, 422, "amount"),
                                  ({"amount": "5 CHF", "source": "gift"}, 400, "source"),
                                  ({"amount": "5 CHF", "reference": "UC\n1"}, 400, "reference")):
        status, problem, _ = await gw.admin.call("POST", "/v1/accounts/alice/credits", body)
        assert_problem(status, problem, expected, field)
    status, problem, _ = await gw.admin.call("PUT", "/v1/accounts/alice", {"kind": "free"})
    assert_problem(status, problem, 400, "kind")
    done = await gw.admin.ok("PUT", "/v1/accounts/alice", {"kind": "prepaid"})
    await gw.admin.ok("POST", "/v1/accounts/alice/credits",
                      {"amount": "20 CHF", "source": "bank-transfer", "reference": "UC-000001-01"}, status=201)
    balance = await gw.as_("alice").ok("GET", f"/v1/balance?position={done['position'] + 1}")
    assert (balance["kind"], balance["credited_micros"]) == ("prepaid", 20_000_000)
    status, problem, _ = await gw.as_("bob").call("GET", "/v1/balance?owner=alice")
    assert_problem(status, problem, 404)


async def test_a_prepaid_account_orders_priced_vms_instead_of_creating_them_directly(gw: Gateway) -> None:
    vm = {"name": "direct", "cores": 1, "ram": "256MiB", "disk": "1GiB", "image": "tiny"}
    await gw.as_("alice").ok("POST", "/v1/vms", vm, status=202)  # no prices: free, no order step
    await gw.admin.ok("PUT", "/v1/accounts/alice", {"kind": "prepaid"})
    await gw.as_("alice").ok("POST", "/v1/vms", {**vm, "name": "direct2"}, status=202)  # still no prices
    await gw.admin.ok("POST", "/v1/prices", {"resource": "core", "amount": "1 CHF/hour"}, status=201)
    status, problem, response = await gw.as_("alice").call("POST", "/v1/vms", {**vm, "name": "direct3"})
    assert_problem(status, problem, 402, detail="order the VM (POST /v1/orders")
    assert response.content_type == PROBLEM
    quoted = await gw.as_("alice").ok("POST", "/v1/orders", {**vm, "name": "ordered"}, status=201)
    assert quoted["status"] == "quoted"
    # Postpaid accounts are invoiced afterwards; admins act as operators: both create directly.
    await gw.as_("bob").ok("POST", "/v1/vms", {**vm, "name": "bobs"}, status=202)
    done = await gw.admin.ok("POST", "/v1/vms", {**vm, "name": "for-alice", "owner": "alice"}, status=202)
    names = {row["name"] for row in (await gw.admin.ok("GET", f"/v1/vms?owner=alice&position={done['position']}"))["vms"]}
    assert names == {"direct", "direct2", "for-alice"}  # the refused one was not half-written
