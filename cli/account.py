"""`ucloud login`, `ucloud logout` and `ucloud user ...` (admin realm).

``ucloud login NAME --realm R`` stores NAME's TOTP seed for this CLI (0600, see
cli/credentials.py) after proving it works by opening a session with it. ``ucloud
user enrol NAME`` (admin) creates a user's seed through the API and shows it once,
with a QR code for an authenticator app and the ``ucloud login`` command to run.
``ucloud user add|disable|enable|list`` manage the built-in directory; with LDAP the
gateway answers that users are managed in LDAP.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from ucloud.cli.credentials import (
    Credentials,
    CredentialsError,
    Identity,
    Sessions,
    credentials_path,
    parse_seed,
)
from ucloud.cli.main import (
    Client,
    Context,
    Failure,
    UcloudGroup,
    console,
    default_config_path,
    emit_json,
    json_option,
    pass_context,
    resolve_settings,
    table,
)


def read_seed(seed_file: str | None) -> str:
    if seed_file == "-":
        return sys.stdin.read()
    if seed_file is not None:
        try:
            return Path(seed_file).expanduser().read_text()
        except FileNotFoundError:
            raise Failure(f"{seed_file}: no such file") from None
        except (OSError, UnicodeDecodeError) as error:
            raise Failure(f"cannot read {seed_file}: {error}") from None
    return str(click.prompt("OTP seed or otpauth:// URI (input hidden)", hide_input=True, err=True))


@click.command("login")
@click.argument("name", required=False)
@click.option("--realm", "login_realm", metavar="REALM",
              help="The realm the seed is for (default: from the URI, else --realm before 'login', else ucloud).")
@click.option("--seed-file", metavar="FILE", help="Read the seed or otpauth:// URI from FILE ('-': stdin) "
              "instead of asking for it.")
@click.option("--no-check", is_flag=True, help="Store without proving the seed against the API first.")
@click.option("--no-default", is_flag=True, help="Do not make this identity the default one.")
@pass_context
def login(ctx: Context, name: str | None, login_realm: str | None, seed_file: str | None, no_check: bool,
          no_default: bool) -> None:
    """Store NAME's OTP identity for this CLI (the seed an admin's 'ucloud user enrol' showed)."""
    try:
        seed, uri_name, uri_realm = parse_seed(read_seed(seed_file))
    except CredentialsError as error:
        raise Failure(str(error)) from None
    name = name or uri_name
    if not name:
        raise click.UsageError("give the user NAME (the seed alone does not say whose it is)")
    realm = login_realm or uri_realm or ctx.realm or "ucloud"
    identity = Identity(name, realm, seed)
    credentials = Credentials()
    if not no_check:
        settings = dataclasses.replace(resolve_settings(ctx.api, name, realm, ctx.config), identity=identity)
        Sessions().drop_identity(name, realm)  # prove the new seed, not a session of an old one

        async def check(client: Client) -> bool:
            await client.open_session()
            return not client.per_request_totp

        try:
            with_session = ctx.run(check, settings)
        except Failure as error:
            raise Failure(f"not logged in: {error.format_message()}") from None
        if not with_session:
            click.echo("note: this gateway opens no sessions; the CLI sends a TOTP with each request", err=True)
    try:
        credentials.store(identity, make_default=not no_default)
    except CredentialsError as error:
        raise Failure(str(error)) from None
    default = "" if no_default else "; it is the default identity now"
    click.echo(f"logged in as {name}@{realm} (stored in {credentials.path}, mode 0600){default}", err=True)
    config = default_config_path()
    if ctx.api and not ctx.config and not config.exists():  # remember the API the login was for
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(f"api = {json.dumps(ctx.api)}\n")  # a JSON string is a TOML basic string
        click.echo(f"wrote {config}: the CLI talks to {ctx.api}", err=True)


@click.command("logout")
@click.argument("name", required=False)
@click.option("--realm", "logout_realm", metavar="REALM", help="The identity's realm.")
def logout(name: str | None, logout_realm: str | None) -> None:
    """Forget NAME's stored identity and sessions (default: the default identity)."""
    credentials = Credentials()
    try:
        default = credentials.default()
        if name is None:
            if default is None:
                raise Failure(f"no identity to forget in {credentials.path}")
            name, realm = default
        else:
            realms = credentials.realms_of(name)
            realm = logout_realm or (realms[0] if len(realms) == 1 else "ucloud")
        removed = credentials.forget(name, realm)
        Sessions().drop_identity(name, realm)
    except CredentialsError as error:
        raise Failure(str(error)) from None
    if not removed:
        raise Failure(f"no stored identity {name}@{realm} in {credentials.path}")
    click.echo(f"forgot {name}@{realm}", err=True)


# -- users (admin realm) ---------------------------------------------------------------------------


@click.group(cls=UcloudGroup)
def user() -> None:
    """Users and their OTP identities (admin realm). With LDAP, add and disable users in LDAP."""


def _user_row(listing: Any, u: dict[str, Any]) -> None:
    listing.add_row(u["name"], "yes" if u["enabled"] else "no",
                    ", ".join(u["realms"]) if u["realms"] is not None else "(by seed)",
                    ", ".join(u["enrolled"]) or "-", u["display_name"])


def _user_table(users: list[dict[str, Any]]) -> None:
    listing = table("NAME", "ENABLED", "REALMS", "ENROLLED", "DISPLAY NAME")
    for u in users:
        _user_row(listing, u)
    console().print(listing if users else "no users")


@user.command("list")
@json_option
@pass_context
def user_list(ctx: Context, as_json: bool) -> None:
    """List the built-in directory's users."""

    async def work(client: Client) -> None:
        users = (await client.get("/v1/users"))["users"]
        if as_json:
            emit_json(users)
        else:
            _user_table(users)

    ctx.run(work)


@user.command("show")
@click.argument("name")
@json_option
@pass_context
def user_show(ctx: Context, name: str, as_json: bool) -> None:
    """Show a user as the directory (built-in or LDAP) knows them."""

    async def work(client: Client) -> None:
        found = await client.get(f"/v1/users/{quote(name, safe='')}")
        if as_json:
            emit_json(found)
        else:
            _user_table([found])

    ctx.run(work)


@user.command("add")
@click.argument("name")
@click.option("--realm", "realms", multiple=True, metavar="REALM",
              help="A realm the user may log in to; repeat (default: ucloud).")
@click.option("--display-name", metavar="TEXT")
@click.option("--email", metavar="ADDRESS")
@json_option
@pass_context
def user_add(ctx: Context, name: str, realms: tuple[str, ...], display_name: str | None, email: str | None,
             as_json: bool) -> None:
    """Add NAME to the built-in directory; then 'ucloud user enrol NAME' gives them a seed."""
    body: dict[str, Any] = {"name": name, "display_name": display_name, "email": email,
                            "realms": list(realms) or None}

    async def work(client: Client) -> None:
        _, added = await client.request("POST", "/v1/users", body)
        if as_json:
            emit_json(added)
        else:
            console().print(f"user {added['name']} added (realms: {', '.join(added['realms'] or [])}); "
                            f"next: ucloud user enrol {added['name']}")

    ctx.run(work)


def _switch(action: str) -> None:
    @user.command(action, help=f"{action.capitalize()} the user NAME (built-in directory).")
    @click.argument("name")
    @json_option
    @pass_context
    def command(ctx: Context, name: str, as_json: bool) -> None:
        async def work(client: Client) -> None:
            _, changed = await client.request("POST", f"/v1/users/{quote(name, safe='')}/{action}")
            if as_json:
                emit_json(changed)
            else:
                console().print(f"user {changed['name']} {action}d")

        ctx.run(work)


_switch("disable")
_switch("enable")


@user.command("enrol")
@click.argument("name")
@click.option("--realm", "enrol_realm", default="ucloud", show_default=True, metavar="REALM",
              help="The realm the seed is for.")
@click.option("--replace", is_flag=True, help="Issue a new seed even if NAME has one (the old one stops working).")
@click.option("--no-qr", is_flag=True, help="Do not draw the QR code.")
@json_option
@pass_context
def user_enrol(ctx: Context, name: str, enrol_realm: str, replace: bool, no_qr: bool, as_json: bool) -> None:
    """Create NAME's OTP seed in a realm and show it ONCE (URI, QR code, login command)."""
    from ucloud.auth.otp import (
        render_qr,  # only here: the rest of the CLI does not need qrcode
    )

    async def work(client: Client) -> None:
        _, enrolled = await client.request("POST", f"/v1/users/{quote(name, safe='')}/otp",
                                           {"realm": enrol_realm, "replace": replace})
        if as_json:
            emit_json(enrolled)
            return
        who, realm = enrolled["name"], enrolled["realm"]
        click.echo(f"OTP identity of {who} in realm {realm}. It is shown once, here: pass it on now.\n")
        click.echo(f"  seed: {enrolled['seed']}")
        click.echo(f"  URI:  {enrolled['provisioning_uri']}\n")
        if not no_qr:
            click.echo(render_qr(enrolled["provisioning_uri"]))
        scan = "scans the QR code (or types the seed) into" if not no_qr else "types the seed into"
        click.echo(f"{who} {scan} an authenticator app, and logs the CLI in with\n"
                   f"  ucloud --api {client.settings.api} login {who} --realm {realm}\n"
                   f"pasting the seed (or the URI) when asked.")

    ctx.run(work)


@user.command("unenrol")
@click.argument("name")
@click.option("--realm", "enrol_realm", default="ucloud", show_default=True, metavar="REALM")
@json_option
@pass_context
def user_unenrol(ctx: Context, name: str, enrol_realm: str, as_json: bool) -> None:
    """Remove NAME's OTP seed in a realm: no new sessions or tokens there."""

    async def work(client: Client) -> None:
        path = f"/v1/users/{quote(name, safe='')}/otp"
        _, done = await client.request("DELETE", path, query={"realm": enrol_realm})
        if as_json:
            emit_json(done)
        elif done["removed"]:
            console().print(f"removed the OTP seed of {done['name']} in realm {done['realm']}")
        else:
            console().print(f"{done['name']} had no OTP seed in realm {done['realm']}")

    ctx.run(work)


__all__ = ["credentials_path", "login", "logout", "user"]
