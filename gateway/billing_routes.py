"""HTTP API v1 for billing: prices, usage, invoices, balance, accounts, credit, coupons.

``setup_billing(app)`` adds the routes and the billing read model (its own
ProjectionRunner following the log in the background; queries accept ``?position=`` as
every query does and wait until the billing view reached it). Amounts in answers are
integer micro-units (``*_micros``) with the currency beside them, plus a display string.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID

import msgspec
from aiohttp import web

from ucloud.commands.billing import BillingCommands
from ucloud.commands.unit_of_work import SYSTEM, Actor
from ucloud.domain.account import (
    Kind,
    Source,
)
from ucloud.domain.catalogue import build_codec
from ucloud.domain.errors import InvalidValue, NotFound, Rejected
from ucloud.domain.invoice import InvoiceIssued, InvoiceLine
from ucloud.domain.limits import CEILING
from ucloud.domain.money import Money, format_micros
from ucloud.domain.names import NAME_MAX_LENGTH, NAME_PATTERN
from ucloud.domain.order import Order
from ucloud.domain.pricing import (
    PRICE_MAX_LENGTH,
    PRICE_PATTERN,
    PRICE_RULE,
    QUANTUM_NAME,
    Price,
    Resource,
)
from ucloud.domain.times import TIME_MAX_LENGTH, TIME_PATTERN, TIME_RULE, parse_time
from ucloud.domain.vm import RestartPolicy
from ucloud.projections.billing import BillingView, periods_from_environment
from ucloud.projections.runner import ProjectionRunner

from .billing_payments import (
    Amount,
    CardEvent,
    CardMethod,
    CouponCode,
    PayBody,
    PaymentMethod,
    PayOut,
    methods_from_environment,
)
from .inputs import check_patterns, check_value, text
from .keys import CONFIG, STORE, VM_CREATE_GUARD, actor_of
from .problems import PaymentRequired, PositionNotReached
from .routes import (
    BODY_LIMIT,
    CREATE_VM_BODY_LIMIT,
    POSITION_HEADER,
    SSH_KEYS_CEILING,
    USER_DATA_CEILING,
    Accepted,
    ApiDoc,
    Name,
    Param,
    UserName,
    VmCores,
    VmDisk,
    VmRam,
    _meta,
    answer,
    api_on,
    reach_position,
)

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

BILLING_VIEW = web.AppKey("billing_view", BillingView)
BILLING_RUNNER = web.AppKey("billing_runner", ProjectionRunner)
BILLING = web.AppKey("billing_commands", BillingCommands)
PAYMENT_METHODS: web.AppKey[dict[str, PaymentMethod]] = web.AppKey("payment_methods")

billing_routes = web.RouteTableDef()


api = api_on(billing_routes)


# -- bodies and answers ------------------------------------------------------------------------


PriceText = Annotated[str, text(PRICE_MAX_LENGTH, PRICE_PATTERN, "0.01 CHF/hour", PRICE_RULE)]
# A time as text with its pattern (msgspec's datetime would answer 400 for "2027-13-01T..."
# although it has the declared form): parse_time answers 422 for such.
TimeText = Annotated[str, text(TIME_MAX_LENGTH, TIME_PATTERN, "2099-01-01T00:00:00Z", TIME_RULE,
                               format="date-time")]
Reference = Annotated[str, text(200, r"^[ -~]{0,200}$", "UC-2027-000042", "at most 200 printable ASCII characters")]
InvoiceNumber = Annotated[int, msgspec.Meta(ge=1, le=CEILING)]


class SetPriceBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    resource: Resource
    amount: PriceText
    effective_from: TimeText | None = None  # default: now


class ConfigureAccountBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    kind: Kind


class CreditBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    amount: Amount
    source: Literal["grant", "bank-transfer"] = "grant"
    reference: Reference = ""


class CouponBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    code: CouponCode
    amount: Amount
    expires: TimeText


class RedeemBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    code: CouponCode


class OrderBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What a VM would be created with (POST /v1/vms, the same limits; networks are not
    ordered), to be quoted first."""

    name: Name
    cores: VmCores
    ram: VmRam
    disk: VmDisk
    image: Annotated[str, _meta(max_length=NAME_MAX_LENGTH, pattern=NAME_PATTERN, examples=["debian-12"])]
    ssh_keys: Annotated[list[Annotated[str, _meta(max_length=NAME_MAX_LENGTH, pattern=NAME_PATTERN)]],
                        _meta(max_length=SSH_KEYS_CEILING, limit="vm_ssh_keys")] = []
    restart_policy: RestartPolicy = RestartPolicy.ALWAYS
    owner: UserName | None = None
    user_data: Annotated[str, _meta(max_length=USER_DATA_CEILING, limit="vm_user_data", free_text=True,
                                    examples=["#!/bin/sh\necho hello > /tmp/hello\n"])] = ""


class PriceOut(msgspec.Struct, kw_only=True):
    version: int
    resource: str
    micros: int
    currency: str
    per: str
    quantum: str
    effective_from: datetime
    display: str  # "0.01 CHF per core per hour"


class PriceList(msgspec.Struct, kw_only=True):
    prices: list[PriceOut]
    current: dict[str, int]  # resource -> version in force now
    position: int


class LineOut(msgspec.Struct, kw_only=True):
    vm_id: UUID
    vm_name: str
    resource: str
    price_version: int
    quantity_seconds: int
    quantity: str  # "7200 core-seconds"
    rate: str
    amount_micros: int
    amount: str


class UsageOut(msgspec.Struct, kw_only=True):
    owner: str
    period_start: datetime
    period_end: datetime
    until: datetime
    currency: str
    lines: list[LineOut]
    total_micros: int
    total: str
    position: int


class InvoiceOut(msgspec.Struct, kw_only=True):
    number: int
    owner: str
    period_start: datetime
    period_end: datetime
    currency: str
    reference: str
    paid: bool
    left_to_pay_micros: int  # what the credits have not covered yet (oldest invoices are paid first)
    reminders: int  # dunning: reminders sent for it (0: none; it is not overdue or is paid)
    lines: list[LineOut]
    total_micros: int
    total: str


class InvoiceList(msgspec.Struct, kw_only=True):
    invoices: list[InvoiceOut]
    position: int


class BalanceOut(msgspec.Struct, kw_only=True):
    owner: str
    kind: str
    currency: str
    credited_micros: int
    invoiced_micros: int
    unbilled_micros: int
    balance_micros: int
    balance: str
    suspended: bool  # a prepaid account whose VMs were stopped at zero balance
    reason: str  # why VMs stopped or will stop; empty when all is well
    position: int


class Redeemed(msgspec.Struct, kw_only=True):
    position: int
    credited_micros: int
    credited: str


# strict=False: a JSON number with no fraction (2408.0) is an integer, as the schema says.
_DECODERS: dict[type, msgspec.json.Decoder[Any]] = {
    t: msgspec.json.Decoder(t, strict=False) for t in (SetPriceBody, ConfigureAccountBody, CreditBody, CouponBody,
                                                       RedeemBody, PayBody, OrderBody, CardEvent)}
T = TypeVar("T")


async def _body(request: web.Request, body_type: type[T]) -> T:
    raw = await request.read()
    if not raw.strip():
        raise InvalidValue("body", "the request needs a JSON object body")
    result: T = _DECODERS[body_type].decode(raw)
    check_patterns(result)
    return result


async def _reach(request: web.Request) -> int:
    """Wait until the billing view includes ?position= / X-Ucloud-Position (read your writes):
    the same rule as every query (routes.reach_position), over the billing view's runner."""
    return await reach_position(request, request.app[BILLING_RUNNER], "the billing view")


def _whose(actor: Actor, owner: str | None) -> str:
    if owner is None or owner == actor.name:
        return actor.name
    if not actor.is_admin:
        raise NotFound("only the admin realm may see another user's billing")
    return owner


def _admin(actor: Actor, what: str) -> None:
    if not actor.is_admin:
        raise NotFound(f"{what} is done in the admin realm")


def _price_out(price: Price) -> PriceOut:
    quantum = QUANTUM_NAME[price.resource]
    return PriceOut(version=price.version, resource=price.resource.value, micros=price.micros,
                    currency=price.currency, per=price.per, quantum=quantum,
                    effective_from=datetime.fromtimestamp(price.effective_from, UTC),
                    display=f"{format_micros(price.micros, price.currency)} per {quantum} per {price.per}")


_SECONDS_UNIT = {"core": "core-seconds", "ram": "GiB-seconds", "disk": "GiB-seconds", "network": "network-seconds",
                 "image-storage": "GiB-seconds"}


def _line_out(line: InvoiceLine, currency: str) -> LineOut:
    quantity = line.quantity_seconds / line.quantum  # display only; the amount is from integers
    return LineOut(
        vm_id=line.vm_id, vm_name=line.vm_name, resource=line.resource, price_version=line.price_version,
        quantity_seconds=line.quantity_seconds, quantity=f"{quantity:g} {_SECONDS_UNIT.get(line.resource, 's')}",
        rate=f"{format_micros(line.micros, currency)}/{line.per}", amount_micros=line.amount,
        amount=format_micros(line.amount, currency))


def _invoice_out(view: BillingView, invoice: InvoiceIssued) -> InvoiceOut:
    return InvoiceOut(number=invoice.number, owner=invoice.owner, period_start=invoice.period_start,
                      period_end=invoice.period_end, currency=invoice.currency, reference=invoice.reference,
                      paid=view.paid(invoice), left_to_pay_micros=view.left_to_pay(invoice),
                      reminders=view.reminder_level(invoice), lines=[_line_out(line, invoice.currency) for line in invoice.lines],
                      total_micros=invoice.total, total=format_micros(invoice.total, invoice.currency))


OWNER = Param.of("owner", "query", "Admins: this user's (default: your own). Others may name only themselves.",
                 UserName)
INVOICE_NUMBER = Param.of("number", "path", "The invoice's number.", InvoiceNumber)
ORDER_ID = Param.of("id", "path", "The order's id.", UUID)

# -- prices ------------------------------------------------------------------------------------


@api("GET", "/v1/prices", ApiDoc("List prices", "listPrices", "billing", response=PriceList,
                                 description="Every price version, oldest first, and which is in force now.",
                                 errors=(400, 503), reads=True))
async def list_prices(request: web.Request) -> web.Response:
    position = await _reach(request)
    view = request.app[BILLING_VIEW]
    now = int(time.time())
    prices = view.meter.schedule.all()
    current: dict[str, int] = {}
    for price in prices:
        if price.effective_from <= now:
            best = current.get(price.resource)
            if best is None or (price.effective_from, price.version) >= (
                    view.meter.schedule.price(best).effective_from, best):
                current[price.resource.value] = price.version
    return answer(PriceList(prices=[_price_out(p) for p in prices], current=current, position=position),
                  position=position)


@api("POST", "/v1/prices", ApiDoc(
    "Set a price (admin)", "setPrice", "billing", status=201, response=Accepted, body=SetPriceBody, max_body=BODY_LIMIT,
    description="A new price version for a resource (core, ram, disk, network, image-storage): amount as "
                "'0.01 CHF/hour' (second, minute, hour, day, month = 30 days), from effective_from (default now; "
                "never in the past). The first price fixes the currency. Outside the admin realm: 404.",
    errors=(400, 404, 409, 422, 503)))
async def set_price(request: web.Request) -> web.Response:
    body = await _body(request, SetPriceBody)
    effective_from = parse_time(body.effective_from, "effective_from") if body.effective_from is not None else None
    outcome = await request.app[BILLING].set_price(actor_of(request), body.resource.value, body.amount, effective_from)
    return answer(Accepted(position=outcome.position, status=f"version {outcome.result}"), 201, outcome.position)


# -- usage, invoices, balance ----------------------------------------------------------------------


@api("GET", "/v1/usage", ApiDoc(
    "Usage this period so far", "getUsage", "billing", response=UsageOut, params=(OWNER,),
    description="Line items per VM, resource and price version for the current billing period, counted up "
                "to now (a run shorter than 60 s counts 60 s).", errors=(400, 404, 503), reads=True))
async def get_usage(request: web.Request) -> web.Response:
    position = await _reach(request)
    owner = _whose(actor_of(request), request.query.get("owner"))
    view = request.app[BILLING_VIEW]
    now = int(time.time())
    start, end, lines = view.usage(owner, now)
    total = sum(line.amount for line in lines)
    currency = view.currency
    return answer(UsageOut(
        owner=owner, period_start=datetime.fromtimestamp(start, UTC), period_end=datetime.fromtimestamp(end, UTC),
        until=datetime.fromtimestamp(now, UTC), currency=currency, lines=[_line_out(li, currency) for li in lines],
        total_micros=total, total=format_micros(total, currency) if currency else "0", position=position),
        position=position)


@api("GET", "/v1/invoices", ApiDoc(
    "List invoices", "listInvoices", "billing", response=InvoiceList, params=(OWNER,),
    description="Your invoices, oldest first (admins: ?owner='s).", errors=(400, 404, 503), reads=True))
async def list_invoices(request: web.Request) -> web.Response:
    position = await _reach(request)
    owner = _whose(actor_of(request), request.query.get("owner"))
    view = request.app[BILLING_VIEW]
    invoices = [_invoice_out(view, i) for i in view.invoices_of(owner)]
    return answer(InvoiceList(invoices=invoices, position=position), position=position)


@api("GET", "/v1/invoices/{number}", ApiDoc(
    "Show an invoice", "getInvoice", "billing", response=InvoiceOut,
    params=(INVOICE_NUMBER, Param.of("format", "query", "json (default) or html", Literal["json", "html"])),
    description="One invoice with its lines; ?format=html (or Accept: text/html) renders it as a page.",
    errors=(400, 404, 503), reads=True))
async def get_invoice(request: web.Request) -> web.Response:
    raw = request.match_info["number"]  # checked by the input middleware: ASCII digits, 1 .. 2**63-1
    position = await _reach(request)
    view = request.app[BILLING_VIEW]
    invoice = view.invoices.get(int(raw))
    actor = actor_of(request)
    if invoice is None or (invoice.owner != actor.name and not actor.is_admin):
        raise NotFound(f"invoice {raw} does not exist")  # another user's invoice does not exist for you
    out = _invoice_out(view, invoice)
    wants = request.query.get("format", "")  # checked by the input middleware: json or html
    if wants == "html" or (not wants and "text/html" in request.headers.get("Accept", "")):
        return web.Response(text=render_html(out), content_type="text/html", headers={POSITION_HEADER: str(position)})
    return answer(out, position=position)


def render_html(invoice: InvoiceOut) -> str:
    e = html.escape
    rows = "\n".join(
        f"<tr><td>{e(li.vm_name)}</td><td>{e(li.resource)}</td><td>{e(li.quantity)}</td><td>{e(li.rate)}</td>"
        f"<td class=n>{e(li.amount)}</td></tr>" for li in invoice.lines)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Invoice {invoice.number}</title>
<style>body{{font-family:sans-serif;max-width:50em;margin:2em auto}}table{{border-collapse:collapse;width:100%}}
td,th{{border-bottom:1px solid #ccc;padding:.3em;text-align:left}}.n{{text-align:right}}</style></head>
<body><h1>Invoice {invoice.number}</h1>
<p>To: {e(invoice.owner)}<br>Period: {invoice.period_start:%Y-%m-%d %H:%M} – {invoice.period_end:%Y-%m-%d %H:%M} UTC<br>
Payment reference: <strong>{e(invoice.reference)}</strong><br>Status: {"paid" if invoice.paid else "open"}</p>
<table><thead><tr><th>VM</th><th>resource</th><th>usage</th><th>rate</th><th class=n>amount</th></tr></thead>
<tbody>
{rows}
</tbody><tfoot><tr><th colspan=4>Total</th><th class=n>{e(invoice.total)}</th></tr></tfoot></table>
</body></html>
"""


@api("GET", "/v1/balance", ApiDoc(
    "Account balance", "getBalance", "billing", response=BalanceOut, params=(OWNER,),
    description="Money in (credit, coupons, payments) minus invoices minus usage not yet invoiced, up to now.",
    errors=(400, 404, 503), reads=True))
async def get_balance(request: web.Request) -> web.Response:
    position = await _reach(request)
    owner = _whose(actor_of(request), request.query.get("owner"))
    balance = request.app[BILLING_VIEW].balance(owner, int(time.time()))
    return answer(BalanceOut(
        owner=owner, kind=balance.kind, currency=balance.currency, credited_micros=balance.credited,
        invoiced_micros=balance.invoiced, unbilled_micros=balance.unbilled, balance_micros=balance.balance,
        balance=format_micros(balance.balance, balance.currency) if balance.currency else "0",
        suspended=balance.suspended, reason=balance.reason, position=position), position=position)


# -- accounts, credit, coupons ------------------------------------------------------------------------


@api("PUT", "/v1/accounts/{owner}", ApiDoc(
    "Make an account prepaid or postpaid (admin)", "configureAccount", "billing", response=Accepted,
    body=ConfigureAccountBody, max_body=BODY_LIMIT, description="Accounts are postpaid until configured. Outside the admin realm: 404.",
    errors=(400, 404, 409, 503)))
async def configure_account(request: web.Request) -> web.Response:
    body = await _body(request, ConfigureAccountBody)
    outcome = await request.app[BILLING].configure_account(actor_of(request), request.match_info["owner"],
                                                           body.kind.value)
    return answer(Accepted(position=outcome.position), position=outcome.position)


@api("POST", "/v1/accounts/{owner}/credits", ApiDoc(
    "Credit an account (admin)", "creditAccount", "billing", status=201, response=Accepted, body=CreditBody, max_body=BODY_LIMIT,
    description="source grant: account credit an admin grants; source bank-transfer: a transfer received "
                "(reference: what the payer quoted, e.g. the invoice's). Outside the admin realm: 404.",
    errors=(400, 404, 409, 422, 503)))
async def credit_account(request: web.Request) -> web.Response:
    body = await _body(request, CreditBody)
    outcome = await request.app[BILLING].credit(actor_of(request), request.match_info["owner"], body.amount,
                                                Source(body.source), body.reference)
    return answer(Accepted(position=outcome.position), 201, outcome.position)


@api("POST", "/v1/coupons", ApiDoc(
    "Create a coupon (admin)", "createCoupon", "billing", status=201, response=Accepted, body=CouponBody, max_body=BODY_LIMIT,
    description="A code worth an amount, redeemable once until it expires. Outside the admin realm: 404.",
    errors=(400, 404, 409, 422, 503)))
async def create_coupon(request: web.Request) -> web.Response:
    body = await _body(request, CouponBody)
    outcome = await request.app[BILLING].create_coupon(actor_of(request), body.code, body.amount,
                                                       parse_time(body.expires, "expires"))
    return answer(Accepted(position=outcome.position), 201, outcome.position)


@api("POST", "/v1/coupons/redeem", ApiDoc(
    "Redeem a coupon", "redeemCoupon", "billing", response=Redeemed, body=RedeemBody, max_body=BODY_LIMIT,
    description="Credits the coupon's amount to your account, once: a coupon redeemed or expired is refused "
                "(422), an unknown one is 404.", errors=(400, 404, 409, 422, 503)))
async def redeem_coupon(request: web.Request) -> web.Response:
    body = await _body(request, RedeemBody)
    outcome = await request.app[BILLING].redeem_coupon(actor_of(request), body.code)
    money = outcome.result
    return answer(Redeemed(position=outcome.position, credited_micros=money.micros, credited=str(money)),
                  position=outcome.position)


# -- orders ------------------------------------------------------------------------------------------


class QuoteLineOut(msgspec.Struct, kw_only=True):
    resource: str
    quantity: int
    price_version: int
    per_hour_micros: int
    per_hour: str


class OrderOut(msgspec.Struct, kw_only=True):
    id: UUID
    owner: str
    status: str
    reason: str
    vm_id: UUID | None
    name: str
    currency: str
    per_hour_micros: int
    per_hour: str
    per_month: str  # 30 days
    lines: list[QuoteLineOut]
    position: int


def prepaid_hours() -> int:
    """UCLOUD_PREPAID_ORDER_HOURS (24 by default): a prepaid order needs a balance for this long."""
    raw = os.environ.get("UCLOUD_PREPAID_ORDER_HOURS", "24")
    if not raw.isdigit():
        raise ValueError(f"UCLOUD_PREPAID_ORDER_HOURS must be a whole number of hours, got {raw!r}")
    return int(raw)


def _order_out(order: Order, position: int) -> OrderOut:
    quote = order.quote
    currency = quote.currency

    def money(micros: int) -> str:
        return format_micros(micros, currency) if currency else "free"

    return OrderOut(
        id=order.id, owner=order.owner, status=order.status.value, reason=order.reason, vm_id=order.vm_id,
        name=quote.name, currency=currency, per_hour_micros=quote.per_hour, per_hour=money(quote.per_hour),
        per_month=money(quote.per_hour * 24 * 30), position=position,
        lines=[QuoteLineOut(resource=line.resource, quantity=line.quantity, price_version=line.price_version,
                            per_hour_micros=line.per_hour, per_hour=money(line.per_hour)) for line in quote.lines])


def _order_id(request: web.Request) -> UUID:
    # The input middleware checked the text form (ORDER_ID: format uuid) first.
    return UUID(check_value("id", ORDER_ID.schema, request.match_info["id"]))


@api("POST", "/v1/orders", ApiDoc(
    "Quote a VM (order)", "quoteOrder", "billing", status=201, response=OrderOut, body=OrderBody,
    description="What the VM would cost per hour and per month at the prices in force; confirm it to have it "
                "provisioned. Without prices, create VMs directly (POST /v1/vms). Sizes beyond this installation's "
                "limits: 422, as for a create.", errors=(400, 404, 409, 422, 503), max_body=CREATE_VM_BODY_LIMIT))
async def quote_order(request: web.Request) -> web.Response:
    body = await _body(request, OrderBody)
    outcome = await request.app[BILLING].quote_order(
        actor_of(request), name=body.name, cores=body.cores, ram=body.ram, disk=body.disk, image=body.image,
        ssh_keys=body.ssh_keys, restart_policy=body.restart_policy.value, owner=body.owner, user_data=body.user_data,
        limits=request.app[CONFIG].limits)
    return answer(_order_out(outcome.result, outcome.position), 201, outcome.position,
                  {"Location": f"/v1/orders/{outcome.result.id}"})


@api("POST", "/v1/orders/{id}/confirm", ApiDoc(
    "Confirm an order", "confirmOrder", "billing", response=OrderOut, params=(ORDER_ID,),
    errors=(400, 404, 409, 422, 503),
    description="confirmed: the ordering process creates the VM (status provisioned, vm_id) or cancels the "
                "order with the reason. A prepaid account needs a balance covering the first "
                "UCLOUD_PREPAID_ORDER_HOURS (24) hours, or the order is rejected (insufficient funds)."))
async def confirm_order(request: web.Request) -> web.Response:
    order_id = _order_id(request)
    await _reach(request)
    actor = actor_of(request)
    view = request.app[BILLING_VIEW]
    known = view.orders.get(order_id)
    owner = known[0].owner if known else actor.name
    balance = view.balance(owner, int(time.time()))
    outcome = await request.app[BILLING].confirm_order(
        actor, order_id, prepaid=balance.kind == "prepaid", available=balance.balance, hours=prepaid_hours())
    return answer(_order_out(outcome.result, outcome.position), position=outcome.position)


@api("GET", "/v1/orders/{id}", ApiDoc(
    "Show an order", "getOrder", "billing", response=OrderOut, params=(ORDER_ID,), errors=(400, 404, 503),
    reads=True))
async def get_order(request: web.Request) -> web.Response:
    order_id = _order_id(request)
    position = await _reach(request)
    known = request.app[BILLING_VIEW].orders.get(order_id)
    actor = actor_of(request)
    if known is None or (known[0].owner != actor.name and not actor.is_admin):
        raise NotFound(f"order {order_id} does not exist")
    return answer(_order_out(known[0], position), position=position)


# -- payments ----------------------------------------------------------------------------------------


@api("POST", "/v1/payments", ApiDoc(
    "Pay", "pay", "billing", response=PayOut, also=(202,), body=PayBody, max_body=BODY_LIMIT,
    description="method coupon {code}: credited at once (200). method bank-transfer {invoice}: how to pay "
                "that invoice (202; an admin records the receipt). method card {amount}: a payment intent at "
                "the card provider and where to confirm it (202); the provider's signed webhook credits the "
                "account. Another user's invoice is 404.", errors=(400, 404, 409, 422, 503)))
async def pay(request: web.Request) -> web.Response:
    body = await _body(request, PayBody)
    methods = request.app[PAYMENT_METHODS]
    method = methods.get(body.method)
    if method is None:  # a method of the API that this installation has not configured
        raise Rejected(f"method: {body.method!r} is not available here; use one of {', '.join(sorted(methods))}",
                       "method")
    await _reach(request)
    out = await method.pay(actor_of(request), body, request.app[BILLING_VIEW], request.app[BILLING])
    return answer(out, 200 if out.status == "credited" else 202, out.position or None)


# The test provider's scheme (billing_payments.CardMethod): t=<unix time>,v1=<HMAC-SHA256 hex>.
SIGNATURE = Param.of(CardMethod.signature_header, "header",
                     "t=<unix time>,v1=<hex HMAC-SHA256 of '<t>.<body>' with the shared secret>",
                     Annotated[str, msgspec.Meta(max_length=100, examples=[f"t=1790000000,v1={'0' * 64}"],
                                                 extra_json_schema={"pattern": r"^t=[0-9]{1,20},v1=[0-9a-f]{64}$"})],
                     required=True)


@api("POST", "/v1/payments/card/webhook", ApiDoc(
    "Card provider webhook", "cardWebhook", "billing", response=PayOut, auth=False, params=(SIGNATURE,),
    body=CardEvent, max_body=BODY_LIMIT,
    description="Called by the card provider. Its HMAC-SHA256 signature is checked (400 naming the header "
                "if missing, malformed, wrong or stale); a succeeded intent credits its owner once. 404 where "
                "card payments are not configured.", errors=(400, 404, 409, 503)))
async def card_webhook(request: web.Request) -> web.Response:
    event = await _body(request, CardEvent)  # its declared form first, as every body (400 naming the field)
    card = request.app[PAYMENT_METHODS].get(CardMethod.name)
    if not isinstance(card, CardMethod):
        raise NotFound("card payments are not configured here")
    card.verify(request.headers, await request.read())
    intent = event.intent
    if event.type != "payment_intent.succeeded" or intent is None or intent.status != "succeeded":
        return answer(PayOut(method=card.name, status="ignored"))
    amount, owner, intent_id = Money(intent.amount_micros, intent.currency), intent.metadata.owner, intent.id
    outcome = await request.app[BILLING].settle_card_payment(SYSTEM, card.provider, intent_id, owner, amount)
    return answer(PayOut(method=card.name, status="credited" if outcome.result else "already credited",
                         position=outcome.position, credited_micros=amount.micros if outcome.result else 0,
                         intent=intent_id), position=outcome.position)


# -- wiring -------------------------------------------------------------------------------------------


async def _follow(runner: ProjectionRunner) -> None:
    """Keep the billing view following the log, as app.ReadModelFollower does for the other
    views (not reused: app.py imports this module); an outage only delays it."""
    delay = 0.1
    while True:
        reached = runner.position
        try:
            await runner.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the billing view stopped following the log at %d; retrying", runner.position)
        delay = 0.1 if runner.position > reached else min(delay * 2, 5.0)
        await asyncio.sleep(delay)


async def prepaid_orders_first(request: web.Request, actor: Actor, owner: str) -> None:
    """POST /v1/vms for a prepaid account while prices are in force: 402, order it instead
    (an order checks the balance before anything runs). Postpaid accounts and admins
    create directly: their usage is invoiced afterwards."""
    if actor.is_admin:
        return
    view, runner = request.app[BILLING_VIEW], request.app[BILLING_RUNNER]
    # Prices and the account's kind as of this request, not as of the view's last poll.
    head = await request.app[STORE].head()
    if not await runner.wait_for(head, request.app[CONFIG].read_timeout):
        raise PositionNotReached(f"the billing view did not reach position {head} in time")
    now = int(time.time())
    if any(p.effective_from <= now for p in view.meter.schedule.all()) and view.balance(owner, now).kind == "prepaid":
        raise PaymentRequired(f"{owner}'s account is prepaid and VMs are priced: order the VM (POST /v1/orders, "
                              "or `ucloud vm create`, which does), so that the balance is checked first")


def setup_billing(app: web.Application) -> None:
    """Add the billing routes and the billing read model to a gateway application."""
    store = app[STORE]
    codec = build_codec()
    view = BillingView(periods_from_environment())
    app[BILLING_VIEW] = view
    app[BILLING_RUNNER] = ProjectionRunner(store, codec, [view], name="billing",
                                           snapshot_interval=app[CONFIG].snapshot_interval)
    app[BILLING] = BillingCommands(store, codec)
    app[PAYMENT_METHODS] = methods_from_environment()
    app[VM_CREATE_GUARD] = prepaid_orders_first
    app.add_routes(billing_routes)

    async def follow(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_follow(app[BILLING_RUNNER]), name="gateway-billing-view")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(follow)
