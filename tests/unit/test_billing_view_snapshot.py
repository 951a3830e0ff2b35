"""The billing read model survives a snapshot round trip (what a gateway restart reads)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import msgspec

from ucloud.domain import vm as vm_domain
from ucloud.domain.account import AccountConfigured, AccountCredited, Kind, Source
from ucloud.domain.catalogue import build_codec
from ucloud.domain.events import Event
from ucloud.domain.invoice import InvoiceIssued, InvoiceLine, PeriodClosed
from ucloud.domain.metering import PeriodPolicy
from ucloud.domain.order import OrderConfirmed, OrderQuoted
from ucloud.domain.pricing import PriceSet, Resource
from ucloud.eventstore.records import EventRecord
from ucloud.projections.billing import BillingState, BillingView

T0 = 1_800_000_000
HOST = uuid.UUID(int=1)


def _record(position: int, event: Event, t: int, stream: str = "s", version: int = 1) -> EventRecord:
    tag, schema, data = build_codec().encode(event)
    return EventRecord(id=uuid.uuid4(), type=tag, stream=stream, version=version, position=position,
                       time=datetime.fromtimestamp(t, UTC), data=data, schema=schema)


def test_a_snapshot_restores_usage_invoices_accounts_and_orders() -> None:
    vm_id, order_id = uuid.uuid4(), uuid.uuid4()
    at = datetime.fromtimestamp(T0, UTC)
    line = InvoiceLine(vm_id=vm_id, vm_name="web", resource="core", price_version=1, quantity_seconds=60, micros=1,
                       per="second", per_seconds=1, quantum=1, amount=60)
    events: list[Event] = [
        PriceSet(resource=Resource.CORE, micros=1, currency="CHF", per="second", per_seconds=1, effective_from=at),
        vm_domain.VmRequested(vm_id=vm_id, owner="alice", name="web", cores=1, ram=1 << 30, disk=1 << 30,
                              image="debian-12"),
        vm_domain.VmStarted(vm_id=vm_id, host_id=HOST),
        PeriodClosed(period_start=datetime.fromtimestamp(T0 - T0 % 3600, UTC),
                     period_end=datetime.fromtimestamp(T0 - T0 % 3600 + 3600, UTC)),
        InvoiceIssued(number=1, owner="alice", period_start=datetime.fromtimestamp(T0 - T0 % 3600, UTC),
                      period_end=datetime.fromtimestamp(T0 - T0 % 3600 + 3600, UTC), currency="CHF", lines=(line,),
                      total=60, reference="UC-000001-01"),
        AccountConfigured(owner="alice", kind=Kind.PREPAID),
        AccountCredited(owner="alice", micros=500, currency="CHF", source=Source.GRANT),
        OrderQuoted(order_id=order_id, owner="alice", name="db", cores=1, ram=1 << 30, disk=1 << 30, image="x"),
        OrderConfirmed(order_id=order_id),
    ]
    view = BillingView(PeriodPolicy(seconds=3600))
    for position, event in enumerate(events, 1):
        view.apply(_record(position, event, T0 + position), event)
    blob = msgspec.msgpack.decode(msgspec.msgpack.encode(view.dump()))
    assert isinstance(blob, bytes)  # schema 2: one msgpack blob
    plain = msgspec.msgpack.decode(msgspec.msgpack.encode(msgspec.to_builtins(
        msgspec.msgpack.decode(blob, type=BillingState))))  # schema 1: plain values
    for data in (blob, plain):
        restored = BillingView()
        restored.load(data)
        now = T0 + 5000
        assert restored.balance("alice", now) == view.balance("alice", now)
        assert restored.invoices == view.invoices and restored.invoiced == view.invoiced
        assert restored.usage("alice", now) == view.usage("alice", now)
        assert restored.orders == view.orders and [o.id for o in restored.confirmed_orders()] == [order_id]
        assert restored.meter.periods == view.meter.periods
        assert restored.meter.closed_until == view.meter.closed_until
