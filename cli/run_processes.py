"""`ucloud processes`: every process manager in a process of its own (docs/operations.md,
"Production layout").

Its own module, apart from cli/up.py, so that the daemon imports only what it runs: the
gateway, the auth package and the rest of the CLI cost about half a second of its start-up
(docs/performance.md, "Start-up over 100,000 VMs").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from pathlib import Path

import click

from ucloud.commands.service import CommandService
from ucloud.domain.errors import InvalidValue
from ucloud.domain.network import check_pool
from ucloud.eventstore.leases import leases_for
from ucloud.eventstore.url import InvalidStoreUrl, open_store
from ucloud.imagestore.stores import parse_stores
from ucloud.processes import daemon as processes


async def wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def run_processes(store_url: str, settings: processes.ProcessSettings, metrics_host: str = "::1",
                        metrics_port: int | None = None) -> None:
    store = open_store(store_url)
    leases = leases_for(store)
    try:
        made = processes.build(CommandService(store), leases, settings)
        metrics = None
        if metrics_port is not None:
            metrics = await processes.serve_metrics(made.runners, metrics_host, metrics_port)
        work = asyncio.create_task(processes.run_all(made.components))
        click.echo(f"ucloud processes {settings.instance}: {', '.join(made.components)} on {store_url}", err=True)
        stopping = asyncio.create_task(wait_for_signal())
        await asyncio.wait((work, stopping), return_when=asyncio.FIRST_COMPLETED)
        led = [runner for runner in made.runners if runner.leader]
        for task in (work, stopping):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for runner in led:  # a stop on purpose leaves each view it led as a snapshot: the next start reads the tail
            await runner.save_snapshot()
        if metrics is not None:
            await metrics.cleanup()
    finally:
        await leases.close()
        await store.close()


@click.command("processes")
@click.option("--store", "store_url", envvar="UCLOUD_STORE", required=True,
              help="The log: etcd://host:port[,host:port][/prefix] or sqlite:///path.")
@click.option("--instance", default=socket.gethostname(), show_default=True,
              help="This instance's name in the leader leases (unique per instance).")
@click.option("--lease-ttl", type=click.FloatRange(min=1, max=60), default=3.0, show_default=True,
              help="Seconds of a leader lease: a standby takes over about this long after the leader stops.")
@click.option("--declare-after", type=click.FloatRange(min=0), default=0.25, show_default=True,
              help="Seconds a host's heartbeat lease must stay gone before it is declared dead.")
@click.option("--ipv6-pool", envvar="UCLOUD_IPV6_POOL", metavar="PREFIX",
              help="The IPv6 pool networks' /64s come from (as for `ucloud up`).")
@click.option("--files-root", type=click.Path(path_type=Path), envvar="UCLOUD_FILES_ROOT",
              help="Users' files: run the image scanner here (where the files are). Without it, no scanner.")
@click.option("--image-store", "image_stores", multiple=True, metavar="NAME=fs:/PATH|NAME=rbd:POOL[:CONF]",
              help="An image store the image scanner imports into (repeat; the first is the default).")
@click.option("--metrics-listen", default="::1", show_default=True, help="Address of the /metrics endpoint.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve Prometheus metrics (leader, lag, handled, errors per process manager) on this port.")
@click.option("-v", "--verbose", is_flag=True)
def processes_command(store_url: str, instance: str, lease_ttl: float, declare_after: float,
                      ipv6_pool: str | None, files_root: Path | None, image_stores: tuple[str, ...],
                      metrics_listen: str, metrics_port: int | None, verbose: bool) -> None:
    """Run every process manager (scheduler, failure detector, billing, IPAM), leader-elected:
    start as many as you like; one leads each, the others take over."""
    if ipv6_pool is not None:
        try:
            check_pool(ipv6_pool, "--ipv6-pool")
        except InvalidValue as error:
            raise click.UsageError(str(error)) from None
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        stores = parse_stores(image_stores or ("local=fs:/var/lib/ucloud/image-store",))
        asyncio.run(run_processes(store_url, processes.ProcessSettings(
            instance=instance, lease_ttl=lease_ttl, declare_after=declare_after, ipv6_pool=ipv6_pool,
            files_root=files_root.absolute() if files_root else None, image_stores=stores),
            metrics_listen, metrics_port))
    except (InvalidStoreUrl, ValueError) as error:
        raise click.UsageError(str(error)) from None
