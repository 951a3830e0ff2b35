"""The gateway application: ``init_app(config)`` for tests and production, ``serve(config)``.

The gateway is stateless: everything it knows comes from the event store. It writes
through the CommandService and answers queries from read models that a
ProjectionRunner keeps up to date in a background task, so any number of gateways
on one log serve the same data.

Middlewares, outermost first: metrics (counts every answer, errors included), the
one error middleware (everything becomes problem+json), authentication (sets
``request[ACTOR]`` from the configured Authenticator), input (parameters against their
schemas, the body's media type and encoding: gateway/inputs.py). What aiohttp refuses
before any middleware (an over-long request line) is answered by gateway/lowlevel.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler

from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.domain.catalogue import build_codec
from ucloud.eventstore.leases import leases_for
from ucloud.eventstore.url import open_store
from ucloud.projections.runner import ProjectionRunner
from ucloud.projections.views import ReadModels

from .auth_routes import auth_routes
from .billing_routes import setup_billing
from .config import GatewayConfig
from .host_routes import HOST, authenticate_host, host_routes
from .identity import (
    AuthenticationFailed,
    Authenticator,
    HeaderAuthenticator,
    resolve_authenticator,
)
from .image_routes import image_routes
from .inputs import input_middleware
from .keys import (
    ACTOR,
    AUTHENTICATOR,
    COMMANDS,
    CONFIG,
    FOLLOWER,
    LEASES,
    METRICS,
    READ_MODELS,
    RUNNER,
    STORE,
    actor_of,
)
from .lowlevel import ProblemAppRunner
from .metrics import GatewayMetrics
from .network_routes import setup_networks
from .openapi import OPENAPI, build_openapi
from .problems import error_middleware
from .routes import routes

__all__ = [
    "ACTOR", "AUTHENTICATOR", "COMMANDS", "CONFIG", "FOLLOWER", "METRICS", "READ_MODELS", "RUNNER", "STORE",
    "AuthenticationFailed", "Authenticator", "GatewayConfig", "HeaderAuthenticator", "ReadModelFollower", "RunningGateway",
    "actor_of", "init_app", "serve", "start",
]

log = logging.getLogger(__name__)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Ask the configured Authenticator who calls; routes documented ``auth=False`` are open."""
    doc = getattr(request.match_info.handler, "api_doc", None)
    if doc is None or not doc.auth:  # open routes, and aiohttp's own 404/405 answers
        return await handler(request)
    if doc.host:  # a host agent's routes: its own credential, never a user's
        host = await authenticate_host(request)
        request[HOST] = host
        return await handler(request)
    authenticator = request.app[AUTHENTICATOR]
    result = authenticator.authenticate(request.headers, request.remote or "")
    actor = await result if inspect.isawaitable(result) else result
    if not isinstance(actor, Actor):
        raise TypeError(f"{type(authenticator).__name__}.authenticate returned {actor!r}, not an Actor")
    request[ACTOR] = actor
    return await handler(request)


class ReadModelFollower:
    """Keeps the read models following the log in a background task.

    An outage only delays them: ``ProjectionRunner.run`` restores from the latest
    snapshot (or keeps the state it has when there is none), so starting it again
    after a failure never applies an event twice."""

    def __init__(self, runner: ProjectionRunner) -> None:
        self.runner = runner
        self.task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self) -> None:
        if not self.running:
            self.task = asyncio.create_task(self._follow(), name="gateway-read-models")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    async def _follow(self) -> None:
        delay = 0.1
        while True:
            reached = self.runner.position
            try:
                await self.runner.run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("read models stopped following the log at position %d; retrying",
                              self.runner.position)
            delay = 0.1 if self.runner.position > reached else min(delay * 2, 5.0)
            await asyncio.sleep(delay)


async def _projections(app: web.Application) -> AsyncIterator[None]:
    app[FOLLOWER].start()
    yield
    await app[FOLLOWER].stop()


def init_app(config: GatewayConfig) -> web.Application:
    """A ready-to-run gateway application. Call it inside the event loop that will run it."""
    owns_store = config.store is None
    store = config.store if config.store is not None else open_store(config.store_url)
    codec = build_codec()
    read_models = ReadModels()
    metrics = GatewayMetrics()

    app = web.Application(
        middlewares=[metrics.middleware(), error_middleware, auth_middleware, input_middleware],
        client_max_size=config.max_body_size,
    )
    app[CONFIG] = config
    app[STORE] = store
    app[LEASES] = leases_for(store)
    app[COMMANDS] = CommandService(store, codec, limits=config.limits, image_stores=config.image_stores,
                                   host_images=frozenset(config.host_images))
    app[READ_MODELS] = read_models
    app[RUNNER] = ProjectionRunner(store, codec, read_models.all(), name=config.projection_name,
                                   snapshot_interval=config.snapshot_interval)
    app[FOLLOWER] = ReadModelFollower(app[RUNNER])
    app[AUTHENTICATOR] = resolve_authenticator(config.authenticator)
    if isinstance(app[AUTHENTICATOR], HeaderAuthenticator):
        log.warning("the gateway trusts X-Ucloud-User/X-Ucloud-Realm as sent (header authentication): "
                    "anyone who reaches it can act as anyone; for development and tests only")
    app[METRICS] = metrics
    app.add_routes(routes)
    app.add_routes(auth_routes)  # sessions and users (gateway/auth_routes.py)
    setup_networks(app)  # networks, attach/detach (gateway/network_routes.py)
    setup_billing(app)  # prices, usage, invoices, balance, coupons (gateway/billing_routes.py)
    app.add_routes(image_routes)  # files, images, VM resize (gateway/image_routes.py)
    app.add_routes(host_routes)  # host credentials and the host agents' writes (gateway/host_routes.py)
    app[OPENAPI] = build_openapi(app)  # refuses a route without documentation, now rather than later

    if owns_store:
        async def close_store(app: web.Application) -> AsyncIterator[None]:
            yield
            await store.close()

        app.cleanup_ctx.append(close_store)  # registered first, so it runs after the runner stopped
    app.cleanup_ctx.append(_projections)

    async def close_leases(app: web.Application) -> AsyncIterator[None]:
        yield
        await app[LEASES].close()

    app.cleanup_ctx.append(close_leases)
    return app


@dataclasses.dataclass
class RunningGateway:
    app: web.Application
    runner: web.AppRunner
    addresses: list[tuple[str, int]]

    @property
    def url(self) -> str:
        host, port = self.addresses[0]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start(config: GatewayConfig) -> RunningGateway:
    """Serve the gateway on ``config.listen`` and return at once.

    The first address must bind; later ones are skipped with a warning when they
    cannot (a machine without IPv4 loopback). With port 0 the first address picks a
    free port and the others use the same one."""
    app = init_app(config)
    runner = ProblemAppRunner(app, access_log=None, max_line_size=config.max_line_size,
                              max_field_size=config.max_line_size)
    await runner.setup()
    addresses: list[tuple[str, int]] = []
    port = config.port
    try:
        for index, host in enumerate(config.listen):
            site = web.TCPSite(runner, host, port)
            known = len(runner.addresses)
            try:
                await site.start()
            except OSError as error:
                if index == 0:
                    raise OSError(error.errno, f"cannot listen on [{host}]:{port}: {error.strerror}") from error
                log.warning("not listening on %s port %d: %s", host, port, error.strerror)
                continue
            bound = runner.addresses[known][1] if len(runner.addresses) > known else port
            port = bound
            addresses.append((host, bound))
    except BaseException:
        await runner.cleanup()
        raise
    log.info("ucloud gateway listening on %s", ", ".join(f"[{h}]:{p}" for h, p in addresses))
    return RunningGateway(app, runner, addresses)


async def serve(config: GatewayConfig) -> None:
    """Run the gateway until cancelled (production entry point)."""
    gateway = await start(config)
    try:
        await asyncio.Event().wait()
    finally:
        await gateway.stop()
