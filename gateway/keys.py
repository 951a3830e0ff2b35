"""Typed keys for what the gateway keeps on its application and requests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.leases import Leases
from ucloud.projections.runner import ProjectionRunner
from ucloud.projections.views import ReadModels

from .config import GatewayConfig
from .identity import Authenticator
from .metrics import GatewayMetrics

if TYPE_CHECKING:
    from .app import ReadModelFollower

CONFIG = web.AppKey("config", GatewayConfig)
STORE = web.AppKey("store", EventStore)
LEASES = web.AppKey("leases", Leases)  # the hosts' heartbeat leases, read for their liveness
COMMANDS = web.AppKey("commands", CommandService)
READ_MODELS = web.AppKey("read_models", ReadModels)
RUNNER = web.AppKey("runner", ProjectionRunner)
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
METRICS = web.AppKey("metrics", GatewayMetrics)
FOLLOWER: web.AppKey[ReadModelFollower] = web.AppKey("follower")
# Asked before a VM is created directly (POST /v1/vms) with the actor and the VM's owner;
# billing sets it to send prepaid accounts through an order when prices are in force.
VM_CREATE_GUARD: web.AppKey[Callable[[web.Request, Actor, str], Awaitable[None]]] = web.AppKey("vm_create_guard")

# Set by the authentication middleware on every request to an authenticated route.
# (aiohttp >= 3.13 has typed request keys; older ones take a plain string.)
ACTOR: Any = web.RequestKey("actor", Actor) if hasattr(web, "RequestKey") else "ucloud.actor"


def actor_of(request: web.Request) -> Actor:
    actor: Actor = request[ACTOR]
    return actor
