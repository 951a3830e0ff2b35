"""`ucloud processes`: every process manager, each under its own leader lease.

Scheduler, failure detector and billing on the framework; the IPAM allocator and the image
scanner (loops of their own still) under the same kind of leader lease.

Any number of instances may run (on any machines, against one log): for each process
manager one instance leads and the others stand by to take over when its lease expires
(processes/framework.py). `ucloud up` runs the same set in its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from ucloud.commands.service import CommandService
from ucloud.domain.limits import TiB
from ucloud.eventstore.leases import Leases
from ucloud.imagestore.stores import ImageStore

from .billing import BillingProcess
from .detector import FailureDetector
from .files import FileScanner
from .framework import ProcessRunner, lead_while_holding
from .images import ImageScanner
from .ipam import IpamAllocator
from .scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessSettings:
    instance: str
    lease_ttl: float = 3.0  # of the process managers' leader leases
    declare_after: float = 0.25  # the detector's grace after a host lease is gone
    snapshot_interval: float = 30.0
    ipv6_pool: str | None = None  # the IPAM allocator's pool (None: the log's, or a new ULA /48)
    # The image scanner runs where the users' files are: only with a files root.
    files_root: Path | None = None
    image_stores: dict[str, ImageStore] = field(default_factory=dict)
    max_image_size: int = 64 * TiB  # the largest virtual size imported


@dataclass
class Processes:
    """The process managers of one `ucloud processes` (or `ucloud up`)."""

    runners: list[ProcessRunner] = field(default_factory=list)
    components: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)


def build(commands: CommandService, leases: Leases | None, settings: ProcessSettings) -> Processes:
    store = commands.store
    made = Processes()
    scheduler = Scheduler(commands, instance=settings.instance)
    detector = FailureDetector(commands, leases, instance=settings.instance,
                               declare_after=settings.declare_after) if leases is not None else None
    billing = BillingProcess(store)  # periods, invoices, prepaid balances, orders
    ipam = IpamAllocator(store, commands.codec, pool=settings.ipv6_pool)  # VNIs, /64s, MACs
    for manager in (scheduler, detector, billing, ipam):
        if manager is None:
            continue
        runner = ProcessRunner(manager, store, leases, instance=settings.instance, lease_ttl=settings.lease_ttl,
                               snapshot_interval=settings.snapshot_interval)
        made.runners.append(runner)
        made.components[manager.name] = runner.run
    if settings.files_root is not None:
        # Imports requested images from users' files (where the files are), on the framework.
        scanner = ImageScanner(commands, settings.image_stores, settings.files_root,
                               max_virtual_size=settings.max_image_size)
        runner = ProcessRunner(scanner, store, leases, instance=settings.instance, lease_ttl=settings.lease_ttl,
                               snapshot_interval=settings.snapshot_interval)
        made.runners.append(runner)
        made.components[scanner.name] = runner.run
        # Records users' files (uploads, sftp): a loop of its own (it watches directories,
        # not the log), run only where it holds its leader lease.
        files = FileScanner(commands, settings.files_root)
        made.components[files.name] = lambda: lead_while_holding(leases, files.name, settings.instance,
                                                                 settings.lease_ttl, files.run)
    return made


def metrics_text(runners: list[ProcessRunner]) -> str:
    """The process managers' figures in Prometheus' text format."""
    lines = []
    figures = (
        ("ucloud_process_leader", "gauge", "1 while this instance leads the process manager", "leader"),
        ("ucloud_process_position", "gauge", "the last log position folded into its view", "position"),
        ("ucloud_process_tracked", "gauge", "its recorded (tracking) position", "tracked"),
        ("ucloud_process_lag", "gauge", "events of interest behind the newest one read", "lag"),
        ("ucloud_process_read_total", "counter", "events read from the log", "read"),
        ("ucloud_process_handled_total", "counter", "events handled", "handled"),
        ("ucloud_process_errors_total", "counter", "failures (it resumes from its tracked position)", "errors"),
        ("ucloud_process_takeovers_total", "counter", "times this instance became the leader", "takeovers"),
        ("ucloud_process_snapshot_failures_total", "counter", "snapshots that could not be saved or read",
         "snapshot_failures"),
    )
    stats = [runner.stats() for runner in runners]
    for metric, kind, help_text, field_name in figures:
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}"]
        for stat in stats:
            lines.append(f'{metric}{{name="{stat.name}"}} {int(getattr(stat, field_name))}')
    return "\n".join(lines) + "\n"


async def serve_metrics(runners: list[ProcessRunner], host: str, port: int) -> web.AppRunner:
    """GET /metrics on host:port (a Prometheus scrape target per instance)."""
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=metrics_text(runners), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def supervise(name: str, component: Callable[[], Awaitable[None]]) -> None:
    """Run a component forever; if it fails or returns, log why and start it again (backing
    off up to 30 s). `ucloud processes` and `ucloud up` supervise their parts with it."""
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


async def run_all(components: dict[str, Callable[[], Awaitable[None]]]) -> None:
    """Run every component; one that fails is logged and started again."""
    tasks = [asyncio.create_task(supervise(name, run), name=name) for name, run in components.items()]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
