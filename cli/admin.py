"""`ucloud admin recover`: root on the server gets a fresh admin identity.

It works without the API and without any CLI credentials (a state dir from an earlier
install, the last admin disabled, a lost phone): it reads and writes the state dir of
`ucloud up` directly (auth/recovery.py), stores the new identity for this machine's
CLI, and records ``admin.recovered`` in the log with the operator as actor
(``root@local``), so a recovery is never silent. Nothing secret is printed unless
asked for (``--seed-file`` writes the otpauth:// URI to a 0600 file).

Like `ucloud up` and `ucloud-audit`, this is a tool for the server itself: it opens the
log and the state dir, and imports nothing of the gateway.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
from pathlib import Path

import click

from ucloud.auth.directory import DirectoryError
from ucloud.auth.files import PrivateFileError, atomic_write
from ucloud.auth.recovery import Recovery, RecoveryError, recover_admin
from ucloud.auth.secrets import SecretStoreError
from ucloud.cli.credentials import Credentials, CredentialsError, Identity, Seed, Sessions
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.domain.operators import RecordAdminRecovery
from ucloud.eventstore.errors import EventStoreError
from ucloud.eventstore.url import InvalidStoreUrl, open_store

DEFAULT_STATE_DIR = Path("/var/lib/ucloud")  # as `ucloud up`'s
LOCAL_REALM = "local"  # the actor realm of what an operator does on the server itself


def operator() -> Actor:
    """Who runs this, as recorded in the log: ``<unix user>@local`` (``root@local``)."""
    try:
        name = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        name = f"uid-{os.geteuid()}"
    return Actor(name, LOCAL_REALM, is_admin=True)


@click.group("admin")
def admin() -> None:
    """Operator tools that run on the server itself (no API, no credentials needed)."""


@admin.command("recover")
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False), default=DEFAULT_STATE_DIR,
              show_default=True, envvar="UCLOUD_STATE_DIR", help="The state dir of `ucloud up`.")
@click.option("--store", "store_url", envvar="UCLOUD_STORE", metavar="URL",
              help="The log to record the recovery in (default: sqlite://STATE_DIR/events.sqlite, as "
                   "`ucloud up`).")
@click.option("--name", metavar="NAME",
              help="The admin to recover (default: the first admin of this state dir, else 'admin'); "
                   "created in the built-in directory if missing.")
@click.option("--seed-file", type=click.Path(path_type=Path, dir_okay=False),
              help="Also write the new otpauth:// URI to this file (mode 0600), to log in elsewhere.")
@click.option("--no-login", is_flag=True, help="Do not store the identity for this machine's CLI.")
def recover(state_dir: Path, store_url: str | None, name: str | None, seed_file: Path | None,
            no_login: bool) -> None:
    """Enrol a fresh admin identity, enable it, log this CLI in and record it in the log.

    For an operator locked out of the API: run it as the user that owns the state dir
    (root, or the service's user) on the machine that runs `ucloud up`."""
    state_dir = state_dir.absolute()
    url = store_url or f"sqlite://{state_dir}/events.sqlite"
    try:
        position, recovery = asyncio.run(_recover(state_dir, url, name))
    except InvalidStoreUrl as error:
        raise click.UsageError(str(error)) from None
    except (RecoveryError, DirectoryError, PrivateFileError, SecretStoreError) as error:
        raise click.ClickException(str(error)) from None
    who = f"{recovery.name}@{recovery.realm}"
    changes = [text for done, text in ((recovery.created_user, "added to the built-in directory"),
                                       (recovery.reenabled, "enabled again"),
                                       (recovery.granted_realm, f"granted the realm {recovery.realm}"),
                                       (recovery.replaced_seed, "old admin seed replaced (it no longer works)"))
               if done]
    click.echo(f"ucloud: recovered the admin {who}: a fresh OTP seed" + "".join(f"; {c}" for c in changes), err=True)
    if not recovery.builtin_directory:
        click.echo(f"ucloud: users live in LDAP here: {recovery.name} must exist, be enabled and be granted "
                   f"{recovery.realm} there", err=True)
    if position is None:
        click.echo("ucloud: WARNING: the recovery works but is NOT recorded in the log (see the error above); "
                   "run it again when the log is reachable", err=True)
    else:
        click.echo(f"ucloud: recorded in the log at position {position} (admin.recovered, by {operator()})",
                   err=True)
    if seed_file is not None:
        try:
            atomic_write(seed_file.absolute(), (recovery.enrolment.provisioning_uri.reveal() + "\n").encode())
        except OSError as error:
            raise click.ClickException(f"cannot write {seed_file}: {error.strerror}") from None
        click.echo(f"ucloud: the otpauth:// URI is in {seed_file} (mode 0600): log in elsewhere with "
                   f"'ucloud login {recovery.name} --realm {recovery.realm} --seed-file {seed_file}', "
                   f"then delete it", err=True)
    if not no_login:
        _log_in(recovery)
    if position is None:
        raise click.exceptions.Exit(1)


async def _recover(state_dir: Path, url: str, name: str | None) -> tuple[int | None, Recovery]:
    store = open_store(url, create=False)  # a mistyped path is an error, not a new empty log
    try:
        recovery = await recover_admin(state_dir, name)
        command = RecordAdminRecovery(name=recovery.name, realm=recovery.realm,
                                      created_user=recovery.created_user, reenabled=recovery.reenabled,
                                      granted_realm=recovery.granted_realm, replaced_seed=recovery.replaced_seed,
                                      machine=socket.gethostname())
        try:
            outcome = await CommandService(store).record_admin_recovery(operator(), command)
        except EventStoreError as error:
            click.echo(f"ucloud: cannot record the recovery in the log {url}: {error}", err=True)
            return None, recovery
        return outcome.position, recovery
    finally:
        await store.close()


def _log_in(recovery: Recovery) -> None:
    credentials = Credentials()
    try:
        credentials.store(Identity(recovery.name, recovery.realm, Seed(recovery.enrolment.seed.reveal())))
        Sessions().drop_identity(recovery.name, recovery.realm)  # sessions of the old seed: open a new one
    except (CredentialsError, OSError) as error:
        raise click.ClickException(f"could not log the CLI in: {error}") from None
    click.echo(f"ucloud: this machine's CLI is logged in as {recovery.name}@{recovery.realm} "
               f"(identity in {credentials.path}, mode 0600)", err=True)
