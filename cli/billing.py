"""Billing on the command line, over the HTTP API (docs/billing.md):

    ucloud price set RESOURCE AMOUNT/UNIT [--from TIME] | price list      (set: admin realm)
    ucloud usage [--owner U]                  this period so far
    ucloud bill list | bill show NUMBER [--html]
    ucloud balance [--owner U]
    ucloud pay --coupon CODE | --card AMOUNT | --invoice NUMBER
    ucloud account kind OWNER prepaid|postpaid | account credit OWNER AMOUNT [--transfer REF]
    ucloud coupon create CODE AMOUNT --expires TIME                        (admin realm)
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any
from urllib.parse import quote

import click
from rich.table import Table

from ucloud.cli.client import Client, Context, Failure
from ucloud.cli.main import UcloudGroup, console, emit_json, json_option, pass_context, table


def _lines_table(lines: list[dict[str, Any]]) -> Table:
    listing = table("VM", "RESOURCE", "USAGE", "RATE", "PRICE", "AMOUNT")
    for line in lines:
        listing.add_row(line["vm_name"] or str(line["vm_id"]), line["resource"], line["quantity"], line["rate"],
                        f"v{line['price_version']}", line["amount"])
    return listing


# -- ordering (used by `ucloud vm create`) --------------------------------------------------------


async def order_if_priced(client: Client, body: dict[str, Any], *, yes: bool, quiet: bool,
                          timeout: float = 120.0) -> dict[str, Any] | None:
    """When prices are set: quote the VM, show the price, confirm (asking unless ``yes``), and
    wait for the ordering process to provision it; the VM as ``POST /v1/vms`` would answer.
    None when nothing is priced (the VM is free and created directly)."""
    if not (await client.get("/v1/prices"))["prices"]:
        return None
    _, quoted = await client.request("POST", "/v1/orders", body)
    if not quiet:
        console().print(f"VM {quoted['name']}: {quoted['per_hour']} per hour ({quoted['per_month']} per 30 days "
                        "running), billed per second")
    if not yes and not click.confirm("order it?", default=False, err=True):
        raise Failure("not ordered", 1)
    _, order = await client.request("POST", f"/v1/orders/{quoted['id']}/confirm")
    deadline = time.monotonic() + timeout
    while order["status"] == "confirmed" and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        order = await client.get(f"/v1/orders/{quoted['id']}")
    if order["status"] != "provisioned":
        raise Failure(f"order {quoted['id']} {order['status']}: {order['reason'] or 'not provisioned in time'}")
    return {"id": order["vm_id"], "status": "requested", "order": order["id"]}


# -- prices ------------------------------------------------------------------------------------


@click.group(cls=UcloudGroup)
def price() -> None:
    """Prices per resource (core, ram, disk, network, image-storage)."""


@price.command("set")
@click.argument("resource")
@click.argument("amount", metavar="AMOUNT/UNIT")
@click.option("--from", "effective_from", metavar="TIME", help="When it applies (RFC 3339; default now).")
@json_option
@pass_context
def price_set(ctx: Context, resource: str, amount: str, effective_from: str | None, as_json: bool) -> None:
    """Set RESOURCE's price, e.g. `ucloud price set core 0.01CHF/hour` (per second, minute,
    hour, day or month = 30 days; RAM, disk and image storage per GiB)."""
    body: dict[str, Any] = {"resource": resource, "amount": amount}
    if effective_from:
        try:
            body["effective_from"] = datetime.fromisoformat(effective_from).isoformat()
        except ValueError:
            raise click.BadParameter(f"{effective_from!r} is not a time (RFC 3339)", param_hint="--from") from None

    async def work(client: Client) -> None:
        _, done = await client.request("POST", "/v1/prices", body)
        if as_json:
            emit_json(done)
        else:
            console().print(f"price of {resource} set to {amount} ({done.get('status', '')})")

    ctx.run(work)


@price.command("list")
@json_option
@pass_context
def price_list(ctx: Context, as_json: bool) -> None:
    """List every price version; * marks the ones in force now."""

    async def work(client: Client) -> None:
        data = await client.get("/v1/prices")
        if as_json:
            emit_json(data)
            return
        current = set(data["current"].values())
        listing = table("VERSION", "RESOURCE", "PRICE", "FROM", "NOW")
        for p in data["prices"]:
            listing.add_row(str(p["version"]), p["resource"], p["display"], p["effective_from"],
                            "*" if p["version"] in current else "")
        console().print(listing if data["prices"] else "no prices: everything is free")

    ctx.run(work)


# -- usage, bills, balance -------------------------------------------------------------------------


@click.command("usage")
@click.option("--owner", metavar="USER", help="Admins: this user's usage.")
@json_option
@pass_context
def usage(ctx: Context, owner: str | None, as_json: bool) -> None:
    """Your usage in this billing period so far, per VM, resource and price."""

    async def work(client: Client) -> None:
        data = await client.get("/v1/usage", {"owner": owner} if owner else None)
        if as_json:
            emit_json(data)
            return
        console().print(f"period {data['period_start']} to {data['period_end']}, until {data['until']}")
        if data["lines"]:
            console().print(_lines_table(data["lines"]))
        console().print(f"total so far: {data['total']}")

    ctx.run(work)


@click.group(cls=UcloudGroup)
def bill() -> None:
    """Your invoices."""


@bill.command("list")
@click.option("--owner", metavar="USER", help="Admins: this user's invoices.")
@json_option
@pass_context
def bill_list(ctx: Context, owner: str | None, as_json: bool) -> None:
    """List your invoices, oldest first."""

    async def work(client: Client) -> None:
        invoices = (await client.get("/v1/invoices", {"owner": owner} if owner else None))["invoices"]
        if as_json:
            emit_json(invoices)
            return
        listing = table("NUMBER", "PERIOD", "TOTAL", "STATUS", "REFERENCE")
        for i in invoices:
            listing.add_row(str(i["number"]), f"{i['period_start']} – {i['period_end']}", i["total"],
                            "paid" if i["paid"] else "open", i["reference"])
        console().print(listing if invoices else "no invoices")

    ctx.run(work)


@bill.command("show")
@click.argument("number")
@click.option("--html", "as_html", is_flag=True, help="Print the invoice as an HTML page.")
@json_option
@pass_context
def bill_show(ctx: Context, number: str, as_html: bool, as_json: bool) -> None:
    """Show invoice NUMBER with its lines."""
    if not number.isdigit():
        raise click.BadParameter(f"{number!r} is not an invoice number", param_hint="NUMBER")

    async def work(client: Client) -> None:
        if as_html:
            _, page = await client.request("GET", f"/v1/invoices/{number}", query={"format": "html"}, read=True)
            click.echo(page)
            return
        invoice = await client.get(f"/v1/invoices/{number}")
        if as_json:
            emit_json(invoice)
            return
        console().print(f"invoice {invoice['number']} for {invoice['owner']}, "
                        f"{invoice['period_start']} to {invoice['period_end']}")
        console().print(_lines_table(invoice["lines"]))
        console().print(f"total: {invoice['total']} ({'paid' if invoice['paid'] else 'open'}); "
                        f"payment reference {invoice['reference']}")

    ctx.run(work)


@click.command("balance")
@click.option("--owner", metavar="USER", help="Admins: this user's balance.")
@json_option
@pass_context
def balance(ctx: Context, owner: str | None, as_json: bool) -> None:
    """Money in, minus invoices, minus usage not invoiced yet."""

    async def work(client: Client) -> None:
        data = await client.get("/v1/balance", {"owner": owner} if owner else None)
        if as_json:
            emit_json(data)
        else:
            console().print(f"{data['owner']} ({data['kind']}): balance {data['balance']}")
            if data.get("reason"):
                console().print(data["reason"])

    ctx.run(work)


@click.command("pay")
@click.option("--coupon", metavar="CODE", help="Redeem a coupon code.")
@click.option("--card", "card", metavar="AMOUNT", help="Pay AMOUNT (e.g. '20 CHF') by card: prints where to confirm.")
@click.option("--invoice", type=int, metavar="NUMBER", help="Pay invoice NUMBER by bank transfer: prints how.")
@json_option
@pass_context
def pay(ctx: Context, coupon: str | None, card: str | None, invoice: int | None, as_json: bool) -> None:
    """Pay into your account: a coupon, a card, or a bank transfer for an invoice."""
    chosen = [name for name, value in (("coupon", coupon), ("card", card), ("invoice", invoice)) if value]
    if len(chosen) != 1:
        raise Failure("say how, once: --coupon CODE, --card AMOUNT or --invoice NUMBER", 2)
    if coupon:
        body: dict[str, Any] = {"method": "coupon", "code": coupon}
    elif card:
        body = {"method": "card", "amount": card}
    else:
        body = {"method": "bank-transfer", "invoice": invoice}

    async def work(client: Client) -> None:
        _, done = await client.request("POST", "/v1/payments", body)
        if as_json:
            emit_json(done)
        elif done["method"] == "coupon":
            console().print(f"coupon redeemed: {done['amount']} credited")
        elif done["method"] == "card":
            console().print(f"confirm the payment of {done['amount']} at {done['confirm_url']}")
        else:
            console().print(done["instructions"])

    ctx.run(work)


# -- admin: accounts and coupons ---------------------------------------------------------------------


@click.group(cls=UcloudGroup)
def account() -> None:
    """Accounts (admin realm): prepaid or postpaid, credit, bank transfers."""


@account.command("kind")
@click.argument("owner")
@click.argument("kind", type=click.Choice(["prepaid", "postpaid"]))
@pass_context
def account_kind(ctx: Context, owner: str, kind: str) -> None:
    """Make OWNER's account prepaid or postpaid."""

    async def work(client: Client) -> None:
        await client.request("PUT", f"/v1/accounts/{quote(owner, safe='')}", {"kind": kind})
        console().print(f"{owner}'s account is {kind}")

    ctx.run(work)


@account.command("credit")
@click.argument("owner")
@click.argument("amount")
@click.option("--transfer", "reference", metavar="REFERENCE",
              help="A bank transfer received, with the reference the payer quoted.")
@pass_context
def account_credit(ctx: Context, owner: str, amount: str, reference: str | None) -> None:
    """Grant OWNER credit of AMOUNT (e.g. '20 CHF'), or record a bank transfer."""
    body = {"amount": amount, "source": "bank-transfer" if reference else "grant", "reference": reference or ""}

    async def work(client: Client) -> None:
        await client.request("POST", f"/v1/accounts/{quote(owner, safe='')}/credits", body)
        console().print(f"{amount} credited to {owner}")

    ctx.run(work)


@click.group(cls=UcloudGroup)
def coupon() -> None:
    """Coupons (admin realm)."""


@coupon.command("create")
@click.argument("code")
@click.argument("amount")
@click.option("--expires", required=True, metavar="TIME", help="Until when it can be redeemed (RFC 3339).")
@pass_context
def coupon_create(ctx: Context, code: str, amount: str, expires: str) -> None:
    """Make a coupon CODE worth AMOUNT, redeemable once."""

    async def work(client: Client) -> None:
        await client.request("POST", "/v1/coupons", {"code": code, "amount": amount, "expires": expires})
        console().print(f"coupon created: {amount} until {expires}")

    ctx.run(work)


def register(main: click.Group) -> None:
    """Join the billing commands to the ucloud CLI."""
    for command in (price, usage, bill, balance, pay, account, coupon):
        main.add_command(command)
