"""HTTP API v1 for networks: create, list, show, delete; attach a VM to a network and
detach it (hot-plugged on a running VM by its host agent). Thin handlers over
commands/networks.py and the networks read model; errors go through the problem
middleware. A network belongs to its owner: anyone else's answers 404."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar
from uuid import UUID

import msgspec
from aiohttp import web

from ucloud.commands.networks import NetworkCommands
from ucloud.domain import network as net
from ucloud.domain.errors import InvalidValue, NotFound
from ucloud.domain.names import NAME_MAX_LENGTH, NAME_PATTERN

from .keys import COMMANDS, READ_MODELS, actor_of
from .routes import (
    OWNER_PARAM,
    VM_ID,
    Accepted,
    ApiDoc,
    Param,
    UserName,
    _meta,
    _visible_owner,
    _vm_id,
    answer,
    api_on,
    reach_position,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
NETWORKS = web.AppKey("network_commands", NetworkCommands)
network_routes = web.RouteTableDef()
BODY_LIMIT = 128 * 1024  # as the other routes: far above any valid body, refused before it is read

NetworkName = Annotated[str, _meta(max_length=NAME_MAX_LENGTH, pattern=NAME_PATTERN, examples=["lan"])]


api = api_on(network_routes)


class CreateNetworkBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: NetworkName
    ipam: net.Ipam = net.Ipam.AUTO
    owner: UserName | None = None  # admins may create for another user


class AttachBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    network: NetworkName


class NetworkOut(msgspec.Struct, kw_only=True):
    id: UUID
    name: str
    owner: str
    ipam: str
    status: str  # requested (waiting for IPAM), ready, failed
    reason: str
    vni: int | None
    group: str | None  # the IPv6 multicast group of its VXLAN
    prefix: str | None  # the /64 (manual and auto IPAM)
    router: str | None  # the router host's address in the /64 (auto IPAM)
    vms: list[UUID]


class NetworkList(msgspec.Struct, kw_only=True):
    networks: list[NetworkOut]
    position: int


_DECODERS = {t: msgspec.json.Decoder(t, strict=False) for t in (CreateNetworkBody, AttachBody)}


T = TypeVar("T")


async def _body(request: web.Request, body_type: type[T]) -> T:
    raw = await request.read()
    if not raw.strip():
        raise InvalidValue("body", "the request needs a JSON object body")
    result: T = _DECODERS[body_type].decode(raw)  # type: ignore[index,assignment]
    return result


def network_out(network: net.Network) -> NetworkOut:
    ready = network.status is net.NetworkStatus.READY
    return NetworkOut(
        id=network.id, name=network.name, owner=network.owner, ipam=network.ipam.value,
        status=network.status.value, reason=network.reason, vni=network.vni if ready else None,
        group=network.group if ready else None, prefix=network.prefix or None,
        router=net.router_address(network.prefix) if network.prefix and network.ipam is net.Ipam.AUTO else None,
        vms=network.vms)


NETWORK_NAME = Param.of("name", "path", "The network's name.", NetworkName)
NETWORK_IN_PATH = Param.of("network", "path", "The network's name.", NetworkName)


def _shown_network(request: web.Request) -> net.Network:
    actor = actor_of(request)
    owner = _visible_owner(actor, request.query.get("owner")) or actor.name
    name = request.match_info["name"]
    network = request.app[READ_MODELS].networks.get(owner, name)
    if network is None:
        raise NotFound(f"no network named {name!r}")
    return network


@api("POST", "/v1/networks", ApiDoc(
    "Create a network", "createNetwork", "networks", status=202, response=Accepted, body=CreateNetworkBody,
    max_body=BODY_LIMIT,
    description="Recorded; the IPAM allocator gives it a VNI and (ipam manual or auto) a /64. Read it back "
                "with ?position= until its status is ready (or failed, with the reason).",
    errors=(400, 404, 409, 422, 503)))
async def create_network(request: web.Request) -> web.Response:
    body = await _body(request, CreateNetworkBody)
    outcome = await request.app[NETWORKS].create_network(actor_of(request), body.name, body.ipam.value, body.owner)
    return answer(Accepted(id=outcome.result, position=outcome.position, status=net.NetworkStatus.REQUESTED.value),
                  202, outcome.position, {"Location": f"/v1/networks/{body.name}"})


@api("GET", "/v1/networks", ApiDoc(
    "List networks", "listNetworks", "networks", response=NetworkList, params=(OWNER_PARAM,),
    description="Your networks (admins: everyone's, or ?owner='s).", errors=(400, 404), reads=True))
async def list_networks(request: web.Request) -> web.Response:
    position = await reach_position(request)
    owner = _visible_owner(actor_of(request), request.query.get("owner"))
    networks = [network_out(n) for n in request.app[READ_MODELS].networks.owned_by(owner)]
    return answer(NetworkList(networks=networks, position=position), position=position)


@api("GET", "/v1/networks/{name}", ApiDoc(
    "Show a network", "getNetwork", "networks", response=NetworkOut,
    params=(NETWORK_NAME, Param.of("owner", "query", "Admins: the owner of the network (default: yourself).",
                                   UserName)),
    errors=(400, 404), reads=True))
async def get_network(request: web.Request) -> web.Response:
    position = await reach_position(request)
    return answer(network_out(_shown_network(request)), position=position)


@api("DELETE", "/v1/networks/{name}", ApiDoc(
    "Delete a network", "deleteNetwork", "networks", response=Accepted,
    params=(NETWORK_NAME, Param.of("owner", "query", "Admins: the owner of the network (default: yourself).",
                                   UserName)),
    description="Deleted; its VNI and /64 go back to the pool. Refused (422, naming them) while VMs are "
                "attached.", errors=(400, 404, 409, 422, 503)))
async def delete_network(request: web.Request) -> web.Response:
    outcome = await request.app[NETWORKS].delete_network(actor_of(request), request.match_info["name"],
                                                         request.query.get("owner"))
    return answer(Accepted(position=outcome.position), position=outcome.position)


@api("POST", "/v1/vms/{id}/networks", ApiDoc(
    "Attach a VM to a network", "attachNetwork", "vms", status=202, response=Accepted, body=AttachBody,
    params=(VM_ID,), max_body=BODY_LIMIT,
    description="A new NIC on the VM owner's network; its id is the answer's id. The IPAM allocator gives "
                "it a MAC and the host agent hot-plugs it into a running VM.",
    errors=(400, 404, 409, 422, 503)))
async def attach_network(request: web.Request) -> web.Response:
    vm_id = _vm_id(request)
    body = await _body(request, AttachBody)
    outcome = await request.app[NETWORKS].attach_network(actor_of(request), vm_id, body.network)
    return answer(Accepted(id=outcome.result, position=outcome.position), 202, outcome.position)


@api("DELETE", "/v1/vms/{id}/networks/{network}", ApiDoc(
    "Detach a VM from a network", "detachNetwork", "vms", status=202, response=Accepted,
    params=(VM_ID, NETWORK_IN_PATH),
    description="The NIC is removed (hot-unplugged from a running VM) and its MAC freed.",
    errors=(400, 404, 409, 422, 503)))
async def detach_network(request: web.Request) -> web.Response:
    vm_id = _vm_id(request)
    outcome = await request.app[NETWORKS].detach_network(actor_of(request), vm_id, request.match_info["network"])
    return answer(Accepted(id=vm_id, position=outcome.position), 202, outcome.position)


def setup_networks(app: web.Application) -> None:
    app[NETWORKS] = NetworkCommands(app[COMMANDS].repository)
    app.add_routes(network_routes)

