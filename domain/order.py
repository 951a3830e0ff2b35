"""Orders: a priced request for a VM, quoted → confirmed → provisioned, or rejected.

    quoted ──confirm──► confirmed ──(ordering process: create the VM)──► provisioned
       │                    └──(the VM could not be created)──► cancelled (reason)
       └──confirm with too little prepaid balance──► rejected (reason)

A quote records the prices in force and what the VM costs per hour; confirming a prepaid
account's order needs a balance covering ``hours`` of it. Nothing is charged by an order:
usage is metered from the VM's lifecycle (domain/metering.py), so a cancelled order has
nothing to refund. Free things need no order: without prices ``vm create`` creates directly.
"""

from __future__ import annotations

import enum
from uuid import UUID

import msgspec

from .errors import NotFound, Rejected
from .events import Command, Event
from .money import div_round, format_micros
from .pricing import QUANTUM, Resource, Schedule


class OrderStatus(enum.StrEnum):
    QUOTED = "quoted"
    CONFIRMED = "confirmed"
    REJECTED = "rejected"
    PROVISIONED = "provisioned"
    CANCELLED = "cancelled"


class QuoteLine(msgspec.Struct, frozen=True, kw_only=True):
    resource: str
    quantity: int  # cores or bytes
    price_version: int
    per_hour: int  # micros


class OrderQuoted(Event, tag="order.quoted", frozen=True):
    """A user asked what a VM costs; the quote holds the prices in force and the spec."""

    order_id: UUID
    owner: str
    name: str
    cores: int
    ram: int
    disk: int
    image: str
    ssh_keys: tuple[str, ...] = ()
    restart_policy: str = "always"
    currency: str = ""
    per_hour: int = 0  # micros
    lines: tuple[QuoteLine, ...] = ()
    user_data: str = ""


class OrderConfirmed(Event, tag="order.confirmed", frozen=True):
    """The user confirmed the quote; the ordering process provisions it."""

    order_id: UUID


class OrderRejected(Event, tag="order.rejected", frozen=True):
    """The order cannot go ahead (insufficient prepaid balance); ``reason`` says why."""

    order_id: UUID
    reason: str


class OrderProvisioned(Event, tag="order.provisioned", frozen=True):
    """The ordering process created the VM."""

    order_id: UUID
    vm_id: UUID


class OrderCancelled(Event, tag="order.cancelled", frozen=True):
    """Provisioning failed (``reason``); nothing was charged, so nothing is refunded."""

    order_id: UUID
    reason: str


ORDER_EVENT_TYPES: tuple[type[Event], ...] = (OrderQuoted, OrderConfirmed, OrderRejected, OrderProvisioned,
                                              OrderCancelled)


class Order(msgspec.Struct, frozen=True, kw_only=True):
    id: UUID
    owner: str
    status: OrderStatus
    quote: OrderQuoted
    vm_id: UUID | None = None
    reason: str = ""


class ConfirmOrder(Command, tag="order.confirm", frozen=True):
    order_id: UUID
    prepaid: bool
    available: int  # micros the owner has (prepaid: balance now)
    hours: int  # a prepaid balance must cover this many hours of the order


def quote(schedule: Schedule, now: int, *, order_id: UUID, owner: str, name: str, cores: int, ram: int, disk: int,
          image: str, ssh_keys: tuple[str, ...], restart_policy: str, user_data: str = "") -> OrderQuoted:
    """What the VM costs per hour at the prices in force at ``now`` (running, with its disk)."""
    lines = []
    for resource, quantity in ((Resource.CORE, cores), (Resource.RAM, ram), (Resource.DISK, disk)):
        version = next((v for v, _, _ in schedule.segments(resource, now, now + 1)), 0)
        if not version:
            continue
        price = schedule.price(version)
        lines.append(QuoteLine(resource=resource.value, quantity=quantity, price_version=version,
                               per_hour=div_round(quantity * 3600 * price.micros, price.per_seconds * QUANTUM[resource])))
    return OrderQuoted(order_id=order_id, owner=owner, name=name, cores=cores, ram=ram, disk=disk, image=image,
                       ssh_keys=ssh_keys, restart_policy=restart_policy, currency=schedule.currency or "",
                       per_hour=sum(line.per_hour for line in lines), lines=tuple(lines), user_data=user_data)


def evolve(order: Order | None, event: Event) -> Order | None:
    match event:
        case OrderQuoted():
            return Order(id=event.order_id, owner=event.owner, status=OrderStatus.QUOTED, quote=event)
    if order is None:
        return None
    match event:
        case OrderConfirmed():
            return msgspec.structs.replace(order, status=OrderStatus.CONFIRMED)
        case OrderRejected():
            return msgspec.structs.replace(order, status=OrderStatus.REJECTED, reason=event.reason)
        case OrderProvisioned():
            return msgspec.structs.replace(order, status=OrderStatus.PROVISIONED, vm_id=event.vm_id)
        case OrderCancelled():
            return msgspec.structs.replace(order, status=OrderStatus.CANCELLED, reason=event.reason)
    return order


def decide_confirm(order: Order | None, command: ConfirmOrder) -> list[Event]:
    if order is None:
        raise NotFound(f"order {command.order_id} does not exist")
    if order.status is OrderStatus.CONFIRMED or order.status is OrderStatus.PROVISIONED:
        return []  # confirming twice is not an error
    if order.status is not OrderStatus.QUOTED:
        raise Rejected(f"order {order.id} is {order.status.value}{': ' + order.reason if order.reason else ''}")
    needed = order.quote.per_hour * command.hours
    if command.prepaid and command.available < needed:
        currency = order.quote.currency
        return [OrderRejected(order_id=order.id, reason=(
            f"insufficient funds: the prepaid balance is {format_micros(command.available, currency)}, this VM "
            f"needs {format_micros(needed, currency)} for its first {command.hours} h; top up and order again"))]
    return [OrderConfirmed(order_id=order.id)]


def decide_outcome(order: Order | None, vm_id: UUID | None, reason: str) -> list[Event]:
    """The ordering process's result: the VM it created, or why it could not."""
    if order is None or order.status is not OrderStatus.CONFIRMED:
        return []
    if vm_id is not None:
        return [OrderProvisioned(order_id=order.id, vm_id=vm_id)]
    return [OrderCancelled(order_id=order.id, reason=reason)]


def stream_name(order_id: UUID) -> str:
    return f"order-{order_id}"
