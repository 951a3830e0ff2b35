"""`ucloud network create|list|show|delete` and `ucloud vm attach-network|detach-network`."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import click
from rich.table import Table

from ucloud.cli.client import Client, Context, Failure
from ucloud.cli.main import UcloudGroup, console, emit_json, json_option, pass_context, table


@click.group(cls=UcloudGroup)
def network() -> None:
    """Layer-2 networks (VXLAN over IPv6 multicast), with or without a /64."""


def show_network(found: dict[str, Any]) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    rows = [("name", found["name"]), ("id", found["id"]), ("owner", found["owner"]), ("ipam", found["ipam"]),
            ("status", found["status"]), ("vni", str(found["vni"] or "-")), ("group", found["group"] or "-"),
            ("prefix", found["prefix"] or "-"), ("router", found["router"] or "-"),
            ("vms", ", ".join(found["vms"]) or "-")]
    if found["reason"]:
        rows.append(("reason", found["reason"]))
    for key, value in rows:
        grid.add_row(key, value)
    console().print(grid)


async def settled(client: Client, name: str, timeout: float, query: dict[str, str]) -> dict[str, Any]:
    """The network once the IPAM allocator decided (ready or failed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found: dict[str, Any] = await client.get(f"/v1/networks/{quote(name, safe='')}", query)
        if found["status"] != "requested":
            return found
        if loop.time() > deadline:
            raise Failure(f"network {name} still waits for the IPAM allocator after {timeout:g}s "
                          "(is `ucloud processes` or `ucloud up` running?)", 4)
        await asyncio.sleep(0.2)


@network.command("create")
@click.argument("name")
@click.option("--ipam", type=click.Choice(["none", "manual", "auto"]), default="auto", show_default=True,
              help="none: layer 2 only; manual: a /64, no router advertisements; auto: a /64 and router "
                   "advertisements (SLAAC).")
@click.option("--owner", metavar="USER", help="Admins: create it for this user.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Give up waiting for its VNI and /64 after this many seconds (exit 4).")
@json_option
@pass_context
def network_create(ctx: Context, name: str, ipam: str, owner: str | None, timeout: float, as_json: bool) -> None:
    """Create a network and show its VNI, multicast group and /64."""
    body: dict[str, Any] = {"name": name, "ipam": ipam}
    if owner:
        body["owner"] = owner

    async def work(client: Client) -> None:
        await client.request("POST", "/v1/networks", body)
        found = await settled(client, name, timeout, {"owner": owner} if owner else {})
        if as_json:
            emit_json(found)
        else:
            show_network(found)
        if found["status"] == "failed":
            raise Failure(f"network {name} failed: {found['reason']}")

    ctx.run(work)


@network.command("list")
@click.option("--owner", metavar="USER", help="Admins: only this user's networks.")
@json_option
@pass_context
def network_list(ctx: Context, owner: str | None, as_json: bool) -> None:
    """List your networks."""

    async def work(client: Client) -> None:
        networks = (await client.get("/v1/networks", {"owner": owner} if owner else {}))["networks"]
        if as_json:
            emit_json(networks)
            return
        listing = table("NAME", "IPAM", "STATUS", "VNI", "PREFIX", "VMS", "OWNER")
        for n in networks:
            listing.add_row(n["name"], n["ipam"], n["status"], str(n["vni"] or "-"), n["prefix"] or "-",
                            str(len(n["vms"])), n["owner"])
        console().print(listing if networks else "no networks")

    ctx.run(work)


@network.command("show")
@click.argument("name")
@click.option("--owner", metavar="USER", help="Admins: the network's owner.")
@json_option
@pass_context
def network_show(ctx: Context, name: str, owner: str | None, as_json: bool) -> None:
    """Show a network."""

    async def work(client: Client) -> None:
        found = await client.get(f"/v1/networks/{quote(name, safe='')}", {"owner": owner} if owner else {})
        if as_json:
            emit_json(found)
        else:
            show_network(found)

    ctx.run(work)


@network.command("delete")
@click.argument("name")
@click.option("--owner", metavar="USER", help="Admins: the network's owner.")
@json_option
@pass_context
def network_delete(ctx: Context, name: str, owner: str | None, as_json: bool) -> None:
    """Delete a network (refused while VMs are attached)."""

    async def work(client: Client) -> None:
        _, done = await client.request("DELETE", f"/v1/networks/{quote(name, safe='')}",
                                       query={"owner": owner} if owner else {})
        if as_json:
            emit_json(done)
        else:
            console().print(f"network {name} deleted")

    ctx.run(work)


@click.command("attach-network")
@click.argument("vm_ref", metavar="VM")
@click.argument("name", metavar="NETWORK")
@json_option
@pass_context
def attach_network(ctx: Context, vm_ref: str, name: str, as_json: bool) -> None:
    """Give VM a NIC on NETWORK (hot-plugged if it runs)."""

    async def work(client: Client) -> None:
        vm_id = await client.resolve_vm(vm_ref)
        _, accepted = await client.request("POST", f"/v1/vms/{vm_id}/networks", {"network": name})
        if as_json:
            emit_json(accepted)
        else:
            console().print(f"VM {vm_id}: NIC {accepted['id']} on network {name} added")

    ctx.run(work)


@click.command("detach-network")
@click.argument("vm_ref", metavar="VM")
@click.argument("name", metavar="NETWORK")
@json_option
@pass_context
def detach_network(ctx: Context, vm_ref: str, name: str, as_json: bool) -> None:
    """Remove VM's NIC on NETWORK (hot-unplugged if it runs)."""

    async def work(client: Client) -> None:
        vm_id = await client.resolve_vm(vm_ref)
        _, accepted = await client.request("DELETE", f"/v1/vms/{vm_id}/networks/{quote(name, safe='')}")
        if as_json:
            emit_json(accepted)
        else:
            console().print(f"VM {vm_id}: NIC on network {name} removed")

    ctx.run(work)


def register(main: click.Group, vm: click.Group) -> None:
    main.add_command(network)
    vm.add_command(attach_network)
    vm.add_command(detach_network)
