"""ucloud: the command line for users and admins, over the HTTP API v1.

    ucloud vm create|list|show|start|stop|reboot|delete
    ucloud key add|list|delete
    ucloud host add|list|join|maintenance|evacuate|remove   (admin realm)
    ucloud login NAME --realm R | logout      (store or forget an OTP identity)
    ucloud user add|list|show|disable|enable|enrol|unenrol   (admin realm)
    ucloud admin recover                      (root on the server: a fresh admin identity)

Settings come from ``$XDG_CONFIG_HOME/ucloud/config.toml`` (``~/.config/...``; keys
``api``, ``user``, ``realm``), overridden by UCLOUD_API / UCLOUD_USER / UCLOUD_REALM,
overridden by ``--api`` / ``--user`` / ``--realm``; without a user there, the identity
``ucloud login`` made the default. Tables for people, ``--json`` for scripts. A
failure prints one line on stderr and exits non-zero:

    1  the API refused or failed (the problem's detail is the line), or bad settings
    2  bad usage (options and arguments)
    3  --wait: the VM ended in a state it will not leave by itself (failed, unschedulable)
    4  --wait: the VM did not get there within --timeout

The HTTP client and the settings are in cli/client.py (aiohttp under asyncio.run).

Reading your own writes across invocations: the CLI remembers the last log position
a command returned for each API (``$XDG_STATE_HOME/ucloud/positions.json``) and
sends it with every query, so ``ucloud vm create`` followed by ``ucloud vm list``
always lists the new VM.

Authentication (cli/credentials.py, docs/auth.md): for an identity stored by ``ucloud
login`` the CLI opens a session with a fresh TOTP and sends ``Authorization: Bearer``;
without one it sends only X-Ucloud-User/X-Ucloud-Realm, which only a development
gateway (``ucloud up --insecure-header-auth``) accepts.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import click
from rich import box
from rich.console import Console
from rich.table import Table

from ucloud.auth.files import atomic_write
from ucloud.cli.client import (
    DEFAULT_API,
    DEFAULT_REALM,
    EXIT_ERROR,
    REQUEST_TIMEOUT,
    ApiError,
    Client,
    Context,
    Failure,
    Positions,
    Settings,
    config_home,
    default_config_path,
    resolve_settings,
    state_home,
)
from ucloud.domain.host import host_id_for
from ucloud.domain.units import format_size

__all__ = ["DEFAULT_API", "DEFAULT_REALM", "EXIT_ERROR", "REQUEST_TIMEOUT", "ApiError", "Client", "Context",
           "Failure", "Positions", "Settings", "config_home", "default_config_path", "main",
           "resolve_settings", "state_home"]

EXIT_VM_FAILED = 3
EXIT_TIMEOUT = 4
POLL_INTERVAL = 0.25



# -- output ----------------------------------------------------------------------------------------

def console() -> Console:
    """Rich output on the current stdout; piped output is never cut to 80 columns. What we
    print is data, never markup: with rich's defaults a MAC like 9a:ab:06:... printed as
    9a🆎06 (":ab:" is an emoji code) and a name in [brackets] would be styling."""
    return Console(highlight=False, soft_wrap=True, markup=False, emoji=False,
                   width=None if sys.stdout.isatty() else 1000)


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def table(*columns: str) -> Table:
    result = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in columns:
        result.add_column(column, no_wrap=True)
    return result


def usage(used: int, total: int, sizes: bool = True) -> str:
    show = format_size if sizes else str
    return f"{show(used)} / {show(total)}"


def show_vm(vm: dict[str, Any]) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    rows = [("name", vm["name"]), ("id", vm["id"]), ("owner", vm["owner"]), ("status", vm["status"]),
            ("desired", vm["desired"]), ("cores", str(vm["cores"])), ("ram", format_size(vm["ram"])),
            ("disk", format_size(vm["disk"])), ("image", vm["image"]),
            ("ssh keys", ", ".join(vm["ssh_keys"]) or "-"), ("restart policy", vm["restart_policy"]),
            ("host", vm["host_id"] or "-"), ("accelerator", vm["accelerator"] or "-"),
            ("reboots", str(vm["reboots"])), ("reason", vm["reason"] or "-"),
            ("created", vm["created_at"]), ("updated", vm["updated_at"])]
    for key, value in rows:
        grid.add_row(key, value)
    console().print(grid)
    if vm.get("nics"):
        nics = table("NETWORK", "MAC", "LINK-LOCAL", "ADDRESS")
        for nic in vm["nics"]:
            nics.add_row(nic["network"], nic["mac"] or "(allocating)", nic["link_local"] or "-", nic["address"] or "-")
        console().print(nics)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of tables.")


def wait_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
                     help="With --wait: give up after this many seconds (exit 4).")(f)
    return click.option("--wait", is_flag=True, help="Wait until the VM got there, showing its status changes.")(f)


# -- waiting ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    """What a --wait waits for, and the statuses that mean it will not happen."""

    reached: Callable[[dict[str, Any]], bool]
    doomed: frozenset[str]
    describe: str


def _status_is(status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda vm: bool(vm["status"] == status)


RUNNING = Goal(_status_is("running"), frozenset({"unschedulable", "failed", "deleting", "deleted"}), "running")
STOPPED = Goal(_status_is("stopped"), frozenset({"failed", "deleting", "deleted"}), "stopped")
DELETED = Goal(_status_is("deleted"), frozenset({"failed"}), "deleted")


async def wait_for(client: Client, vm_id: str, goal: Goal, timeout: float, quiet: bool) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = ""
    while True:
        status = await client.get(f"/v1/vms/{vm_id}/status")
        if status["status"] != last:
            last = status["status"]
            if not quiet:
                reason = f" ({status['reason']})" if status["reason"] else ""
                console().print(f"  {vm_id}: {last}{reason}")
        if goal.reached(status):
            return dict(status)
        if status["status"] in goal.doomed:
            reason = f": {status['reason']}" if status["reason"] else ""
            raise Failure(f"VM {vm_id} is {status['status']}{reason}; it will not become {goal.describe}",
                          EXIT_VM_FAILED)
        if loop.time() >= deadline:
            raise Failure(f"VM {vm_id} is still {status['status']} after {timeout:g}s, not {goal.describe}",
                          EXIT_TIMEOUT)
        await asyncio.sleep(min(POLL_INTERVAL, max(0.0, deadline - loop.time())))


# -- commands --------------------------------------------------------------------------------------


class UcloudGroup(click.Group):
    """Every failure is one line on stderr: usage errors too, and anything unexpected
    (instead of a traceback)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            result = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as error:
            hint = f" (see '{error.ctx.command_path} --help')" if error.ctx is not None else ""
            click.echo(f"error: {' '.join(error.format_message().split())}{hint}", err=True)
            sys.exit(error.exit_code)
        except click.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        sys.exit(result if isinstance(result, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as error:  # the last resort: never a traceback for a user
            raise Failure(f"{type(error).__name__}: {error}") from None


@click.group(cls=UcloudGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--api", metavar="URL", help=f"The ucloud API (env UCLOUD_API; default {DEFAULT_API}).")
@click.option("--user", metavar="NAME", help="Who you are (env UCLOUD_USER).")
@click.option("--realm", metavar="REALM", help="Your realm (env UCLOUD_REALM; default ucloud).")
@click.option("--config", metavar="FILE", help="Config file (env UCLOUD_CONFIG; default "
              "$XDG_CONFIG_HOME/ucloud/config.toml).")
@click.version_option(package_name="ucloud", message="ucloud %(version)s")
@click.pass_context
def main(ctx: click.Context, api: str | None, user: str | None, realm: str | None, config: str | None) -> None:
    """ucloud: IPv6-first virtual machines."""
    ctx.obj = Context(api, user, realm, config)


pass_context = click.make_pass_decorator(Context)


@main.group(cls=UcloudGroup)
def vm() -> None:
    """Virtual machines."""


def default_vm_name(image: str) -> str:
    """'debian-12.3' -> 'debian-12-3-4f2a': a hostname label the API accepts."""
    stem = re.sub(r"[^a-z0-9-]+", "-", image.lower()).strip("-")[:50] or "vm"
    return f"{stem}-{secrets.token_hex(2)}"


USER_DATA_READ_LIMIT = 1024 * 1024  # the gateway states the real limit; this only bounds the read


def read_user_data(source: BinaryIO) -> str:
    """A user-data file as text: UTF-8, read up to a bound so a wrong file name (a disk
    image) fails at once rather than after reading gigabytes."""
    raw = source.read(USER_DATA_READ_LIMIT + 1)
    if len(raw) > USER_DATA_READ_LIMIT:
        raise click.BadParameter(f"larger than {USER_DATA_READ_LIMIT} bytes; user data is a short text",
                                 param_hint="--user-data")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise click.BadParameter(f"not UTF-8 text ({error.reason} at byte {error.start}); compressed or "
                                 "binary user data is not supported", param_hint="--user-data") from None


@vm.command("create")
@click.argument("name", required=False)
@click.option("--name", "name_option", metavar="NAME", help="The VM's name (or give it as the argument; "
              "default: the image's name and a random suffix).")
@click.option("--image", required=True, help="The OS image, e.g. debian-12.")
@click.option("--cores", default="1", show_default=True, help="Virtual CPU cores.")
@click.option("--ram", default="1GiB", show_default=True, help="Memory, e.g. 512MB, 2GB (binary units).")
@click.option("--disk", default="10GiB", show_default=True, help="Disk size, e.g. 10GB.")
@click.option("--ssh-key", "ssh_keys", multiple=True, metavar="NAME", help="An SSH key (by name) to install; repeat.")
@click.option("--restart-policy", type=click.Choice(["always", "never"]), default="always", show_default=True,
              help="Restart the VM after a crash?")
@click.option("--network", "networks", multiple=True, metavar="NAME",
              help="A NIC on this network of yours; repeat (the order is the guest's NIC order).")
@click.option("--idempotency-key", metavar="KEY", help="Retry-safe: the same key and options give the same VM.")
@click.option("--user-data", "user_data_file", type=click.File("rb"), metavar="FILE",
              help="User data for cloud-init/ucloud-init (UTF-8 text, at most 16 KiB characters by default). "
                   "It is stored in the log: never put secrets in it.")
@click.option("--yes", is_flag=True, help="When prices are set: order at the quoted price without asking.")
@wait_options
@json_option
@pass_context
def vm_create(ctx: Context, name: str | None, name_option: str | None, image: str, cores: str, ram: str, disk: str,
              ssh_keys: tuple[str, ...], restart_policy: str, networks: tuple[str, ...], idempotency_key: str | None,
              user_data_file: BinaryIO | None, yes: bool, wait: bool, timeout: float, as_json: bool) -> None:
    """Create a VM called NAME (--wait: until it runs)."""
    if name and name_option and name != name_option:
        raise click.UsageError(f"two names given: {name!r} and --name {name_option!r}")
    user_data = read_user_data(user_data_file) if user_data_file else ""
    name = name or name_option or default_vm_name(image)
    body = {"name": name, "image": image, "cores": int(cores) if cores.isascii() and cores.isdigit() else cores, "ram": ram,
            "disk": disk, "ssh_keys": list(ssh_keys), "restart_policy": restart_policy}
    if networks:
        body["networks"] = list(networks)
    if user_data:
        body["user_data"] = user_data
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None

    async def work(client: Client) -> None:
        # Priced VMs are ordered first (docs/billing.md).
        from ucloud.cli.billing import order_if_priced

        created = await order_if_priced(client, body, yes=yes, quiet=as_json)
        if created is None:  # no prices: free, no order step
            _, created = await client.request("POST", "/v1/vms", body, headers=headers)
        if not as_json:
            console().print(f"VM {name} is {created['status']}: {created['id']}")
        if wait:
            await wait_for(client, created["id"], RUNNING, timeout, as_json)
            if as_json:
                emit_json(await client.get(f"/v1/vms/{created['id']}"))
        elif as_json:
            emit_json(created)

    ctx.run(work)


@vm.command("list")
@click.option("--owner", metavar="USER", help="Admins: only this user's VMs.")
@click.option("--all", "include_deleted", is_flag=True, help="Include deleted VMs.")
@json_option
@pass_context
def vm_list(ctx: Context, owner: str | None, include_deleted: bool, as_json: bool) -> None:
    """List your VMs."""
    query = {"include_deleted": "true"} if include_deleted else {}
    if owner:
        query["owner"] = owner

    async def work(client: Client) -> None:
        vms = (await client.get("/v1/vms", query))["vms"]
        if as_json:
            emit_json(vms)
            return
        owners = {v["owner"] for v in vms}
        columns = ["NAME", "ID", "STATUS", "CORES", "RAM", "DISK", "IMAGE"]
        listing = table(*columns, *(["OWNER"] if owners - {client.settings.user} else []))
        for v in vms:
            row = [v["name"], v["id"], v["status"], str(v["cores"]), format_size(v["ram"]), format_size(v["disk"]),
                   v["image"]]
            listing.add_row(*row, *([v["owner"]] if len(listing.columns) > len(columns) else []))
        console().print(listing if vms else "no VMs")

    ctx.run(work)


@vm.command("show")
@click.argument("vm_ref", metavar="VM")
@json_option
@pass_context
def vm_show(ctx: Context, vm_ref: str, as_json: bool) -> None:
    """Show a VM (by id or name)."""

    async def work(client: Client) -> None:
        vm_id = await client.resolve_vm(vm_ref)
        found = await client.get(f"/v1/vms/{vm_id}")
        if as_json:
            emit_json(found)
        else:
            show_vm(found)

    ctx.run(work)


def _lifecycle(action: str, method: str, path: str, goal: Goal | None, help_text: str) -> None:
    @vm.command(action, help=help_text)
    @click.argument("vm_ref", metavar="VM")
    @wait_options
    @json_option
    @pass_context
    def command(ctx: Context, vm_ref: str, wait: bool, timeout: float, as_json: bool) -> None:
        async def work(client: Client) -> None:
            vm_id = await client.resolve_vm(vm_ref)
            target = goal
            if action == "reboot":
                before = (await client.get(f"/v1/vms/{vm_id}/status"))["reboots"]
                target = Goal(lambda vm: vm["status"] == "running" and vm["reboots"] > before,
                              RUNNING.doomed | {"stopped", "stopping", "crashed"}, "rebooted")
            _, accepted = await client.request(method, path.format(vm_id))
            if not as_json:
                console().print(f"VM {vm_id}: {action} requested")
            if wait and target is not None:
                final = await wait_for(client, vm_id, target, timeout, as_json)
                if as_json:
                    emit_json(final)
            elif as_json:
                emit_json(accepted)

        ctx.run(work)


_lifecycle("start", "POST", "/v1/vms/{}/start", RUNNING, "Start a VM (--wait: until it runs).")
_lifecycle("stop", "POST", "/v1/vms/{}/stop", STOPPED, "Stop a VM (--wait: until it stopped).")
_lifecycle("reboot", "POST", "/v1/vms/{}/reboot", None, "Reboot a running VM (--wait: until it rebooted).")
_lifecycle("delete", "DELETE", "/v1/vms/{}", DELETED, "Delete a VM (--wait: until it is gone).")


@main.group(cls=UcloudGroup)
def key() -> None:
    """SSH public keys, installed into the VMs that name them."""


def read_public_key(source: str) -> str:
    """The key line from a file, '-' (stdin) or the key itself."""
    if source == "-":
        text = sys.stdin.read()
    elif source.split(" ", 1)[0].startswith(("ssh-", "ecdsa-", "sk-")):
        text = source
    else:
        path = Path(source).expanduser()
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise Failure(f"{source}: no such file (give a public key file, the key itself, or -)") from None
        except (OSError, UnicodeDecodeError) as error:
            raise Failure(f"cannot read {source}: {error}") from None
    if "PRIVATE KEY" in text:  # never send a private key anywhere
        raise Failure(f"{source} is a private key; give the public key (the .pub file)")
    return text.strip()


@key.command("add")
@click.argument("name")
@click.argument("public_key", metavar="KEY_FILE_OR_KEY")
@json_option
@pass_context
def key_add(ctx: Context, name: str, public_key: str, as_json: bool) -> None:
    """Add a public key called NAME, from a file (e.g. ~/.ssh/id_ed25519.pub), '-' or the key text."""
    text = read_public_key(public_key)

    async def work(client: Client) -> None:
        _, added = await client.request("POST", "/v1/ssh-keys", {"name": name, "public_key": text})
        if as_json:
            emit_json(added)
        else:
            console().print(f"SSH key {name} added: {added['fingerprint']}")

    ctx.run(work)


@key.command("list")
@json_option
@pass_context
def key_list(ctx: Context, as_json: bool) -> None:
    """List your SSH keys."""

    async def work(client: Client) -> None:
        keys = (await client.get("/v1/ssh-keys"))["ssh_keys"]
        if as_json:
            emit_json(keys)
            return
        listing = table("NAME", "FINGERPRINT", "COMMENT")
        for k in keys:
            parts = k["public_key"].split(" ", 2)
            listing.add_row(k["name"], k["fingerprint"], parts[2] if len(parts) > 2 else "")
        console().print(listing if keys else "no SSH keys")

    ctx.run(work)


@key.command("delete")
@click.argument("name")
@json_option
@pass_context
def key_delete(ctx: Context, name: str, as_json: bool) -> None:
    """Delete the SSH key NAME."""

    async def work(client: Client) -> None:
        _, done = await client.request("DELETE", f"/v1/ssh-keys/{name}")
        if as_json:
            emit_json(done)
        else:
            console().print(f"SSH key {name} deleted")

    ctx.run(work)


@main.group(cls=UcloudGroup)
def host() -> None:
    """Hosts that run VMs (admin realm)."""


@host.command("add")
@click.argument("hostname")
@click.option("--cores", required=True, help="CPU cores the host offers.")
@click.option("--ram", required=True, help="Memory the host offers, e.g. 256GB.")
@click.option("--disk", required=True, help="Disk the host offers, e.g. 4TB.")
@click.option("--hypervisor", default="qemu", show_default=True)
@json_option
@pass_context
def host_add(ctx: Context, hostname: str, cores: str, ram: str, disk: str, hypervisor: str, as_json: bool) -> None:
    """Register HOSTNAME (again: updates its capacity)."""
    body = {"hostname": hostname, "cores": int(cores) if cores.isascii() and cores.isdigit() else cores, "ram": ram, "disk": disk,
            "hypervisor": hypervisor}

    async def work(client: Client) -> None:
        status, added = await client.request("POST", "/v1/hosts", body)
        verb = "registered" if status == 201 else "updated"
        if as_json:
            emit_json(added)
        else:
            console().print(f"host {hostname} {verb}: {added['id']}")

    ctx.run(work)


@host.command("list")
@json_option
@pass_context
def host_list(ctx: Context, as_json: bool) -> None:
    """List hosts with their capacity and use."""

    async def work(client: Client) -> None:
        hosts = (await client.get("/v1/hosts"))["hosts"]
        if as_json:
            emit_json(hosts)
            return
        listing = table("HOSTNAME", "STATE", "ID", "CORES", "RAM", "DISK", "VMS", "CREDENTIAL")
        for h in hosts:
            listing.add_row(h["hostname"], h.get("status", ""), h["id"], usage(h["used_cores"], h["cores"], sizes=False),
                            usage(h["used_ram"], h["ram"]), usage(h["used_disk"], h["disk"]), str(h["vms"]),
                            "issued" if h.get("credential") else "-")
        console().print(listing if hosts else "no hosts")

    ctx.run(work)


def _host_path(hostname: str, suffix: str = "") -> str:
    """A host's API path: its id follows from its name (the same rule as the server's)."""
    return f"/v1/hosts/{host_id_for(hostname)}{suffix}"


@host.command("join")
@click.argument("hostname")
@click.option("--credential-file", "credential_file", type=click.Path(path_type=Path), metavar="FILE",
              help="Write the credential to FILE (created 0600) instead of showing it.")
@json_option
@pass_context
def host_join(ctx: Context, hostname: str, credential_file: Path | None, as_json: bool) -> None:
    """Issue HOSTNAME (registered with 'host add', or by its agent) its own credential.

    The host's agent writes with it through the gateway only, and only about itself and
    its own VMs (docs/operations.md, "Host credentials"). Shown once; issuing again
    revokes the previous one."""

    async def work(client: Client) -> None:
        _, issued = await client.request("POST", _host_path(hostname, "/credential"))
        credential = issued["credential"]
        if credential_file is not None:
            atomic_write(credential_file, (credential + "\n").encode())
        if as_json:
            emit_json(issued if credential_file is None else {**issued, "credential": str(credential_file)})
            return
        where = f"in {credential_file} (0600)" if credential_file is not None else f"(shown once): {credential}"
        console().print(f"host {hostname}: a new credential {where}; any earlier one is revoked.")
        target = credential_file or "FILE"
        console().print(f"On {hostname}, with the credential in a 0600 file: ucloud-host --hostname {hostname} "
                        f"--gateway {client.settings.api} --credential-file {target} --store ...")

    ctx.run(work)


@host.command("maintenance")
@click.argument("hostname")
@click.argument("state", type=click.Choice(["on", "off"]))
@pass_context
def host_maintenance(ctx: Context, hostname: str, state: str) -> None:
    """Take HOSTNAME out of placement (on; its VMs keep running) or back in (off)."""

    async def work(client: Client) -> None:
        await client.request("POST", _host_path(hostname, "/maintenance"), {"maintenance": state == "on"})
        console().print(f"host {hostname}: maintenance {state}")

    ctx.run(work)


@host.command("evacuate")
@click.argument("hostname")
@pass_context
def host_evacuate(ctx: Context, hostname: str) -> None:
    """Restart every VM of HOSTNAME on other hosts now (its guests are stopped first)."""

    async def work(client: Client) -> None:
        await client.request("POST", _host_path(hostname, "/evacuate"))
        console().print(f"host {hostname}: evacuating (in maintenance; its VMs move to other hosts)")

    ctx.run(work)


@host.command("remove")
@click.argument("hostname")
@pass_context
def host_remove(ctx: Context, hostname: str) -> None:
    """Remove HOSTNAME (refused while VMs are placed on it)."""

    async def work(client: Client) -> None:
        await client.request("DELETE", _host_path(hostname))
        console().print(f"host {hostname} removed")

    ctx.run(work)


def _unavailable(name: str, reason: str) -> click.Command:
    @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                   help=f"(unavailable: {reason})")
    def command() -> NoReturn:
        raise Failure(f"ucloud {name} is unavailable: {reason}")

    return command


def _add_subcommands() -> None:
    """Command groups written in their own modules join the CLI here. They import the
    definitions above, so they are imported last (inside a function, so that type
    checkers resolve the cycle)."""
    from ucloud.cli.account import login, logout, user
    from ucloud.cli.admin import admin

    main.add_command(login)
    main.add_command(logout)
    main.add_command(user)
    main.add_command(admin)  # `ucloud admin recover` (cli/admin.py)
    from ucloud.cli.billing import register as add_billing  # price, usage, bill, balance, pay, ...

    add_billing(main)
    from ucloud.cli.images import register as add_images  # file, image, vm resize

    add_images(main)

    from ucloud.cli.network import register as add_networks  # network, vm attach-network

    add_networks(main, vm)

    # `ucloud up` lives in cli/up.py; it joins this CLI when it can be imported.
    try:
        from ucloud.cli.run_processes import processes_command
        from ucloud.cli.up import gateway_command, metadata, up
    except ModuleNotFoundError as missing:
        if missing.name != "ucloud.cli.up":  # up.py exists but needs something missing: say so when used
            main.add_command(_unavailable("up", str(missing)))
            main.add_command(_unavailable("metadata", str(missing)))
    else:
        main.add_command(up)
        main.add_command(gateway_command)  # `ucloud gateway`: the API as its own daemon
        main.add_command(processes_command)  # `ucloud processes`: every process manager, leader-elected
        main.add_command(metadata)  # `ucloud metadata`: the metadata server as its own process


_add_subcommands()
