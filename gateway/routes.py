"""HTTP API v1: thin handlers over the CommandService (writes) and ReadModels (reads).

Each handler decodes its body into a msgspec Struct (400 naming the field on bad
input), calls one command or reads one view, and encodes a response Struct. Errors
are not caught here: the error middleware maps them to problem+json.

Every command answer carries the log ``position`` it reached; every query accepts
``?position=N`` (or the ``X-Ucloud-Position`` header) and first waits until the read
models have reached it, so a client reads its own writes. The routes carry their
documentation (``ApiDoc``), from which gateway/openapi.py builds /v1/openapi.json.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeAlias, TypeVar
from uuid import UUID

import msgspec
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from ucloud.commands.unit_of_work import Actor
from ucloud.domain import host as host_domain
from ucloud.domain import vm as vm_domain
from ucloud.domain.errors import InvalidValue, NotFound, OutOfBounds, Rejected
from ucloud.domain.host import Host, HostRegistered
from ucloud.domain.limits import CEILING
from ucloud.domain.names import (
    HOSTNAME_MAX_LENGTH,
    HOSTNAME_PATTERN,
    NAME_MAX_LENGTH,
    NAME_PATTERN,
    USER_NAME_MAX_LENGTH,
    USER_NAME_PATTERN,
)
from ucloud.domain.network import eui64_address, link_local_address
from ucloud.domain.sshkey import PUBLIC_KEY_MAX_LENGTH, PUBLIC_KEY_PATTERN, SshKey
from ucloud.domain.units import CORES_PATTERN, SIZE_MAX_LENGTH, SIZE_PATTERN
from ucloud.projections.runner import ProjectionRunner
from ucloud.projections.views import NetworksView, VmRow

from .inputs import check_value, schema_of
from .keys import (
    COMMANDS,
    CONFIG,
    FOLLOWER,
    LEASES,
    METRICS,
    READ_MODELS,
    RUNNER,
    STORE,
    VM_CREATE_GUARD,
    actor_of,
)
from .problems import NotReady, PositionNotReached

POSITION_HEADER = "X-Ucloud-Position"
IDEMPOTENCY_HEADER = "Idempotency-Key"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# -- documentation carried by the routes ----------------------------------------------------


def _meta(**constraints: Any) -> msgspec.Meta:
    """msgspec constraints; ``pattern`` goes to the schema only. The domain checks every
    pattern with fullmatch (msgspec's search would let "web\\n" through a "$"), and
    ``limit`` names the GatewayConfig.limits bound the OpenAPI document states as the
    maximum (gateway/openapi.py fills it in per installation)."""
    extra: dict[str, Any] = {}
    if "pattern" in constraints:
        extra["pattern"] = constraints.pop("pattern")
    if "limit" in constraints:
        extra[LIMIT_KEY] = constraints.pop("limit")
    if constraints.pop("free_text", False):
        extra[FREE_TEXT_KEY] = True
    return msgspec.Meta(**constraints, extra_json_schema=extra or None)


LIMIT_KEY = "x-ucloud-limit"  # replaced by "maximum"/"maxItems" in the served document
# A free-text field (user data): any Unicode character but NUL, bounded only in length.
FREE_TEXT_KEY = "x-ucloud-free-text"

# Every field's limits, in its type: lengths and ranges are checked by msgspec while it
# decodes; patterns by the domain with fullmatch; both are in the OpenAPI document.
Name = Annotated[str, _meta(max_length=NAME_MAX_LENGTH, pattern=NAME_PATTERN, examples=["web1"])]
HostName = Annotated[str, _meta(max_length=HOSTNAME_MAX_LENGTH, pattern=HOSTNAME_PATTERN,
                                examples=["node1.example.org"])]
UserName = Annotated[str, _meta(max_length=USER_NAME_MAX_LENGTH, pattern=USER_NAME_PATTERN, examples=["alice"])]
SizeText = Annotated[str, _meta(max_length=SIZE_MAX_LENGTH, pattern=SIZE_PATTERN, examples=["2GiB"])]
CoresText = Annotated[str, _meta(max_length=7, pattern=CORES_PATTERN, examples=["2"])]
PublicKey = Annotated[str, _meta(max_length=PUBLIC_KEY_MAX_LENGTH, pattern=PUBLIC_KEY_PATTERN, examples=[
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICvYBsl/DgCvGh/DMo+nY6kmlyPI24+sT5OvcdsYbW6Q alice@laptop"])]
Position = Annotated[int, msgspec.Meta(ge=0, le=CEILING)]
IdempotencyKey = Annotated[str, _meta(min_length=1, max_length=255, pattern=r"^[!-~]{1,255}$")]


def _size(limit: str) -> Any:
    """Bytes (an integer up to the installation's limit) or a size as people write it."""
    return Annotated[int, _meta(ge=1, le=CEILING, limit=limit)] | SizeText


def _cores(limit: str) -> Any:
    return Annotated[int, _meta(ge=1, le=CEILING, limit=limit)] | CoresText


if TYPE_CHECKING:  # what the handlers see; msgspec reads the annotated types below
    VmCores: TypeAlias = int | str
    HostCores: TypeAlias = int | str
    VmRam: TypeAlias = int | str
    VmDisk: TypeAlias = int | str
    HostRam: TypeAlias = int | str
    HostDisk: TypeAlias = int | str
else:
    VmCores, HostCores = _cores("vm_cores"), _cores("host_cores")
    VmRam, VmDisk = _size("vm_ram"), _size("vm_disk")
    HostRam, HostDisk = _size("host_ram"), _size("host_disk")


@dataclasses.dataclass(frozen=True)
class Param:
    """A path, query or header parameter. Its schema comes from ``type`` (a msgspec
    type) when given; gateway/inputs.py checks every request against it."""

    name: str
    where: str  # "path", "query" or "header"
    description: str
    schema: dict[str, Any] = dataclasses.field(default_factory=lambda: {"type": "string"})
    required: bool = False  # a path parameter always is; a query or header one when this says so

    @classmethod
    def of(cls, name: str, where: str, description: str, value_type: Any, required: bool = False) -> Param:
        return cls(name, where, description, schema_of(value_type), required)


@dataclasses.dataclass(frozen=True)
class ApiDoc:
    summary: str
    operation_id: str
    tag: str
    status: int = 200
    response: Any = None  # a msgspec-describable type of the success body
    description: str = "OK"
    also: tuple[int, ...] = ()  # other success statuses with the same body
    body: type | None = None
    body_required: bool = True  # False: an empty body means every field's default
    params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = ()
    auth: bool = True
    # Authenticated by a host's own credential (gateway/host_routes.py) instead of a user's.
    host: bool = False
    reads: bool = False  # accepts ?position= / X-Ucloud-Position
    media_type: str = "application/json"
    # The largest body this operation takes (413 beyond, before it is read or parsed);
    # None: the gateway's max_body_size. Well above the largest valid body of its type.
    max_body: int | None = None
    # A raw body streamed by the handler itself (an upload), of this media type; the input
    # middleware leaves it unread.
    upload: str | None = None


POSITION_PARAMS = (
    Param.of("position", "query", "Wait until the read models include this log position (read your writes).",
             Position),
    Param.of(POSITION_HEADER, "header", "Same as ?position=.", Position),
)
# A path parameter a route does not declare is a name by the user-name rule (the widest
# of our name rules: resource names are a subset of it).
DEFAULT_PATH_PARAM = Param.of("", "path", "", UserName)
_PATH_NAMES = re.compile(r"{([^}/:]+)(?::[^}]*)?}")


def declared_params(doc: ApiDoc, resource: Any) -> tuple[Param, ...]:
    """Every parameter of a route: its path parameters (declared, or the default) first,
    then the documented query and header ones."""
    path = getattr(resource, "canonical", "") if resource is not None else ""
    declared = {p.name: p for p in doc.params if p.where == "path"}
    in_path = tuple(declared.get(name) or dataclasses.replace(DEFAULT_PATH_PARAM, name=name)
                    for name in _PATH_NAMES.findall(path))
    others = tuple(p for p in (*doc.params, *(POSITION_PARAMS if doc.reads else ())) if p.where != "path")
    return in_path + others


routes = web.RouteTableDef()


def api_on(table: web.RouteTableDef) -> Callable[[str, str, ApiDoc], Callable[[Handler], Handler]]:
    """The ``@api(method, path, doc)`` decorator of one route table: it registers a handler
    under ``method path`` with its documentation (the OpenAPI document is built from it)."""

    def api(method: str, path: str, doc: ApiDoc) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            handler.api_doc = doc  # type: ignore[attr-defined]
            table.route(method, path)(handler)
            return handler

        return register

    return api


api = api_on(routes)


# -- bodies and answers ------------------------------------------------------------------------

# ssh_keys: the list is capped here (before its entries are read) at a ceiling no
# installation exceeds; the installation's own limit (GatewayConfig.limits.vm_ssh_keys)
# is the document's maxItems and is checked by the command side.
SSH_KEYS_CEILING = 1024
# The largest body of the operations here: a create with 1024 key names of 63 characters
# is ~70 KiB, a key line with a comment in \u escapes ~100 KiB. A megabyte of array
# items would cost the JSON decoder ~100 ms to build before any length check; capped
# here, refused before it is read.
BODY_LIMIT = 128 * 1024
# user_data: capped here at a ceiling no installation exceeds (characters); the
# installation's GatewayConfig.limits.vm_user_data is the document's maxLength. Written
# entirely in \u escapes it is six bytes a character, so a create's body may be larger.
USER_DATA_CEILING = 64 * 1024
CREATE_VM_BODY_LIMIT = BODY_LIMIT + 6 * USER_DATA_CEILING


class CreateVmBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Name
    cores: VmCores
    ram: VmRam
    disk: VmDisk
    image: Annotated[str, _meta(max_length=NAME_MAX_LENGTH, pattern=NAME_PATTERN, examples=["debian-12"])]
    ssh_keys: Annotated[list[Annotated[str, _meta(max_length=NAME_MAX_LENGTH, pattern=NAME_PATTERN)]],
                        _meta(max_length=SSH_KEYS_CEILING, limit="vm_ssh_keys")] = []
    restart_policy: vm_domain.RestartPolicy = vm_domain.RestartPolicy.ALWAYS
    owner: UserName | None = None  # admins may create for another user
    # The owner's networks, one NIC on each, in this order (the guest's NIC order).
    networks: Annotated[list[Annotated[str, _meta(max_length=NAME_MAX_LENGTH, pattern=NAME_PATTERN)]],
                        msgspec.Meta(max_length=vm_domain.MAX_NICS,
                                     extra_json_schema={"uniqueItems": True})] = []
    # Served to the guest by the metadata server (cloud-init, ucloud-init). Stored in the
    # log: never put secrets here.
    user_data: Annotated[str, _meta(max_length=USER_DATA_CEILING, limit="vm_user_data", free_text=True,
                                    examples=["#!/bin/sh\necho hello > /tmp/hello\n"])] = ""


class AddSshKeyBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, _meta(max_length=NAME_MAX_LENGTH, pattern=NAME_PATTERN, examples=["laptop"])]
    public_key: PublicKey
    owner: UserName | None = None


class RegisterHostBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    hostname: HostName
    cores: HostCores
    ram: HostRam
    disk: HostDisk
    hypervisor: Annotated[str, _meta(max_length=NAME_MAX_LENGTH, pattern=NAME_PATTERN, examples=["qemu"])] = "qemu"


class HostMaintenanceBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    maintenance: bool


class Accepted(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A command was recorded at ``position``; pass it to queries to read your write."""

    position: int
    id: UUID | None = None
    status: str | None = None


class NicOut(msgspec.Struct, kw_only=True):
    """A VM's network card: its network, MAC (empty until the IPAM allocator gave it), the
    link-local address and, on a network with a /64, its EUI-64 address there."""

    id: UUID
    network: str
    network_id: UUID
    mac: str
    link_local: str | None
    address: str | None


class VmOut(msgspec.Struct, kw_only=True):
    id: UUID
    name: str
    owner: str
    cores: int
    ram: int  # bytes
    disk: int  # bytes
    image: str
    ssh_keys: list[str]
    restart_policy: str
    status: str
    desired: str
    host_id: UUID | None
    reason: str
    accelerator: str
    reboots: int
    created_at: datetime
    updated_at: datetime
    position: int
    nics: list[NicOut] = []


class VmStatusOut(msgspec.Struct, kw_only=True):
    id: UUID
    status: str
    desired: str
    reason: str
    host_id: UUID | None
    reboots: int
    position: int


class VmList(msgspec.Struct, kw_only=True):
    vms: list[VmOut]
    position: int


class SshKeyOut(msgspec.Struct, kw_only=True):
    id: UUID
    name: str
    owner: str
    public_key: str
    fingerprint: str


class SshKeyAccepted(msgspec.Struct, kw_only=True):
    id: UUID
    name: str
    fingerprint: str
    position: int


class SshKeyList(msgspec.Struct, kw_only=True):
    ssh_keys: list[SshKeyOut]
    position: int


class HostOut(msgspec.Struct, kw_only=True):
    id: UUID
    hostname: str
    cores: int
    ram: int
    disk: int
    hypervisor: str
    used_cores: int
    used_ram: int
    used_disk: int
    vms: int
    status: str  # unknown, up, suspect, maintenance, evacuating, dead, removed (docs/operations.md, "Host states")
    session: int  # the agent's heartbeat session (its lease id); 0: never up
    reason: str  # why it was declared dead
    credential: bool = False  # its agent has a host credential ('ucloud host join')


class HostAccepted(msgspec.Struct, kw_only=True):
    id: UUID
    hostname: str
    position: int


class HostList(msgspec.Struct, kw_only=True):
    hosts: list[HostOut]
    position: int


class Health(msgspec.Struct, kw_only=True):
    status: str
    following: bool  # the read models follow the log
    position: int
    head: int
    lag: int


# strict=False: a JSON number with no fraction (2408.0, 1e3) is an integer, as JSON Schema
# (and so the OpenAPI document) says; strings stay strings (every str field is str-only).
_DECODERS: dict[type, msgspec.json.Decoder[Any]] = {
    t: msgspec.json.Decoder(t, strict=False) for t in (CreateVmBody, AddSshKeyBody, RegisterHostBody)
}
_DECODERS[HostMaintenanceBody] = msgspec.json.Decoder(HostMaintenanceBody)  # a boolean is a boolean, never "true"
_ENCODER = msgspec.json.Encoder()


T = TypeVar("T")


async def decode_body(request: web.Request, body_type: type[T]) -> T:
    raw = await request.read()
    if not raw.strip():
        raise InvalidValue("body", "the request needs a JSON object body")
    result: T = _DECODERS[body_type].decode(raw)
    return result


def answer(value: Any, status: int = 200, position: int | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    headers = dict(headers or {})
    if position is not None:
        headers[POSITION_HEADER] = str(position)
    return web.Response(body=_ENCODER.encode(value), status=status, content_type="application/json",
                        headers=headers)


def _parse_position(raw: str, where: str) -> int:
    # The input middleware checked it against Position (ASCII digits, 0 .. 2**63-1).
    return int(check_value(where, POSITION_PARAMS[0].schema, raw))


async def reach_position(request: web.Request, runner: ProjectionRunner | None = None,
                         what: str = "the read models") -> int:
    """Wait (bounded) until the read models (``runner``: another view's runner) include the
    position the client asked for.

    Returns the position the read models have reached, which the answer reflects."""
    runner = runner if runner is not None else request.app[RUNNER]
    wanted = 0
    if "position" in request.query:
        wanted = _parse_position(request.query["position"], "position")
    if POSITION_HEADER in request.headers:
        wanted = max(wanted, _parse_position(request.headers[POSITION_HEADER], POSITION_HEADER))
    if runner.position < wanted:
        head = await request.app[STORE].head()
        if wanted > head:
            # Well-formed, but this log is not that long (yet): 422, naming the field.
            raise OutOfBounds("position", f"{wanted} is beyond the end of the log ({head})")
        timeout = request.app[CONFIG].read_timeout
        if not await runner.wait_for(wanted, timeout):
            raise PositionNotReached(
                f"{what} did not reach position {wanted} within {timeout:g}s "
                f"(they are at {runner.position}); retry")
    return runner.position


def _vm_id(request: web.Request) -> UUID:
    # The input middleware checked the text form (VM_ID: format uuid) first; UUID() alone
    # would also take "{...}", "urn:uuid:..." and 32 bare hex digits.
    return UUID(check_value("id", VM_ID.schema, request.match_info["id"]))


def _visible_owner(actor: Actor, owner: str | None) -> str | None:
    """Whose resources a listing shows: one's own; an admin's choice (None: everyone's)."""
    if actor.is_admin:
        return owner
    if owner is not None and owner != actor.name:
        raise NotFound("only the admin realm may list another user's resources")
    return actor.name


def _nic_out(nic: vm_domain.Nic, networks: NetworksView) -> NicOut:
    network = networks.by_id.get(nic.network_id)
    prefix = network.prefix if network is not None else ""
    return NicOut(id=nic.id, network=network.name if network is not None else "", network_id=nic.network_id,
                  mac=nic.mac, link_local=link_local_address(nic.mac) if nic.mac else None,
                  address=eui64_address(prefix, nic.mac) if nic.mac and prefix else None)


def _vm_out(row: VmRow, networks: NetworksView) -> VmOut:
    vm = row.vm
    return VmOut(
        nics=[_nic_out(n, networks) for n in vm.nics],
        id=vm.id, name=vm.name, owner=vm.owner, cores=vm.cores, ram=vm.ram, disk=vm.disk, image=vm.image,
        ssh_keys=list(vm.ssh_keys), restart_policy=vm.restart_policy.value, status=vm.status.value,
        desired=vm.desired.value, host_id=vm.host_id, reason=vm.reason, accelerator=vm.accelerator,
        reboots=vm.reboots, created_at=row.created_at, updated_at=row.updated_at, position=row.position)


def _own_vm(request: web.Request, vm_id: UUID) -> VmRow:
    row = request.app[READ_MODELS].vms.by_id.get(vm_id)
    actor = actor_of(request)
    if row is None or (row.vm.owner != actor.name and not actor.is_admin):
        raise NotFound(f"VM {vm_id} does not exist")  # another tenant's VM does not exist for you
    return row


def _bool_query(request: web.Request, name: str) -> bool:
    return bool(check_value(name, {"type": "boolean"}, request.query.get(name, "false")))


def _key_out(key: SshKey) -> SshKeyOut:
    return SshKeyOut(id=key.id, name=key.name, owner=key.owner, public_key=key.public_key,
                     fingerprint=key.fingerprint)


def _host_out(host: Host, vms: int, heartbeats: frozenset[str] | None = None) -> HostOut:
    """``heartbeats``: the hosts' heartbeat leases alive now; an up host without one is
    ``suspect`` (gone, not yet declared dead: the detector's grace, docs/operations.md)."""
    status = host_domain.display_status(host)
    if heartbeats is not None and status == host_domain.HostStatus.UP.value and host_domain.slice_name(host.id) not in heartbeats:
        status = "suspect"
    return HostOut(id=host.id, hostname=host.hostname, cores=host.cores, ram=host.ram, disk=host.disk,
                   hypervisor=host.hypervisor, used_cores=host.used_cores, used_ram=host.used_ram,
                   used_disk=host.used_disk, vms=vms, status=status, session=host.session, reason=host.reason,
                   credential=bool(host.credential))


OWNER_PARAM = Param.of("owner", "query", "Admins: only this user's resources (default: everyone's). "
                       "Others may name only themselves.", UserName)
VM_ID = Param.of("id", "path", "The VM's id.", UUID)
KEY_NAME = Param.of("name", "path", "The SSH key's name.", Name)

# -- VMs -------------------------------------------------------------------------------------------


@api("POST", "/v1/vms", ApiDoc(
    "Create a VM", "createVm", "vms", status=202, response=Accepted, also=(200,), body=CreateVmBody,
    max_body=CREATE_VM_BODY_LIMIT,
    description="Recorded; the VM is requested and the scheduler takes it from here. "
                "200 when an Idempotency-Key repeats an earlier identical request (same id). "
                "402 when prices are in force and the owner's account is prepaid: such VMs are ordered "
                "(POST /v1/orders), which checks the balance first.",
    params=(Param.of(IDEMPOTENCY_HEADER, "header",
                     "Retry-safe creation: the same key and body give the same VM; the same key with a "
                     "different body is rejected (422).", IdempotencyKey),),
    errors=(400, 402, 404, 409, 422, 503)))
async def create_vm(request: web.Request) -> web.Response:
    body = await decode_body(request, CreateVmBody)
    key = request.headers.get(IDEMPOTENCY_HEADER)  # checked by the input middleware
    guard = request.app.get(VM_CREATE_GUARD)
    if guard is not None:
        await guard(request, actor_of(request), body.owner or actor_of(request).name)
    outcome = await request.app[COMMANDS].create_vm(
        actor_of(request), name=body.name, cores=body.cores, ram=body.ram, disk=body.disk, image=body.image,
        ssh_keys=body.ssh_keys, restart_policy=body.restart_policy.value, owner=body.owner,
        idempotency_key=key, networks=body.networks, user_data=body.user_data)
    vm_id = outcome.result
    headers = {"Location": f"/v1/vms/{vm_id}"}
    if outcome.events:
        return answer(Accepted(id=vm_id, position=outcome.position, status=vm_domain.Status.REQUESTED.value),
                      202, outcome.position, headers)
    # A repeated request: answer as before, with what the VM is now.
    runner = request.app[RUNNER]
    await runner.wait_for(outcome.position, request.app[CONFIG].read_timeout)
    row = request.app[READ_MODELS].vms.by_id.get(vm_id)
    # The command side compares name, size and image; the rest of the body is compared here.
    asked = (tuple(dict.fromkeys(body.ssh_keys)), body.restart_policy)  # repeats collapse, as on creation
    if row is not None and (row.vm.ssh_keys, row.vm.restart_policy) != asked:
        raise Rejected("this Idempotency-Key was already used for a different request")
    status = row.vm.status.value if row else vm_domain.Status.REQUESTED.value
    return answer(Accepted(id=vm_id, position=outcome.position, status=status), 200, outcome.position, headers)


@api("GET", "/v1/vms", ApiDoc(
    "List VMs", "listVms", "vms", response=VmList,
    description="Your VMs (admins: everyone's, or ?owner='s), oldest first; deleted ones only on request.",
    params=(OWNER_PARAM, Param.of("include_deleted", "query", "Also list deleted VMs.", bool)),
    errors=(400, 404), reads=True))
async def list_vms(request: web.Request) -> web.Response:
    position = await reach_position(request)
    owner = _visible_owner(actor_of(request), request.query.get("owner"))
    include_deleted = _bool_query(request, "include_deleted")
    rows = request.app[READ_MODELS].vms.owned_by(owner)
    networks = request.app[READ_MODELS].networks
    vms = [_vm_out(r, networks) for r in rows if include_deleted or r.vm.status is not vm_domain.Status.DELETED]
    return answer(VmList(vms=vms, position=position), position=position)


@api("GET", "/v1/vms/{id}", ApiDoc("Show a VM", "getVm", "vms", response=VmOut, params=(VM_ID,),
                                   errors=(400, 404), reads=True))
async def get_vm(request: web.Request) -> web.Response:
    vm_id = _vm_id(request)
    position = await reach_position(request)
    return answer(_vm_out(_own_vm(request, vm_id), request.app[READ_MODELS].networks), position=position)


@api("GET", "/v1/vms/{id}/status", ApiDoc(
    "A VM's status", "getVmStatus", "vms", response=VmStatusOut, params=(VM_ID,), errors=(400, 404),
    reads=True))
async def get_vm_status(request: web.Request) -> web.Response:
    vm_id = _vm_id(request)
    position = await reach_position(request)
    vm = _own_vm(request, vm_id)
    return answer(VmStatusOut(id=vm.vm.id, status=vm.vm.status.value, desired=vm.vm.desired.value,
                              reason=vm.vm.reason, host_id=vm.vm.host_id, reboots=vm.vm.reboots,
                              position=vm.position), position=position)


def _lifecycle(command_type: type[vm_domain.StartVm | vm_domain.StopVm | vm_domain.RebootVm | vm_domain.DeleteVm]
               ) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        vm_id = _vm_id(request)
        outcome = await request.app[COMMANDS].vm_command(actor_of(request), command_type(vm_id=vm_id))
        return answer(Accepted(id=vm_id, position=outcome.position), 202, outcome.position)

    return handle


_LIFECYCLE_ERRORS = (400, 404, 409, 422, 503)
api("POST", "/v1/vms/{id}/start", ApiDoc(
    "Start a stopped VM", "startVm", "vms", status=202, response=Accepted, params=(VM_ID,), errors=_LIFECYCLE_ERRORS,
    description="Recorded; the host agent starts the VM."))(_lifecycle(vm_domain.StartVm))
api("POST", "/v1/vms/{id}/stop", ApiDoc(
    "Stop a VM", "stopVm", "vms", status=202, response=Accepted, params=(VM_ID,), errors=_LIFECYCLE_ERRORS,
    description="Recorded; the host agent stops the VM."))(_lifecycle(vm_domain.StopVm))
api("POST", "/v1/vms/{id}/reboot", ApiDoc(
    "Reboot a running VM", "rebootVm", "vms", status=202, response=Accepted, params=(VM_ID,), errors=_LIFECYCLE_ERRORS,
    description="Recorded; the host agent reboots the VM."))(_lifecycle(vm_domain.RebootVm))
api("DELETE", "/v1/vms/{id}", ApiDoc(
    "Delete a VM", "deleteVm", "vms", status=202, response=Accepted, params=(VM_ID,), errors=_LIFECYCLE_ERRORS,
    description="Recorded; a VM never placed is deleted at once, a placed one once its host removed it."
))(_lifecycle(vm_domain.DeleteVm))

# -- SSH keys --------------------------------------------------------------------------------------


@api("GET", "/v1/ssh-keys", ApiDoc(
    "List SSH keys", "listSshKeys", "ssh-keys", response=SshKeyList, params=(OWNER_PARAM,),
    description="Your public keys by name (admins: ?owner='s).", errors=(400, 404), reads=True))
async def list_ssh_keys(request: web.Request) -> web.Response:
    position = await reach_position(request)
    actor = actor_of(request)
    owner = _visible_owner(actor, request.query.get("owner")) or actor.name
    keys = [_key_out(k) for k in request.app[READ_MODELS].sshkeys.of(owner)]
    return answer(SshKeyList(ssh_keys=keys, position=position), position=position)


@api("POST", "/v1/ssh-keys", ApiDoc(
    "Add an SSH public key", "addSshKey", "ssh-keys", status=201, response=SshKeyAccepted, body=AddSshKeyBody,
    max_body=BODY_LIMIT,
    description="Added; VMs created from now on may name it in ssh_keys.", errors=(400, 404, 409, 422, 503)))
async def add_ssh_key(request: web.Request) -> web.Response:
    body = await decode_body(request, AddSshKeyBody)
    outcome = await request.app[COMMANDS].add_ssh_key(actor_of(request), body.name, body.public_key, body.owner)
    fingerprint = getattr(outcome.events[0], "fingerprint", "") if outcome.events else ""
    return answer(SshKeyAccepted(id=outcome.result, name=body.name, fingerprint=fingerprint, position=outcome.position),
                  201, outcome.position, {"Location": f"/v1/ssh-keys/{body.name}"})


@api("DELETE", "/v1/ssh-keys/{name}", ApiDoc(
    "Delete an SSH key", "deleteSshKey", "ssh-keys", response=Accepted, params=(KEY_NAME, OWNER_PARAM),
    errors=(404, 409, 503)))
async def delete_ssh_key(request: web.Request) -> web.Response:
    outcome = await request.app[COMMANDS].delete_ssh_key(
        actor_of(request), request.match_info["name"], request.query.get("owner"))
    return answer(Accepted(position=outcome.position), position=outcome.position)


# -- hosts (admin realm only; everyone else gets 404, as for any resource not theirs) ------------------


def _require_admin(actor: Actor) -> None:
    if not actor.is_admin:
        raise NotFound("hosts are managed in the admin realm")


@api("GET", "/v1/hosts", ApiDoc(
    "List hosts (admin)", "listHosts", "hosts", response=HostList,
    description="Hosts with capacity and what is claimed on them; status suspect: up in the log, its "
                "heartbeat lease gone, not yet declared dead. Outside the admin realm: 404.",
    errors=(400, 404), reads=True))
async def list_hosts(request: web.Request) -> web.Response:
    _require_admin(actor_of(request))
    position = await reach_position(request)
    views = request.app[READ_MODELS]
    heartbeats = frozenset(await request.app[LEASES].holders("host-"))
    hosts = [_host_out(h, len(views.vms.on_host(h.id)), heartbeats) for h in views.hosts.all()]
    return answer(HostList(hosts=hosts, position=position), position=position)


@api("POST", "/v1/hosts", ApiDoc(
    "Register a host (admin)", "registerHost", "hosts", status=201, response=HostAccepted,
    body=RegisterHostBody, also=(200,), max_body=BODY_LIMIT,
    description="201 for a new host; 200 when it was known (its capacity is updated). Outside the "
                "admin realm: 404.", errors=(400, 404, 409, 503)))
async def register_host(request: web.Request) -> web.Response:
    body = await decode_body(request, RegisterHostBody)
    actor = actor_of(request)
    _require_admin(actor)
    outcome = await request.app[COMMANDS].register_host(
        actor, body.hostname, body.cores, body.ram, body.disk, body.hypervisor)
    created = any(isinstance(e, HostRegistered) for e in outcome.events)
    return answer(HostAccepted(id=outcome.result, hostname=body.hostname, position=outcome.position),
                  201 if created else 200, outcome.position)


HOST_ID = Param.of("id", "path", "The host's id (``ucloud host list``).", UUID)


def _host_id(request: web.Request) -> UUID:
    return UUID(check_value("id", HOST_ID.schema, request.match_info["id"]))


@api("POST", "/v1/hosts/{id}/maintenance", ApiDoc(
    "Put a host in or out of maintenance (admin)", "setHostMaintenance", "hosts", response=Accepted,
    params=(HOST_ID,), body=HostMaintenanceBody, max_body=BODY_LIMIT, errors=(400, 404, 409, 503),
    description="In maintenance a host gets no new placements; its VMs keep running. Outside the admin "
                "realm: 404."))
async def set_host_maintenance(request: web.Request) -> web.Response:
    host_id = _host_id(request)
    body = await decode_body(request, HostMaintenanceBody)
    actor = actor_of(request)
    _require_admin(actor)
    outcome = await request.app[COMMANDS].host_command(
        actor, host_domain.SetMaintenance(host_id=host_id, maintenance=body.maintenance))
    return answer(Accepted(id=host_id, position=outcome.position), position=outcome.position)


@api("POST", "/v1/hosts/{id}/evacuate", ApiDoc(
    "Restart a host's VMs on other hosts (admin)", "evacuateHost", "hosts", status=202, response=Accepted,
    params=(HOST_ID,), errors=(400, 404, 409, 422, 503),
    description="Puts the host in maintenance; its agent stops its guests, then the VMs are placed "
                "elsewhere (a host whose agent is not up has its VMs moved at once). 422 when no other "
                "host takes placements. Outside the admin realm: 404."))
async def evacuate_host(request: web.Request) -> web.Response:
    host_id = _host_id(request)
    actor = actor_of(request)
    _require_admin(actor)
    # Judged on the hosts as the log has them now, not on a view a moment behind.
    await request.app[RUNNER].wait_for(await request.app[STORE].head(), request.app[CONFIG].read_timeout)
    hosts = request.app[READ_MODELS].hosts.by_id
    host = hosts.get(host_id)  # an unknown host is the command side's 404
    others = [h for h in hosts.values() if h.id != host_id and h.schedulable]
    if host is not None and host.claims and not others:
        raise Rejected(f"no other host takes placements: evacuating {host.hostname} would leave its "
                       f"{len(host.claims)} VM(s) nowhere to run")
    outcome = await request.app[COMMANDS].host_command(actor, host_domain.Evacuate(host_id=host_id))
    return answer(Accepted(id=host_id, position=outcome.position), 202, outcome.position)


@api("DELETE", "/v1/hosts/{id}", ApiDoc(
    "Remove a host that holds no VM (admin)", "removeHost", "hosts", response=Accepted, params=(HOST_ID,),
    errors=(400, 404, 409, 422, 503),
    description="422 while VMs are placed on it (they are named). Registering it again brings it back. "
                "Outside the admin realm: 404."))
async def remove_host(request: web.Request) -> web.Response:
    host_id = _host_id(request)
    actor = actor_of(request)
    _require_admin(actor)
    outcome = await request.app[COMMANDS].host_command(actor, host_domain.RemoveHost(host_id=host_id))
    return answer(Accepted(id=host_id, position=outcome.position), position=outcome.position)


# -- operations ------------------------------------------------------------------------------------


@api("GET", "/healthz", ApiDoc(
    "Health", "health", "operations", response=Health, auth=False, errors=(503,),
    description="The gateway reaches its event store and its read models follow the log; how far "
                "behind they are. 503 otherwise."))
async def health(request: web.Request) -> web.Response:
    runner = request.app[RUNNER]
    if not request.app[FOLLOWER].running:
        raise NotReady(f"the read models are not following the log (stopped at position {runner.position})")
    head = await request.app[STORE].head()
    return answer(Health(status="ok", following=True, position=runner.position, head=head,
                         lag=max(0, head - runner.position)))


@api("GET", "/metrics", ApiDoc(
    "Prometheus metrics", "metrics", "operations", auth=False, media_type="text/plain",
    response=str, description="Prometheus text exposition format."))
async def metrics(request: web.Request) -> web.Response:
    gauges = request.app[METRICS]
    runner = request.app[RUNNER]
    gauges.lag.set(await runner.lag())
    gauges.position.set(runner.position)
    gauges.snapshot_failures.set(runner.snapshot_failures)
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    response = web.Response(body=encode(gauges.registry))
    response.headers["Content-Type"] = content_type
    return response


@api("GET", "/v1/openapi.json", ApiDoc(
    "This API's OpenAPI 3 description", "openapi", "operations", auth=False, response=dict[str, Any],
    description="OpenAPI 3.1 document built from the route table."))
async def openapi(request: web.Request) -> web.Response:
    from .openapi import openapi_document

    return answer(openapi_document(request.app))
