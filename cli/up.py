"""`ucloud up`: the all-in-one on one machine.

The log (SQLite by default, or ``--store etcd://…``), the gateway, the scheduler and
a host agent for this machine, supervised as one group in one process: a component
that fails is logged and started again; Ctrl-C (or SIGTERM) stops everything
cleanly. Guests are QEMU processes of their own and keep running across a restart
of `ucloud up`; the host agent adopts them when it comes back.

Authentication is real by default (docs/auth.md): users in a built-in directory
(``<state-dir>/users.json``) or, with ``--ldap-url``/``--ldap-config``, in LDAP; seeds and
the session key in ``<state-dir>/secrets.json``; both 0600. On the first start the
first admin (``admin`` in realm ``ucloud-admin``) is created and enrolled, the CLI of
the user running `ucloud up` is logged in as it when it has no identity yet, and the
way to log in elsewhere is shown once: the seed on a terminal, or in a 0600 file whose
path is printed when stderr is not a terminal (it may be a log). Nothing secret goes
to the log. ``--insecure-header-auth`` trusts X-Ucloud-User headers instead: for
development only, never the default.

This is the one module of the CLI that imports the server (``ucloud.gateway.app``, to
run the gateway in-process); tests/unit/test_import_rules.py holds the rest to HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import stat
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ucloud.auth.config import (
    FIRST_ADMIN,
    FirstAdmin,
    builtin_authenticator,
    ensure_first_admin,
    ldap_authenticator,
    load_ldap_config,
)
from ucloud.auth.directory import DirectoryError, DirectoryUnavailable
from ucloud.auth.files import PrivateFileError, atomic_write
from ucloud.auth.otp import render_qr
from ucloud.auth.secrets import SecretStoreError
from ucloud.auth.sessions import DEFAULT_TTL, SessionAuthenticator
from ucloud.cli.credentials import Credentials, CredentialsError, Identity, Seed
from ucloud.cli.run_processes import wait_for_signal
from ucloud.commands.service import HOST_IMAGES, CommandService
from ucloud.domain.errors import InvalidValue
from ucloud.domain.limits import DEFAULT_LIMITS, GiB, Limits, load_limits
from ucloud.domain.network import check_pool
from ucloud.domain.units import parse_size
from ucloud.eventstore.leases import leases_for
from ucloud.eventstore.url import InvalidStoreUrl, open_store
from ucloud.gateway.app import GatewayConfig, start
from ucloud.hostagent.options import agent_options
from ucloud.imagestore.stores import parse_stores
from ucloud.processes import daemon as processes

if TYPE_CHECKING:
    from ucloud.hostagent.main import NetworkOptions

# What only `ucloud up` and `ucloud metadata` use (a host agent, QEMU, the metadata server,
# the built-in images) is imported in them: `ucloud gateway` and `ucloud processes` start
# without it (docs/performance.md, "Start-up over 100,000 VMs").

log = logging.getLogger("ucloud.up")

DEFAULT_STATE_DIR = Path("/var/lib/ucloud")


def private_state_dir(state_dir: Path) -> None:
    """The state dir holds users, seeds, the log and disks: only the service may enter
    it. A new one is made 0700; one of ours from an earlier install that others could
    enter is tightened (and said so). A shared directory (sticky, like /tmp) or one
    owned by someone else is left alone with a warning: it is not ours to change."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = state_dir.stat()
    wide = stat.S_IMODE(st.st_mode)
    if not wide & 0o077:
        return
    if st.st_uid == os.geteuid() and not wide & stat.S_ISVTX:
        os.chmod(state_dir, 0o700)
        click.echo(f"ucloud: made the state dir {state_dir} private (mode {wide:04o} -> 0700)", err=True)
    else:
        click.echo(f"ucloud: WARNING: the state dir {state_dir} (mode {wide:04o}) is open to others; "
                   f"use a directory of its own", err=True)


def write_cli_config(api: str, header_user: bool = False) -> Path | None:
    """Point the CLI at this gateway, unless the user already configured one. Who the CLI
    is comes from its credentials (``ucloud login``); only for a header-authentication
    gateway does the config name a user."""
    home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    path = home / "ucloud" / "config.toml"
    if path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f'api = "{api}"\n'
    if header_user:
        text += f'user = "{os.environ.get("USER") or "root"}"\nrealm = "ucloud"\n'
    path.write_text(text)
    return path


@dataclasses.dataclass(frozen=True)
class FileLimits:
    """Uploads: the largest one file and all of one user's files together (docs/api.md)."""

    max_file_size: int = 64 * GiB
    file_quota: int = 256 * GiB


def file_limits(max_file_size: str, file_quota: str) -> FileLimits:
    try:
        made = FileLimits(parse_size(max_file_size, "--max-file-size"), parse_size(file_quota, "--file-quota"))
    except InvalidValue as error:
        raise click.UsageError(str(error)) from None
    if made.max_file_size <= 0 or made.file_quota <= 0:
        raise click.UsageError("--max-file-size and --file-quota must be positive")
    return made


def file_limit_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option("--file-quota", default="256GiB", show_default=True, envvar="UCLOUD_FILE_QUOTA",
                           help="All of one user's files together (uploads beyond it: 413).")(command)
    return click.option("--max-file-size", default="64GiB", show_default=True, envvar="UCLOUD_MAX_FILE_SIZE",
                        help="The largest file one upload may be.")(command)


@dataclasses.dataclass(frozen=True)
class AuthOptions:
    insecure_header_auth: bool = False
    ldap: dict[str, Any] = dataclasses.field(default_factory=dict)  # flags; empty: no LDAP unless ldap_config
    ldap_config: Path | None = None
    admin: str = FIRST_ADMIN
    session_ttl: float = DEFAULT_TTL

    @property
    def uses_ldap(self) -> bool:
        return self.ldap_config is not None or any(v is not None for v in self.ldap.values())


def make_authenticator(options: AuthOptions, state_dir: Path) -> SessionAuthenticator:
    if options.uses_ldap:
        config = load_ldap_config(options.ldap_config, options.ldap)
        return ldap_authenticator(config, state_dir, session_ttl=options.session_ttl)
    return builtin_authenticator(state_dir, session_ttl=options.session_ttl)


def log_the_cli_in(first: FirstAdmin) -> Path | None:
    """Store the new admin's identity for this machine's CLI if it has none yet."""
    assert first.enrolment is not None
    credentials = Credentials()
    try:
        if credentials.identities():
            return None
        credentials.store(Identity(first.name, first.realm, Seed(first.enrolment.seed.reveal())))
    except (CredentialsError, OSError) as error:
        click.echo(f"ucloud: could not log the CLI in ({error})", err=True)
        return None
    return credentials.path


def announce_first_admin(first: FirstAdmin, api: str, state_dir: Path) -> None:
    """Say once how to log in as the first admin; the seed only on a terminal or in a
    0600 file, never where a log could keep it."""
    assert first.enrolment is not None
    login = f"ucloud --api {api} login {first.name} --realm {first.realm}"
    click.echo(f"ucloud: created the first admin: {first.name} in realm {first.realm}", err=True)
    stored = log_the_cli_in(first)
    if stored is not None:
        click.echo(f"ucloud: this machine's CLI is logged in as {first.name}@{first.realm} "
                   f"(identity in {stored}, mode 0600)", err=True)
    if sys.stderr.isatty():
        uri = first.enrolment.provisioning_uri
        click.echo("ucloud: the admin's OTP seed, shown this once (scan it into an authenticator app):", err=True)
        click.echo(f"  seed: {first.enrolment.seed.reveal()}\n  URI:  {uri.reveal()}", err=True)
        click.echo(render_qr(uri), err=True)
        click.echo(f"ucloud: to log in elsewhere:  {login}   (paste the seed when asked)", err=True)
        return
    seed_file = state_dir / "first-admin.otpauth"
    atomic_write(seed_file, (first.enrolment.provisioning_uri.reveal() + "\n").encode())
    click.echo(f"ucloud: the admin's OTP seed is not printed (stderr is not a terminal); it is in {seed_file} "
               f"(mode 0600). Log in with:", err=True)
    click.echo(f"  {login} --seed-file {seed_file}", err=True)
    click.echo(f"ucloud: then delete {seed_file}", err=True)


async def run_up(
    store_url: str,
    state_dir: Path,
    listen: tuple[str, ...],
    port: int,
    hostname: str,
    accel: str,
    with_agent: bool,
    ready: asyncio.Event | None = None,
    auth: AuthOptions | None = None,
    limits: Limits = DEFAULT_LIMITS,
    files_root: Path | None = None,
    ipv6_pool: str | None = None,
    metadata_port: int | None = 80,
    image_stores: tuple[str, ...] = (),
    metadata_url: str | None = None,
    network: NetworkOptions | None = None,
    debian12: bool = False,
    files: FileLimits = FileLimits(),
    cache_dir: Path | None = None,
) -> None:
    from ucloud.gateway.metadata import MetadataConfig, RunningMetadata
    from ucloud.gateway.metadata import start as start_metadata
    from ucloud.hostagent.agent import HostAgent
    from ucloud.hostagent.builtin import build_builtin
    from ucloud.hostagent.images import ImageCatalogue
    from ucloud.hostagent.main import NetworkOptions
    from ucloud.hostagent.qemu import QemuDriver
    from ucloud.hostagent.writes import DirectWrites
    from ucloud.processes.builtin_images import register_builtin

    network = network or NetworkOptions(router=True)
    cache_dir = cache_dir or state_dir / "cache"
    auth = auth or AuthOptions()
    files_root = files_root or state_dir / "files"
    stores = parse_stores(image_stores or (f"local=fs:{state_dir / 'image-store'}",))
    private_state_dir(state_dir)
    authenticator: SessionAuthenticator | None = None
    first: FirstAdmin | None = None
    if auth.insecure_header_auth:
        click.echo("ucloud: WARNING: --insecure-header-auth: the API trusts X-Ucloud-User/X-Ucloud-Realm "
                   "as sent; anyone who can reach it can act as anyone, admin included", err=True)
    else:
        authenticator = make_authenticator(auth, state_dir)
        try:
            first = await ensure_first_admin(authenticator, auth.admin)
        except DirectoryUnavailable as error:  # LDAP down now: serve anyway, it may come back
            click.echo(f"ucloud: WARNING: cannot check the first admin now: {error}", err=True)
        except BaseException:
            await authenticator.close()
            raise
    store = open_store(store_url)
    # With its agent, `ucloud up` registers the built-in images in the catalogue (below):
    # a VM names a catalogue image, never one the host would provide by itself.
    host_images: frozenset[str] = frozenset() if with_agent else HOST_IMAGES
    commands = CommandService(store, limits=limits, host_images=host_images)
    try:
        gateway = await start(GatewayConfig(store=store, listen=listen, port=port,
                                            authenticator=authenticator or "header", limits=limits,
                                            files_root=files_root, image_stores=tuple(stores),
                                            max_file_size=files.max_file_size, file_quota=files.file_quota,
                                            host_images=tuple(sorted(host_images))))
    except BaseException:
        await store.close()
        if authenticator is not None:
            await authenticator.close()
        raise
    leases = leases_for(store)
    metadata: RunningMetadata | None = None
    if metadata_port is not None:
        try:
            metadata = await start_metadata(MetadataConfig(store=store, port=metadata_port))
        except OSError as error:  # not root (port 80), or the port is taken: the rest still runs
            click.echo(f"ucloud: WARNING: no metadata server: {error}", err=True)
    # Every process manager (scheduler, failure detector, billing, IPAM, image scanner), each
    # under its leader lease: the same set `ucloud processes` runs, so an up can share a log
    # with others.
    components: dict[str, Callable[[], Awaitable[None]]] = dict(processes.build(
        commands, leases, processes.ProcessSettings(instance=f"up-{hostname}", ipv6_pool=ipv6_pool,
                                                    files_root=files_root, image_stores=stores,
                                                    max_image_size=limits.vm_disk)).components)
    if with_agent:
        images = ImageCatalogue(state_dir / "images")
        click.echo("ucloud: preparing the built-in image 'tiny' (first run downloads a kernel)…", err=True)
        await asyncio.to_thread(images.install_tiny, cache_dir / "tinyguest")
        if debian12:
            click.echo("ucloud: preparing the image 'debian-12' (first run: mmdebstrap, a few minutes)…", err=True)
            await asyncio.to_thread(images.install_debian12, cache_dir / "debian-12")
        driver = QemuDriver(state_dir / "run", accel=accel)  # type: ignore[arg-type]
        # This machine routes every network with IPAM (its /64's first address, radvd).
        agent = HostAgent(commands.store, DirectWrites(commands, hostname), driver, images, state_dir=state_dir,
                          hostname=hostname, stores=stores,
                          metadata_url=metadata_url, leases=leases, network=network.driver(state_dir),
                          router=network.router, rdnss=network.rdnss)
        components["host agent"] = agent.run
    tasks = [asyncio.create_task(processes.supervise(name, run), name=name) for name, run in components.items()]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        # `tiny` (and `debian-12` when asked for) as ordinary public images of the catalogue:
        # each one's bootable disk among the admin's files, imported by the image scanner into
        # the default store (once; an existing image of the name is kept).
        for name in (("tiny", "debian-12") if debian12 else ("tiny",)) if with_agent else ():
            built = await asyncio.to_thread(build_builtin, name, cache_dir)
            registering = asyncio.create_task(register_builtin(commands, files_root, auth.admin, name, built))
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait((registering, stopping), return_when=asyncio.FIRST_COMPLETED)
            for waited in (stopping, registering):
                waited.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waited
            if registering.cancelled():  # stopped while registering
                return
            catalogued = registering.result()
            click.echo(f"ucloud: the public image {name!r} is ready in store {catalogued.store}", err=True)
        config_path = write_cli_config(gateway.url, header_user=authenticator is None)
        click.echo(f"ucloud is up: API {gateway.url}, log {store_url}, state {state_dir}", err=True)
        if config_path:
            click.echo(f"ucloud: wrote {config_path} so the CLI talks to this gateway", err=True)
        if authenticator is not None and first is not None:
            click.echo(f"ucloud: users in {authenticator.directory!r}; secrets in {authenticator.secrets!r}", err=True)
            if first.enrolment is not None:
                announce_first_admin(first, gateway.url, state_dir)
            elif first.problem is not None:
                click.echo(f"ucloud: WARNING: no first admin: {first.problem} (ucloud up --admin NAME)", err=True)
            else:
                click.echo("ucloud: log in with 'ucloud login NAME --realm REALM'; admins enrol users with "
                           "'ucloud user enrol NAME'", err=True)
        click.echo("try:  ucloud vm create --name demo --image tiny --cores 1 --ram 256MB --disk 1GB --wait", err=True)
        click.echo("stop: Ctrl-C (guests keep running and are adopted on the next `ucloud up`)", err=True)
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        click.echo("ucloud: stopping…", err=True)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await gateway.stop()
        await leases.close()
        if metadata is not None:
            await metadata.stop()
        await store.close()
        if authenticator is not None:
            await authenticator.close()
        click.echo("ucloud: stopped", err=True)


@click.command()
@click.option("--store", "store_url", envvar="UCLOUD_STORE", default=f"sqlite://{DEFAULT_STATE_DIR}/events.sqlite",
              show_default=True, help="The log: sqlite:///path or etcd://host:port[,host:port][/prefix].")
@click.option("--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR, show_default=True,
              help="Disks, images and QEMU run directories.")
@click.option("--listen", multiple=True, default=("::1", "127.0.0.1"), show_default=True,
              help="Addresses the API listens on (repeat).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@agent_options
@click.option("--no-agent", is_flag=True, help="Do not run a host agent on this machine.")
@click.option("--admin", default=FIRST_ADMIN, show_default=True, envvar="UCLOUD_ADMIN",
              help="The first admin, created (built-in directory) and enrolled in the admin realm on the "
                   "first start; with LDAP an existing LDAP user.")
@click.option("--ldap-url", "ldap_urls", multiple=True, envvar="UCLOUD_LDAP_URL", metavar="URL",
              help="Read users from this LDAP server (ldap:// or ldaps://; repeat for fail-over) instead "
                   "of the built-in directory.")
@click.option("--ldap-base-dn", envvar="UCLOUD_LDAP_BASE_DN", metavar="DN", help="Where users are.")
@click.option("--ldap-bind-dn", envvar="UCLOUD_LDAP_BIND_DN", metavar="DN",
              help="The read-only service account (default: bind anonymously).")
@click.option("--ldap-bind-password-file", envvar="UCLOUD_LDAP_BIND_PASSWORD_FILE", metavar="FILE",
              help="A file holding the service account's password.")
@click.option("--ldap-tls", type=click.Choice(["none", "ldaps", "starttls"]), envvar="UCLOUD_LDAP_TLS",
              help="TLS to the LDAP server (an ldaps:// URL implies ldaps).")
@click.option("--ldap-config", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              envvar="UCLOUD_LDAP_CONFIG",
              help="A TOML file whose [ldap] table sets any LDAP key of docs/auth.md (flags win).")
@click.option("--session-ttl", type=click.FloatRange(min=1), default=DEFAULT_TTL, show_default=True,
              help="Seconds a session opened with a TOTP lasts.")
@click.option("--insecure-header-auth", is_flag=True,
              help="DEVELOPMENT ONLY: trust X-Ucloud-User/X-Ucloud-Realm as sent, no tokens.")
@click.option("--limits", "limits_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              envvar="UCLOUD_LIMITS", help="A JSON object of size and count limits to change (docs/api.md).")
@click.option("--files-root", type=click.Path(path_type=Path), envvar="UCLOUD_FILES_ROOT",
              help="Users' files, one directory per user (default: <state-dir>/files).")
@click.option("--ipv6-pool", envvar="UCLOUD_IPV6_POOL", metavar="PREFIX",
              help="The IPv6 prefix (/64 or shorter) networks get their /64 from. Default: a unique local "
                   "/48 generated at the first start and kept in the log.")
@click.option("--metadata-port", type=click.IntRange(0, 65535), default=80, show_default=True,
              help="The metadata server's port (on fe80::a9fe:a9fe and the routable addresses of every network bridge).")
@click.option("--no-metadata", is_flag=True, help="Do not run a metadata server in this process.")
@click.option("--image-store", "image_stores", multiple=True, metavar="NAME=fs:/PATH|NAME=rbd:POOL[:CONF]",
              help="An image store (repeat; the first is the default). Default: local=fs:<state-dir>/image-store.")
@click.option("--debian-12", "debian12", is_flag=True,
              help="Build (once, ~500 MB of Debian packages) and publish the stock image 'debian-12' "
                   "(cloud-init, openssh) on this machine's host agent.")
@file_limit_options
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), envvar="UCLOUD_CACHE",
              help="Where the built-in images are built and kept (default: <state-dir>/cache).")
@click.option("-v", "--verbose", is_flag=True)
def up(store_url: str, state_dir: Path, listen: tuple[str, ...], port: int, hostname: str, accel: str,
       no_agent: bool, admin: str, ldap_urls: tuple[str, ...], ldap_base_dn: str | None, ldap_bind_dn: str | None,
       ldap_bind_password_file: str | None, ldap_tls: str | None, ldap_config: Path | None, session_ttl: float,
       insecure_header_auth: bool, limits_file: Path | None, files_root: Path | None, ipv6_pool: str | None,
       metadata_port: int, no_metadata: bool, image_stores: tuple[str, ...], debian12: bool,
       metadata_url: str | None, underlay: str | None, underlay_address: str | None, max_file_size: str,
       file_quota: str, cache_dir: Path | None, verbose: bool) -> None:
    """Start ucloud on this machine: log, API, scheduler and a host agent."""
    from ucloud.hostagent.agent import nocloud_serial
    from ucloud.hostagent.debianimage import DebianImageError
    from ucloud.hostagent.main import NetworkOptions
    from ucloud.hostagent.tinyguest import TinyGuestError
    from ucloud.imagestore.bootdisk import BootDiskError
    from ucloud.processes.builtin_images import BuiltinImageError

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ldap = {"urls": list(ldap_urls) or None, "base_dn": ldap_base_dn, "bind_dn": ldap_bind_dn,
            "bind_password_file": ldap_bind_password_file, "tls": ldap_tls}
    auth = AuthOptions(insecure_header_auth, ldap, ldap_config, admin, session_ttl)
    if insecure_header_auth and auth.uses_ldap:
        raise click.UsageError("--insecure-header-auth uses no directory: drop the LDAP options")
    try:
        limits = load_limits(limits_file.read_bytes()) if limits_file else DEFAULT_LIMITS
    except ValueError as error:
        raise click.UsageError(f"--limits {limits_file}: {error}") from None
    if metadata_url is not None:
        try:
            nocloud_serial(metadata_url)
        except ValueError as error:
            raise click.UsageError(f"--metadata-url: {error}") from None
    if ipv6_pool is not None:
        try:
            check_pool(ipv6_pool, "--ipv6-pool")
        except InvalidValue as error:
            raise click.UsageError(str(error)) from None
    try:
        parse_stores(image_stores)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    try:
        asyncio.run(run_up(store_url, state_dir.absolute(), listen, port, hostname, accel, not no_agent,
                           auth=auth, limits=limits, files_root=files_root.absolute() if files_root else None,
                           ipv6_pool=ipv6_pool, metadata_port=None if no_metadata else metadata_port,
                           image_stores=image_stores, metadata_url=metadata_url, debian12=debian12,
                           files=file_limits(max_file_size, file_quota),
                           cache_dir=cache_dir.absolute() if cache_dir else None,
                           network=NetworkOptions(underlay=underlay, address=underlay_address, router=True)))
    except InvalidStoreUrl as error:
        raise click.UsageError(str(error)) from None
    except (DirectoryError, PrivateFileError, SecretStoreError, DebianImageError, BuiltinImageError,
            BootDiskError, TinyGuestError) as error:
        raise click.ClickException(str(error)) from None
    except OSError as error:
        raise click.ClickException(str(error)) from None


@click.command("metadata")
@click.option("--store", "store_url", envvar="UCLOUD_STORE", default=f"sqlite://{DEFAULT_STATE_DIR}/events.sqlite",
              show_default=True, help="The log: sqlite:///path or etcd://host:port[,host:port][/prefix].")
@click.option("--listen", multiple=True, metavar="ADDRESS",
              help="Also listen on this address (repeat; '::' is every address). Without it: fe80::a9fe:a9fe and "
                   "the routable addresses of every network bridge of this host.")
@click.option("--port", default=80, show_default=True, type=click.IntRange(0, 65535))
@click.option("--no-link-local", is_flag=True,
              help="Do not put fe80::a9fe:a9fe on this host's network bridges (something else does).")
@click.option("--no-neighbour-check", is_flag=True,
              help="Do not check a link-local source against the kernel's neighbour entry.")
@click.option("-v", "--verbose", is_flag=True)
def metadata(store_url: str, listen: tuple[str, ...], port: int, no_link_local: bool, no_neighbour_check: bool,
             verbose: bool) -> None:
    """Run a metadata server: guests learn their SSH keys, hostname, user data and network
    configuration (ucloud, OpenStack and NoCloud formats; docs/metadata.md). Run one on
    every host; any number of instances may share a host and a port."""
    from ucloud.gateway.metadata import MetadataConfig
    from ucloud.gateway.metadata import serve as serve_metadata

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = MetadataConfig(store_url=store_url, listen=listen, port=port, link_local=not no_link_local,
                            check_neighbour=not no_neighbour_check)
    try:
        asyncio.run(serve_metadata(config))
    except InvalidStoreUrl as error:
        raise click.UsageError(str(error)) from None
    except OSError as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        pass


# -- the daemons, each in a process of its own (docs/operations.md, "Production layout") --


async def run_gateway(store_url: str, state_dir: Path, listen: tuple[str, ...], port: int,
                      auth: AuthOptions, limits: Limits, files_root: Path | None = None,
                      image_stores: tuple[str, ...] = ("local",), files: FileLimits = FileLimits(),
                      host_images: bool = True) -> None:
    authenticator: SessionAuthenticator | None = None
    if auth.insecure_header_auth:
        click.echo("ucloud gateway: WARNING: --insecure-header-auth: the API trusts X-Ucloud-User headers", err=True)
    else:
        private_state_dir(state_dir)
        authenticator = make_authenticator(auth, state_dir)
    store = open_store(store_url)
    try:
        gateway = await start(GatewayConfig(store=store, listen=listen, port=port,
                                            authenticator=authenticator or "header", limits=limits,
                                            files_root=files_root, image_stores=image_stores,
                                            max_file_size=files.max_file_size, file_quota=files.file_quota,
                                            host_images=tuple(sorted(HOST_IMAGES)) if host_images else ()))
        click.echo(f"ucloud gateway: API {gateway.url}, log {store_url}", err=True)
        try:
            await wait_for_signal()
        finally:
            await gateway.stop()
    finally:
        await store.close()
        if authenticator is not None:
            await authenticator.close()


@click.command("gateway")
@click.option("--store", "store_url", envvar="UCLOUD_STORE", required=True,
              help="The log: etcd://host:port[,host:port][/prefix] or sqlite:///path.")
@click.option("--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR, show_default=True,
              help="Users and secrets of the built-in directory (use LDAP when several gateways serve).")
@click.option("--listen", multiple=True, default=("::1", "127.0.0.1"), show_default=True)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--ldap-config", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              envvar="UCLOUD_LDAP_CONFIG", help="A TOML file with an [ldap] table (docs/auth.md).")
@click.option("--insecure-header-auth", is_flag=True,
              help="DEVELOPMENT ONLY: trust X-Ucloud-User/X-Ucloud-Realm as sent, no tokens.")
@click.option("--limits", "limits_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              envvar="UCLOUD_LIMITS", help="A JSON object of size and count limits to change (docs/api.md).")
@click.option("--files-root", type=click.Path(path_type=Path), envvar="UCLOUD_FILES_ROOT",
              help="Users' files (uploads land here; share it with the image scanner). Without it uploads answer 501.")
@click.option("--image-store-name", "image_stores", multiple=True, default=("local",), show_default=True,
              help="The names of the image stores images may be imported into (repeat; the first is the default).")
@file_limit_options
@click.option("--host-images/--no-host-images", default=True, show_default=True,
              help="Accept the names the hosts provide themselves (tiny, debian-12) when the catalogue has no "
                   "image of the name; --no-host-images: catalogue images only (register them with "
                   "'ucloud image builtin').")
@click.option("-v", "--verbose", is_flag=True)
def gateway_command(store_url: str, state_dir: Path, listen: tuple[str, ...], port: int, ldap_config: Path | None,
                    insecure_header_auth: bool, limits_file: Path | None, files_root: Path | None,
                    image_stores: tuple[str, ...], max_file_size: str, file_quota: str, host_images: bool,
                    verbose: bool) -> None:
    """Serve the HTTP API on a log; run as many as you like behind a load balancer."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        limits = load_limits(limits_file.read_bytes()) if limits_file else DEFAULT_LIMITS
    except ValueError as error:
        raise click.UsageError(f"--limits {limits_file}: {error}") from None
    auth = AuthOptions(insecure_header_auth, {}, ldap_config)
    files = file_limits(max_file_size, file_quota)
    try:
        asyncio.run(run_gateway(store_url, state_dir.absolute(), listen, port, auth, limits,
                                files_root.absolute() if files_root else None, image_stores, files, host_images))
    except InvalidStoreUrl as error:
        raise click.UsageError(str(error)) from None
    except (DirectoryError, PrivateFileError, SecretStoreError, OSError) as error:
        raise click.ClickException(str(error)) from None
