"""The host agents' side of the trust boundary: host credentials and the routes hosts write by.

An admin issues a host its own credential (``POST /v1/hosts/{id}/credential``, ``ucloud
host join``): 256 random bits, shown once, only its sha256 recorded in the log
(``host.credential_issued``); issuing again revokes the previous one, removing the host
revokes it too. A host agent started with ``--gateway`` writes only through the routes
under ``/v1/host-agent/``, authenticated by ``Authorization: Bearer <credential>``:

- the host is the credential's, never a name or id in the request;
- a report about a VM is accepted only while the VM is placed on that host (judged in
  the same transaction as the append: 403 naming the VM and its host otherwise);
- nothing else can be written with a host credential, and no user's credential (not
  even an admin's) is accepted on these routes.

So a host that is taken over can misreport only its own VMs; it cannot write any event
it likes (its etcd role has no write access to the log: docs/operations.md).
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias
from uuid import UUID

import msgspec
from aiohttp import web

from ucloud.commands.unit_of_work import Actor
from ucloud.domain import host as host_domain
from ucloud.domain import vm as vm_domain
from ucloud.domain.errors import InvalidValue, Rejected
from ucloud.domain.limits import CEILING
from ucloud.domain.names import NAME_MAX_LENGTH, NAME_PATTERN

from .identity import AuthenticationFailed
from .inputs import check_patterns
from .keys import COMMANDS, CONFIG, LEASES, READ_MODELS, RUNNER, STORE, actor_of
from .problems import PositionNotReached
from .routes import (
    BODY_LIMIT,
    HOST_ID,
    Accepted,
    ApiDoc,
    HostAccepted,
    Param,
    _cores,
    _host_id,
    _meta,
    _require_admin,
    _size,
    answer,
    api_on,
)

host_routes = web.RouteTableDef()
HOST_REALM = "ucloud-hosts"
# The request key the host middleware sets: the host the credential proved.
HOST: Any = web.RequestKey("host", host_domain.Host) if hasattr(web, "RequestKey") else "ucloud.host"
REFUSED = "not a valid host credential (issued by 'ucloud host join'; re-issuing or removing the host revokes it)"
MISSING = "this route takes a host credential: Authorization: Bearer <the credential from 'ucloud host join'>"
CHALLENGE = 'Bearer realm="ucloud-hosts"'


class HostAuthenticationFailed(AuthenticationFailed):
    def __init__(self, message: str) -> None:
        super().__init__(message, CHALLENGE)


api = api_on(host_routes)


async def authenticate_host(request: web.Request) -> host_domain.Host:
    """The host whose credential the request carries (HostAuthenticationFailed otherwise),
    compared with the digest in the hosts read model once it has caught up with the log as
    it is now: a credential issued a moment ago through another gateway works at once, and
    a revoked one (re-issued, host removed) stops at once."""
    scheme, _, credential = request.headers.get("Authorization", "").strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        raise HostAuthenticationFailed(MISSING)
    host_id = host_domain.credential_host(credential)
    if host_id is None:
        raise HostAuthenticationFailed(REFUSED)
    head = await request.app[STORE].head()
    if not await request.app[RUNNER].wait_for(head, request.app[CONFIG].read_timeout):
        raise PositionNotReached(f"the read models did not reach the log's head ({head}) in time; try again")
    host = request.app[READ_MODELS].hosts.by_id.get(host_id)
    if host is None or not host.credential or host.status is host_domain.HostStatus.REMOVED or not (
            hmac.compare_digest(host.credential, host_domain.credential_digest(credential))):
        raise HostAuthenticationFailed(REFUSED)
    return host


def host_of(request: web.Request) -> host_domain.Host:
    host: host_domain.Host = request[HOST]
    return host


# -- bodies ----------------------------------------------------------------------------------------

MAX_STORES = 16
MAX_EVACUATED = 4096  # VMs in one evacuation report (a UUID is 38 bytes of JSON: ~160 KiB)
REASON_MAX_LENGTH = 500
Name = Annotated[str, _meta(max_length=NAME_MAX_LENGTH, pattern=NAME_PATTERN, examples=["local"])]

if TYPE_CHECKING:
    HostCores: TypeAlias = int | str
    HostRam: TypeAlias = int | str
    HostDisk: TypeAlias = int | str
else:
    HostCores = _cores("host_cores")
    HostRam, HostDisk = _size("host_ram"), _size("host_disk")


class HostAgentRegisterBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """This host's measured capacity, its hypervisor and the image stores it reaches."""

    cores: HostCores
    ram: HostRam
    disk: HostDisk
    hypervisor: Annotated[str, _meta(max_length=NAME_MAX_LENGTH, pattern=NAME_PATTERN, examples=["qemu"])] = "qemu"
    stores: Annotated[list[Name], msgspec.Meta(max_length=MAX_STORES, extra_json_schema={"uniqueItems": True})] = []


class HostUpBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A new life of this host's heartbeat lease: its id (the session) and TTL in seconds."""

    session: Annotated[int, msgspec.Meta(ge=1, le=CEILING)]
    lease_ttl: Annotated[float, msgspec.Meta(gt=0, le=3600)]


class HostEvacuatedBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The VMs this host stopped because an admin evacuated it: they move elsewhere."""

    vms: Annotated[list[UUID], msgspec.Meta(max_length=MAX_EVACUATED)]


Observed = Literal["started", "stopped", "rebooted", "crashed", "failed", "deleted", "disk_resized"]


class HostReportBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What this host observed of one of its VMs. ``reason``: for stopped, crashed and
    failed; ``accelerator``: for started (kvm, tcg); ``disk`` and ``online``: for
    disk_resized (the disk's new size in bytes, grown while the guest ran)."""

    observed: Observed
    reason: Annotated[str, _meta(max_length=REASON_MAX_LENGTH, free_text=True,
                                 examples=["the guest shut itself down"])] = ""
    accelerator: Annotated[str, _meta(max_length=16, pattern=r"^[a-z0-9]{0,16}$", examples=["tcg"])] = ""
    disk: Annotated[int, msgspec.Meta(ge=1, le=CEILING)] | None = None
    online: bool = False


class HostCredential(msgspec.Struct, kw_only=True):
    """Shown once: the host's agent proves itself with it (``ucloud-host --credential-file``)."""

    id: UUID
    hostname: str
    credential: str
    position: int


_DECODERS: dict[type, msgspec.json.Decoder[Any]] = {
    HostAgentRegisterBody: msgspec.json.Decoder(HostAgentRegisterBody, strict=False),
    HostUpBody: msgspec.json.Decoder(HostUpBody, strict=False),
    HostEvacuatedBody: msgspec.json.Decoder(HostEvacuatedBody),
    HostReportBody: msgspec.json.Decoder(HostReportBody, strict=False),
}


async def _decode(request: web.Request, body_type: type[Any]) -> Any:
    raw = await request.read()
    if not raw.strip():
        raise InvalidValue("body", "the request needs a JSON object body")
    body = _DECODERS[body_type].decode(raw)
    check_patterns(body)
    return body


# -- the admin issues a credential -----------------------------------------------------------------


@api("POST", "/v1/hosts/{id}/credential", ApiDoc(
    "Issue a host its own credential (admin)", "issueHostCredential", "hosts", status=201, response=HostCredential,
    params=(HOST_ID,), errors=(400, 404, 409, 503),
    description="A new credential for the host's agent, shown only in this answer (the log records its "
                "sha256); the host's previous credential stops working. The agent writes with it through "
                "/v1/host-agent/... only. Outside the admin realm: 404."))
async def issue_host_credential(request: web.Request) -> web.Response:
    host_id = _host_id(request)
    actor = actor_of(request)
    _require_admin(actor)
    outcome = await request.app[COMMANDS].issue_host_credential(actor, host_id)
    hostname = next((getattr(e, "hostname", "") for e in outcome.events), "")
    host = request.app[READ_MODELS].hosts.by_id.get(host_id)
    return answer(HostCredential(id=host_id, hostname=host.hostname if host else hostname,
                                 credential=outcome.result, position=outcome.position), 201, outcome.position)


# -- what a host writes, with its credential ---------------------------------------------------------

REPORT_VM = Param.of("id", "path", "The VM's id; it must be placed on this host.", UUID)


def _host_actor(host: host_domain.Host) -> Actor:
    # The same actor a host agent writing in-process is (hostagent/writes.py): the log
    # reads alike either way. Its rights are the route's: only this host's own writes.
    return Actor(f"host/{host.hostname}", "ucloud-system", is_admin=True)


@api("POST", "/v1/host-agent/register", ApiDoc(
    "A host registers its measured capacity (host credential)", "hostAgentRegister", "host-agent",
    response=HostAccepted, body=HostAgentRegisterBody, max_body=BODY_LIMIT, host=True, errors=(409, 503),
    description="The host is the credential's; its capacity, hypervisor and stores are updated."))
async def host_agent_register(request: web.Request) -> web.Response:
    host = host_of(request)
    body: HostAgentRegisterBody = await _decode(request, HostAgentRegisterBody)
    outcome = await request.app[COMMANDS].register_host(
        _host_actor(host), host.hostname, body.cores, body.ram, body.disk, body.hypervisor, tuple(body.stores))
    return answer(HostAccepted(id=host.id, hostname=host.hostname, position=outcome.position),
                  position=outcome.position)


@api("POST", "/v1/host-agent/up", ApiDoc(
    "A host took its heartbeat lease (host credential)", "hostAgentUp", "host-agent", response=Accepted,
    body=HostUpBody, max_body=BODY_LIMIT, host=True, errors=(404, 409, 503),
    description="Records host.up for this session of the host's heartbeat lease; 422 (field session) "
                "unless the host holds that lease now."))
async def host_agent_up(request: web.Request) -> web.Response:
    host = host_of(request)
    body: HostUpBody = await _decode(request, HostUpBody)
    # A host may say it is up only in a session of the heartbeat lease it really holds:
    # the failure detector's judgement rests on that lease.
    if not await request.app[LEASES].held(host_domain.slice_name(host.id), body.session):
        raise Rejected(f"session: host {host.hostname} holds no heartbeat lease {body.session} now; "
                       "take the lease first", "session")
    outcome = await request.app[COMMANDS].mark_host_up(_host_actor(host), host.id, body.session, body.lease_ttl)
    return answer(Accepted(id=host.id, position=outcome.position), position=outcome.position)


@api("POST", "/v1/host-agent/evacuated", ApiDoc(
    "A host stopped its VMs for an evacuation (host credential)", "hostAgentEvacuated", "host-agent",
    response=Accepted, body=HostEvacuatedBody, max_body=256 * 1024, host=True, errors=(409, 422, 503),
    description="The VMs placed on this host among those named lose their placement (the scheduler places "
                "them elsewhere) and the evacuation ends. 422 unless an admin asked this host to evacuate; "
                "VMs placed on other hosts are left alone."))
async def host_agent_evacuated(request: web.Request) -> web.Response:
    host = host_of(request)
    body: HostEvacuatedBody = await _decode(request, HostEvacuatedBody)
    outcome = await request.app[COMMANDS].evict(_host_actor(host), host.id, list(dict.fromkeys(body.vms)),
                                                "its host was evacuated", evacuated=True, only_if_evacuating=True)
    return answer(Accepted(id=host.id, position=outcome.position), position=outcome.position)


def _report(vm_id: UUID, host_id: UUID, body: HostReportBody) -> vm_domain.VmReport:
    if "\x00" in body.reason:
        raise InvalidValue("reason", "must not contain NUL")
    match body.observed:
        case "started":
            return vm_domain.ReportStarted(vm_id=vm_id, host_id=host_id, accelerator=body.accelerator)
        case "stopped":
            return vm_domain.ReportStopped(vm_id=vm_id, host_id=host_id, reason=body.reason or "stopped by request")
        case "rebooted":
            return vm_domain.ReportRebooted(vm_id=vm_id, host_id=host_id)
        case "crashed":
            return vm_domain.ReportCrashed(vm_id=vm_id, host_id=host_id, reason=body.reason)
        case "failed":
            return vm_domain.ReportFailed(vm_id=vm_id, host_id=host_id, reason=body.reason)
        case "deleted":
            return vm_domain.ReportDeleted(vm_id=vm_id, host_id=host_id)
    if body.disk is None:
        raise InvalidValue("disk", "is required when observed is disk_resized")
    return vm_domain.ReportDiskResized(vm_id=vm_id, host_id=host_id, disk=body.disk, online=body.online)


@api("POST", "/v1/host-agent/vms/{id}/reports", ApiDoc(
    "A host reports what it observed of one of its VMs (host credential)", "hostAgentReport", "host-agent",
    response=Accepted, params=(REPORT_VM,), body=HostReportBody, max_body=BODY_LIMIT, host=True,
    errors=(403, 404, 409, 422, 503),
    description="Accepted only while the VM is placed on the credential's host: 403 naming the VM and the "
                "host it is placed on otherwise, and nothing is recorded. 422 when the VM's state does not "
                "allow it (a deletion of a VM not being deleted)."))
async def host_agent_report(request: web.Request) -> web.Response:
    host = host_of(request)
    vm_id = UUID(request.match_info["id"])  # checked against its schema by the input middleware
    body: HostReportBody = await _decode(request, HostReportBody)
    command = _report(vm_id, host.id, body)
    outcome = await request.app[COMMANDS].report(_host_actor(host), command, reporter=host.id)
    return answer(Accepted(id=vm_id, position=outcome.position), position=outcome.position)
