"""`ucloud up`: the all-in-one on one machine.

The log (SQLite by default, or ``--store etcd://…``), the gateway, the scheduler and
a host agent for this machine, supervised as one group in one process: a component
that fails is logged and started again; Ctrl-C (or SIGTERM) stops everything
cleanly. Guests are QEMU processes of their own and keep running across a restart
of `ucloud up`; the host agent adopts them when it comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import click

from ucloud.commands.service import CommandService
from ucloud.eventstore.url import InvalidStoreUrl, open_store
from ucloud.gateway.app import GatewayConfig, start
from ucloud.hostagent.agent import HostAgent
from ucloud.hostagent.images import ImageCatalogue
from ucloud.hostagent.qemu import QemuDriver
from ucloud.processes.scheduler import Scheduler

log = logging.getLogger("ucloud.up")

DEFAULT_STATE_DIR = Path("/var/lib/ucloud")


async def supervise(name: str, component: Callable[[], Awaitable[None]]) -> None:
    """Run a component forever; if it fails, log why and start it again."""
    delay = 0.5
    while True:
        try:
            await component()
            log.warning("%s returned; starting it again", name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed; starting it again in %.1fs", name, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 30.0)


def write_cli_config(api: str) -> Path | None:
    """Point the CLI at this gateway, unless the user already configured one."""
    home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    path = home / "ucloud" / "config.toml"
    if path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    user = os.environ.get("USER") or "root"
    path.write_text(f'api = "{api}"\nuser = "{user}"\nrealm = "ucloud"\n')
    return path


async def run_up(
    store_url: str,
    state_dir: Path,
    listen: tuple[str, ...],
    port: int,
    hostname: str,
    accel: str,
    with_agent: bool,
    ready: asyncio.Event | None = None,
) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(store_url)
    commands = CommandService(store)
    gateway = await start(GatewayConfig(store=store, listen=listen, port=port))
    components: dict[str, Callable[[], Awaitable[None]]] = {"scheduler": Scheduler(commands, instance="up").run}
    if with_agent:
        images = ImageCatalogue(state_dir / "images")
        click.echo("ucloud: preparing the built-in image 'tiny' (first run downloads a kernel)…", err=True)
        await asyncio.to_thread(images.install_tiny, state_dir / "cache" / "tinyguest")
        driver = QemuDriver(state_dir / "run", accel=accel)  # type: ignore[arg-type]
        agent = HostAgent(commands, driver, images, state_dir=state_dir, hostname=hostname)
        components["host agent"] = agent.run
    tasks = [asyncio.create_task(supervise(name, run), name=name) for name, run in components.items()]
    config_path = write_cli_config(gateway.url)
    click.echo(f"ucloud is up: API {gateway.url}, log {store_url}, state {state_dir}", err=True)
    if config_path:
        click.echo(f"ucloud: wrote {config_path} so the CLI talks to this gateway", err=True)
    click.echo("try:  ucloud vm create --name demo --image tiny --cores 1 --ram 256MB --disk 1GB --wait", err=True)
    click.echo("stop: Ctrl-C (guests keep running and are adopted on the next `ucloud up`)", err=True)
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        click.echo("ucloud: stopping…", err=True)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await gateway.stop()
        await store.close()
        click.echo("ucloud: stopped", err=True)


@click.command()
@click.option("--store", "store_url", envvar="UCLOUD_STORE", default=f"sqlite://{DEFAULT_STATE_DIR}/events.sqlite",
              show_default=True, help="The log: sqlite:///path or etcd://host:port[,host:port][/prefix].")
@click.option("--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR, show_default=True,
              help="Disks, images and QEMU run directories.")
@click.option("--listen", multiple=True, default=("::1", "127.0.0.1"), show_default=True,
              help="Addresses the API listens on (repeat).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--hostname", default=socket.gethostname(), show_default=True, help="This host's name in ucloud.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True,
              help="auto: KVM only when a test boot proves it works, else TCG.")
@click.option("--no-agent", is_flag=True, help="Do not run a host agent on this machine.")
@click.option("-v", "--verbose", is_flag=True)
def up(store_url: str, state_dir: Path, listen: tuple[str, ...], port: int, hostname: str, accel: str,
       no_agent: bool, verbose: bool) -> None:
    """Start ucloud on this machine: log, API, scheduler and a host agent."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(run_up(store_url, state_dir.absolute(), listen, port, hostname, accel, not no_agent))
    except InvalidStoreUrl as error:
        raise click.UsageError(str(error)) from None
    except OSError as error:
        raise click.ClickException(str(error)) from None
