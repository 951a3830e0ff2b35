"""Every API endpoint against every kind of caller, with real authentication: users in a
real slapd (and, for the user-management routes, in the built-in directory too), TOTP
seeds in a 0600 file, sessions, a SQLite log.

The endpoints come from the gateway's own OpenAPI document (built from its router), so
a new endpoint fails ``test_every_endpoint_is_in_the_matrix`` until it says here what
a user, another tenant and an admin get; the refusal cases run for it automatically.

Callers: nobody (no credentials), a wrong token, a replayed token, an unknown user, a
disabled user, a forged or expired session, alice on her own resources, alice on bob's
(404: another tenant's resource does not exist for her) and root in the admin realm
(sees and acts on everything). Own/other/admin run twice: with a TOTP per request and
with a session opened by one.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import jwt
import pytest

from tests.support.auth_stack import ADMIN, USER, Directory, Stack, auth_stack, ldap_people
from tests.support.gateway import PUBLIC_KEY
from tests.support.hosts import up_host
from tests.support.slapd import Slapd, slapd_server
from ucloud.auth.otp import unenrol
from ucloud.auth.realms import AuthenticationFailed
from ucloud.auth.sessions import SessionAuthenticator
from ucloud.commands.billing import BillingCommands
from ucloud.commands.networks import NetworkCommands
from ucloud.commands.unit_of_work import SYSTEM, Actor
from ucloud.domain.host import Evacuate, SetMaintenance, slice_name
from ucloud.domain.invoice import INVOICES_STREAM, InvoiceIssued, reference_for
from ucloud.eventstore.leases import Grant, leases_for
from ucloud.gateway.billing_routes import BILLING
from ucloud.gateway.host_routes import MISSING as HOST_MISSING
from ucloud.gateway.host_routes import REFUSED as HOST_REFUSED
from ucloud.gateway.openapi import OPENAPI

pytestmark = pytest.mark.ldap

PUBLIC = AuthenticationFailed.PUBLIC_MESSAGE
SESSION_REFUSED = SessionAuthenticator.SESSION_MESSAGE


@dataclass
class Call:
    path: str
    json: Any = None
    query: dict[str, str] = field(default_factory=dict)
    check: Callable[[Any], None] | None = None  # on the success body
    data: bytes | None = None  # a raw body (an upload)


Prepare = Callable[[Stack, str], Awaitable[Call]]  # the second argument: whose resource ("alice" or "bob")


@dataclass(frozen=True)
class Spec:
    """What alice gets on her own resource, alice on bob's, and root (admin realm) on bob's."""

    prepare: Prepare
    own: int
    other: int
    admin: int
    admin_with_ldap: int | None = None  # the built-in directory's routes answer 501 with LDAP
    with_session: int | None = None  # the answer to any session, where it differs
    auth: bool = True
    # A host agent's route (/v1/host-agent/...): no user's credential opens it (own, other
    # and admin are 401); with host A's credential, on host A's own VM and on host B's.
    host_own: int | None = None
    host_other: int | None = None


async def _head(stack: Stack) -> dict[str, str]:
    return {"position": str(await stack.store.head())}  # read the writes the test just made


def _fixed(path: str, **kwargs: Any) -> Prepare:
    async def prepare(stack: Stack, owner: str) -> Call:
        return Call(path, **kwargs)

    return prepare


def _owned_by(owner: str) -> Callable[[Any], None]:
    def check(body: Any) -> None:
        rows = body.get("vms", body.get("ssh_keys", body.get("files")))
        assert rows and {row["owner"] for row in rows} == {owner}, body

    return check


async def _vm_create(stack: Stack, owner: str) -> Call:
    body: dict[str, Any] = {"name": f"n-{uuid.uuid4().hex[:6]}", "cores": 1, "ram": "256MB", "disk": "1GB",
                            "image": "tiny"}
    if owner != "alice":
        body["owner"] = owner
    return Call("/v1/vms", json=body)


async def _vm_list(stack: Stack, owner: str) -> Call:
    await stack.running_vm(owner)
    query = await _head(stack)
    if owner != "alice":
        query["owner"] = owner
    return Call("/v1/vms", query=query, check=_owned_by(owner))


def _vm(suffix: str, read: bool) -> Prepare:
    async def prepare(stack: Stack, owner: str) -> Call:
        vm_id = await stack.running_vm(owner)
        return Call(f"/v1/vms/{vm_id}{suffix}", query=await _head(stack) if read else {})

    return prepare


async def _key_list(stack: Stack, owner: str) -> Call:
    await stack.ssh_key(owner)
    query = await _head(stack)
    if owner != "alice":
        query["owner"] = owner
    return Call("/v1/ssh-keys", query=query, check=_owned_by(owner))


async def _key_add(stack: Stack, owner: str) -> Call:
    body = {"name": f"k-{uuid.uuid4().hex[:6]}", "public_key": PUBLIC_KEY}
    if owner != "alice":
        body["owner"] = owner
    return Call("/v1/ssh-keys", json=body)


async def _key_delete(stack: Stack, owner: str) -> Call:
    name = await stack.ssh_key(owner)
    return Call(f"/v1/ssh-keys/{name}", query={} if owner == "alice" else {"owner": owner})


async def _file_upload(stack: Stack, owner: str) -> Call:
    # Always into the caller's own directory: there is no uploading into another's.
    return Call(f"/v1/files/u-{uuid.uuid4().hex[:6]}.qcow2", data=b"qcow2?")


async def _file_list(stack: Stack, owner: str) -> Call:
    await stack.file(owner)
    query = await _head(stack)
    if owner != "alice":
        query["owner"] = owner
    return Call("/v1/files", query=query, check=_owned_by(owner))


async def _file_delete(stack: Stack, owner: str) -> Call:
    name = await stack.file(owner)
    return Call(f"/v1/files/{name}", query={} if owner == "alice" else {"owner": owner})


async def _image_create(stack: Stack, owner: str) -> Call:
    body = {"name": f"i-{uuid.uuid4().hex[:6]}", "file": await stack.file(owner)}
    if owner != "alice":
        body["owner"] = owner
    return Call("/v1/images", json=body)


async def _image_list(stack: Stack, owner: str) -> Call:
    await stack.image(owner)
    query = await _head(stack)
    if owner != "alice":
        query["owner"] = owner
    return Call("/v1/images", query=query)


def _image(read: bool) -> Prepare:
    async def prepare(stack: Stack, owner: str) -> Call:
        name = await stack.image(owner)
        query = await _head(stack) if read else {}
        if owner != "alice":
            query["owner"] = owner
        return Call(f"/v1/images/{name}", query=query)

    return prepare


async def _vm_resize(stack: Stack, owner: str) -> Call:
    return Call(f"/v1/vms/{await stack.running_vm(owner)}/resize", json={"disk": "2GiB"})


async def _host_add(stack: Stack, owner: str) -> Call:
    return Call("/v1/hosts", json={"hostname": f"h-{uuid.uuid4().hex[:6]}", "cores": 4, "ram": "8GB",
                                   "disk": "100GB"})


def _host_route(suffix: str, json: Any = None) -> Prepare:
    async def prepare(stack: Stack, owner: str) -> Call:
        host = await stack.commands.register_host(SYSTEM, f"h-{uuid.uuid4().hex[:6]}", 4, "8GB", "100GB")
        return Call(f"/v1/hosts/{host.result}{suffix}", json=json)

    return prepare


async def _throwaway_user(stack: Stack) -> str:
    """A user the admin may change: fresh in the built-in directory; LDAP's bob otherwise
    (the built-in-only routes do not touch him there, and he is enrolled already)."""
    if stack.kind == "builtin":
        name = f"u{uuid.uuid4().hex[:8]}"
        stack.auth.directory.add_user(name)  # type: ignore[attr-defined]
        return name
    return "bob"


def _user_route(suffix: str) -> Prepare:
    async def prepare(stack: Stack, owner: str) -> Call:
        return Call(f"/v1/users/{await _throwaway_user(stack)}{suffix}")

    return prepare


async def _user_enrol(stack: Stack, owner: str) -> Call:
    name = await _throwaway_user(stack)
    await unenrol(stack.secrets, name, USER)  # so that enrolling is new each time

    def check(body: Any) -> None:
        assert body["name"] == name and body["realm"] == USER and body["provisioning_uri"].startswith("otpauth://")
        if stack.kind == "ldap":
            stack.seeds[(name, USER)] = body["seed"]  # bob's new seed, for the cases after this one

    return Call(f"/v1/users/{name}/otp", json={"realm": USER}, check=check)


async def _user_unenrol(stack: Stack, owner: str) -> Call:
    if stack.kind == "ldap":  # do not take bob's seed away: LDAP's carol is enrolled and disabled
        return Call("/v1/users/carol/otp", query={"realm": USER})
    return Call(f"/v1/users/{await _throwaway_user(stack)}/otp", query={"realm": USER})


async def _user_add(stack: Stack, owner: str) -> Call:
    return Call("/v1/users", json={"name": f"u{uuid.uuid4().hex[:8]}", "realms": [USER]})


def _every_user(body: Any) -> None:
    assert {"alice", "bob", "carol", "root"} <= {u["name"] for u in body["users"]}, body



# Billing: prices are everyone's to read and the admin's to set; usage, invoices, balance
# and orders are the owner's (an admin names any owner); accounts, credit and coupons are
# the admin's; the card webhook is signed by the provider, not a user (tests/integration/
# test_billing_card.py proves the signature), and answers 404 where no card provider is set.


def _billing(stack: Stack) -> BillingCommands:
    return stack.gateway.app[BILLING]


def _owners_query(path: str) -> Prepare:
    async def prepare(stack: Stack, owner: str) -> Call:
        query = await _head(stack)
        if owner != "alice":
            query["owner"] = owner
        return Call(path, query=query, check=lambda body: _of_owner(body, owner))

    return prepare


def _of_owner(body: Any, owner: str) -> None:
    rows = body.get("invoices", [body])
    assert all(row["owner"] == owner for row in rows), body


async def _price_set(stack: Stack, owner: str) -> Call:
    return Call("/v1/prices", json={"resource": "core", "amount": "0.01 CHF/hour"})


async def _invoice(stack: Stack, owner: str) -> Call:
    """An invoice of ``owner``'s, issued as the billing process issues them."""
    version = await stack.store.stream_version(INVOICES_STREAM)
    number = version + 1
    now = datetime.now(UTC).replace(microsecond=0)
    await _billing(stack).issue_invoices(SYSTEM, [InvoiceIssued(
        number=number, owner=owner, period_start=now - timedelta(days=1), period_end=now, currency="CHF",
        lines=(), total=0, reference=reference_for(number))], version)
    return Call(f"/v1/invoices/{number}", query=await _head(stack), check=lambda body: _of_owner(body, owner))


def _account(suffix: str, body: dict[str, Any]) -> Prepare:
    async def prepare(stack: Stack, owner: str) -> Call:
        return Call(f"/v1/accounts/{owner}{suffix}", json=body)

    return prepare


async def _coupon_create(stack: Stack, owner: str) -> Call:
    return Call("/v1/coupons", json={"code": f"C{uuid.uuid4().hex[:10]}", "amount": "5 CHF",
                                     "expires": (datetime.now(UTC) + timedelta(days=1)).isoformat()})


async def _coupon_redeem(stack: Stack, owner: str) -> Call:
    """A fresh coupon: alice redeems it for herself (a coupon is nobody's until redeemed)."""
    code = f"C{uuid.uuid4().hex[:10]}"
    await _billing(stack).create_coupon(Actor("root", ADMIN, is_admin=True), code, "5 CHF", datetime.now(UTC) + timedelta(days=1))
    return Call("/v1/coupons/redeem", json={"code": code})


async def _pay_coupon(stack: Stack, owner: str) -> Call:
    redeem = await _coupon_redeem(stack, owner)
    return Call("/v1/payments", json={"method": "coupon", **redeem.json}, query=await _head(stack))


async def _order_quote(stack: Stack, owner: str) -> Call:
    call = await _vm_create(stack, owner)
    return Call("/v1/orders", json=call.json)


async def _order(stack: Stack, owner: str) -> UUID:
    quoted = await _billing(stack).quote_order(Actor(owner), name=f"o-{uuid.uuid4().hex[:6]}", cores=1,
                                               ram="256MiB", disk="1GiB", image="tiny")
    return quoted.result.id


def _order_route(suffix: str, read: bool) -> Prepare:
    async def prepare(stack: Stack, owner: str) -> Call:
        order_id = await _order(stack, owner)
        return Call(f"/v1/orders/{order_id}{suffix}", query=await _head(stack))

    return prepare


# Networks: the owner's (an admin names any owner with ?owner=); a VM is attached only to
# its owner's networks. The IPAM allocator does not run here: its decision is appended
# as it appends it.
_VNIS = iter(range(1000, 2**24))


async def _network(stack: Stack, owner: str) -> str:
    commands = NetworkCommands(stack.commands.repository)
    name = f"n-{uuid.uuid4().hex[:6]}"
    created = await commands.create_network(Actor(owner), name, "auto")
    vni = next(_VNIS)
    await commands.allocate_network(SYSTEM, created.result, vni, f"fd00:0:{vni >> 16:x}:{vni & 0xffff:x}::/64")
    return name


def _owner_query(owner: str) -> dict[str, str]:
    return {} if owner == "alice" else {"owner": owner}


async def _net_create(stack: Stack, owner: str) -> Call:
    body: dict[str, Any] = {"name": f"n-{uuid.uuid4().hex[:6]}", "ipam": "manual", **_owner_query(owner)}
    return Call("/v1/networks", json=body)


async def _net_list(stack: Stack, owner: str) -> Call:
    await _network(stack, owner)
    return Call("/v1/networks", query={**await _head(stack), **_owner_query(owner)},
                check=lambda body: _of_owner({"invoices": body["networks"]}, owner))


async def _net_show(stack: Stack, owner: str) -> Call:
    name = await _network(stack, owner)
    return Call(f"/v1/networks/{name}", query={**await _head(stack), **_owner_query(owner)},
                check=lambda body: _of_owner(body, owner))


async def _net_delete(stack: Stack, owner: str) -> Call:
    return Call(f"/v1/networks/{await _network(stack, owner)}", query=_owner_query(owner))


async def _attach(stack: Stack, owner: str) -> Call:
    vm_id = await stack.running_vm(owner)
    return Call(f"/v1/vms/{vm_id}/networks", json={"network": await _network(stack, owner)})


async def _detach(stack: Stack, owner: str) -> Call:
    vm_id = await stack.running_vm(owner)
    name = await _network(stack, owner)
    await NetworkCommands(stack.commands.repository).attach_network(Actor(owner), vm_id, name)
    return Call(f"/v1/vms/{vm_id}/networks/{name}")


# Host agents: host A holds its own credential; "own" is a VM placed on host A, "other" one
# placed on host B. A user's credential (even an admin's) is no host credential: 401.
_HOSTS: dict[int, tuple[UUID, str]] = {}


async def host_a(stack: Stack) -> tuple[UUID, str]:
    """Host A of this stack (up, with a credential): its id and credential."""
    if id(stack) not in _HOSTS:
        host = await up_host(stack.commands, f"a-{uuid.uuid4().hex[:6]}", 64, "256GiB", "10TiB")
        issued = await stack.commands.issue_host_credential(SYSTEM, host.result)
        _HOSTS[id(stack)] = (host.result, issued.result)
    return _HOSTS[id(stack)]


async def _vm_on(stack: Stack, owner: str) -> UUID:
    """A VM placed on host A (``owner`` alice: the host's own) or on another host (bob)."""
    a = (await host_a(stack))[0]
    # An evacuation of host A asked by an earlier case ends here, so A takes placements again.
    await stack.commands.evict(SYSTEM, a, [], "test", evacuated=True)
    await stack.commands.host_command(SYSTEM, SetMaintenance(host_id=a, maintenance=False))
    on = a if owner == "alice" else (
        await up_host(stack.commands, f"b-{uuid.uuid4().hex[:6]}", 64, "256GiB", "10TiB")).result
    created = await stack.commands.create_vm(Actor(owner), name=f"vm-{uuid.uuid4().hex[:6]}", cores=1,
                                             ram="256MiB", disk="1GiB", image="tiny")
    await stack.commands.place_vm(SYSTEM, created.result, on)
    return created.result


async def _host_report(stack: Stack, owner: str) -> Call:
    return Call(f"/v1/host-agent/vms/{await _vm_on(stack, owner)}/reports", json={"observed": "started"})


_LEASES: dict[int, Grant] = {}


async def _host_up(stack: Stack, owner: str) -> Call:
    """Host A's heartbeat lease, held (a host is up only in a session of its own lease)."""
    if id(stack) not in _LEASES:
        leases = leases_for(stack.store)
        grant = await leases.acquire(slice_name((await host_a(stack))[0]), "host-a", 600)
        await leases.close()
        assert grant is not None
        _LEASES[id(stack)] = grant
    return Call("/v1/host-agent/up", json={"session": _LEASES[id(stack)].token, "lease_ttl": 3})


async def _host_evacuated(stack: Stack, owner: str) -> Call:
    vm = await _vm_on(stack, owner)
    await stack.commands.host_command(SYSTEM, Evacuate(host_id=(await host_a(stack))[0]))
    return Call("/v1/host-agent/evacuated", json={"vms": [str(vm)]})


HOST_ONLY = dict(own=401, other=401, admin=401)
OPEN = Spec(_fixed(""), 200, 200, 200, auth=False)  # path filled in from the route
NOT_FOR_USERS = dict(own=404, other=404)

MATRIX: dict[tuple[str, str], Spec] = {
    ("GET", "/healthz"): OPEN,
    ("GET", "/metrics"): OPEN,
    ("GET", "/v1/openapi.json"): OPEN,
    # A session is not a credential for opening another: 401, as for any credential not accepted here.
    ("POST", "/v1/sessions"): Spec(_fixed("/v1/sessions"), 201, 201, 201, with_session=401),
    ("POST", "/v1/vms"): Spec(_vm_create, 202, 404, 202),
    ("GET", "/v1/vms"): Spec(_vm_list, 200, 404, 200),
    ("GET", "/v1/vms/{id}"): Spec(_vm("", True), 200, 404, 200),
    ("GET", "/v1/vms/{id}/status"): Spec(_vm("/status", True), 200, 404, 200),
    ("POST", "/v1/vms/{id}/start"): Spec(_vm("/start", False), 202, 404, 202),
    ("POST", "/v1/vms/{id}/stop"): Spec(_vm("/stop", False), 202, 404, 202),
    ("POST", "/v1/vms/{id}/reboot"): Spec(_vm("/reboot", False), 202, 404, 202),
    ("DELETE", "/v1/vms/{id}"): Spec(_vm("", False), 202, 404, 202),
    ("GET", "/v1/ssh-keys"): Spec(_key_list, 200, 404, 200),
    ("POST", "/v1/ssh-keys"): Spec(_key_add, 201, 404, 201),
    ("DELETE", "/v1/ssh-keys/{name}"): Spec(_key_delete, 200, 404, 200),
    ("POST", "/v1/vms/{id}/resize"): Spec(_vm_resize, 202, 404, 202),
    ("PUT", "/v1/files/{name}"): Spec(_file_upload, 201, 201, 201),  # always one's own directory
    ("GET", "/v1/files"): Spec(_file_list, 200, 404, 200),
    ("DELETE", "/v1/files/{name}"): Spec(_file_delete, 200, 404, 200),
    ("POST", "/v1/images"): Spec(_image_create, 202, 404, 202),
    ("GET", "/v1/images"): Spec(_image_list, 200, 404, 200),
    ("GET", "/v1/images/{name}"): Spec(_image(True), 200, 404, 200),
    ("DELETE", "/v1/images/{name}"): Spec(_image(False), 202, 404, 202),
    ("GET", "/v1/hosts"): Spec(_fixed("/v1/hosts"), **NOT_FOR_USERS, admin=200),
    ("POST", "/v1/hosts"): Spec(_host_add, **NOT_FOR_USERS, admin=201),
    ("POST", "/v1/hosts/{id}/maintenance"): Spec(_host_route("/maintenance", {"maintenance": True}),
                                                 **NOT_FOR_USERS, admin=200),
    ("POST", "/v1/hosts/{id}/evacuate"): Spec(_host_route("/evacuate"), **NOT_FOR_USERS, admin=202),
    ("DELETE", "/v1/hosts/{id}"): Spec(_host_route(""), **NOT_FOR_USERS, admin=200),
    ("POST", "/v1/hosts/{id}/credential"): Spec(_host_route("/credential"), **NOT_FOR_USERS, admin=201),
    ("POST", "/v1/host-agent/register"): Spec(
        _fixed("/v1/host-agent/register", json={"cores": 64, "ram": "256GiB", "disk": "10TiB"}), **HOST_ONLY,
        host_own=200, host_other=200),  # there is no other: the host is the credential's
    ("POST", "/v1/host-agent/up"): Spec(_host_up, **HOST_ONLY, host_own=200, host_other=200),
    ("POST", "/v1/host-agent/evacuated"): Spec(_host_evacuated, **HOST_ONLY, host_own=200,
                                               host_other=200),  # another host's VM is left alone
    ("POST", "/v1/host-agent/vms/{id}/reports"): Spec(_host_report, **HOST_ONLY, host_own=200, host_other=403),
    ("GET", "/v1/users"): Spec(_fixed("/v1/users", check=_every_user), **NOT_FOR_USERS, admin=200,
                               admin_with_ldap=501),
    ("POST", "/v1/users"): Spec(_user_add, **NOT_FOR_USERS, admin=201, admin_with_ldap=501),
    ("GET", "/v1/users/{name}"): Spec(_user_route(""), **NOT_FOR_USERS, admin=200),
    ("POST", "/v1/users/{name}/disable"): Spec(_user_route("/disable"), **NOT_FOR_USERS, admin=200,
                                               admin_with_ldap=501),
    ("POST", "/v1/users/{name}/enable"): Spec(_user_route("/enable"), **NOT_FOR_USERS, admin=200,
                                              admin_with_ldap=501),
    ("POST", "/v1/users/{name}/otp"): Spec(_user_enrol, **NOT_FOR_USERS, admin=201),
    ("DELETE", "/v1/users/{name}/otp"): Spec(_user_unenrol, **NOT_FOR_USERS, admin=200),
    ("GET", "/v1/prices"): Spec(_fixed("/v1/prices"), 200, 200, 200),
    ("POST", "/v1/prices"): Spec(_price_set, **NOT_FOR_USERS, admin=201),
    ("GET", "/v1/usage"): Spec(_owners_query("/v1/usage"), 200, 404, 200),
    ("GET", "/v1/invoices"): Spec(_owners_query("/v1/invoices"), 200, 404, 200),
    ("GET", "/v1/invoices/{number}"): Spec(_invoice, 200, 404, 200),
    ("GET", "/v1/balance"): Spec(_owners_query("/v1/balance"), 200, 404, 200),
    ("PUT", "/v1/accounts/{owner}"): Spec(_account("", {"kind": "postpaid"}), **NOT_FOR_USERS, admin=200),
    ("POST", "/v1/accounts/{owner}/credits"): Spec(_account("/credits", {"amount": "1 CHF"}), **NOT_FOR_USERS,
                                                   admin=201),
    ("POST", "/v1/coupons"): Spec(_coupon_create, **NOT_FOR_USERS, admin=201),
    ("POST", "/v1/coupons/redeem"): Spec(_coupon_redeem, 200, 200, 200),
    ("POST", "/v1/payments"): Spec(_pay_coupon, 200, 200, 200),
    # The provider's webhook: credentials are not what it checks; without its required
    # signature header every caller gets the same 400 naming it.
    ("POST", "/v1/payments/card/webhook"): Spec(_fixed("/v1/payments/card/webhook"), 400, 400, 400, auth=False),
    ("POST", "/v1/orders"): Spec(_order_quote, 201, 404, 201),
    ("GET", "/v1/orders/{id}"): Spec(_order_route("", True), 200, 404, 200),
    ("POST", "/v1/orders/{id}/confirm"): Spec(_order_route("/confirm", False), 200, 404, 200),
    ("POST", "/v1/networks"): Spec(_net_create, 202, 404, 202),
    ("GET", "/v1/networks"): Spec(_net_list, 200, 404, 200),
    ("GET", "/v1/networks/{name}"): Spec(_net_show, 200, 404, 200),
    ("DELETE", "/v1/networks/{name}"): Spec(_net_delete, 200, 404, 200),
    ("POST", "/v1/vms/{id}/networks"): Spec(_attach, 202, 404, 202),
    ("DELETE", "/v1/vms/{id}/networks/{network}"): Spec(_detach, 202, 404, 202),
}


def operations(stack: Stack) -> list[tuple[str, str]]:
    """(METHOD, path) of every operation the gateway documents, HEAD included."""
    paths = stack.gateway.app[OPENAPI]["paths"]
    return sorted((method.upper(), path) for path, methods in paths.items() for method in methods)


def spec_of(method: str, path: str) -> Spec:
    return MATRIX[("GET" if method == "HEAD" else method, path)]


def filled(path: str) -> str:
    """Any values for the path parameters (the refusals come before a handler looks)."""
    return (path.replace("{id}", str(uuid.uuid4())).replace("{name}", "someone").replace("{owner}", "someone")
            .replace("{network}", "someone")
            .replace("{number}", "1"))


@pytest.fixture(scope="module")
def slapd() -> Iterator[Slapd]:
    with slapd_server(ldap_people()) as server:
        yield server


@pytest.fixture(params=["ldap", "builtin"])
async def stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    kind: Directory = request.param
    slapd = request.getfixturevalue("slapd") if kind == "ldap" else None
    async with auth_stack(tmp_path, kind, slapd) as built:
        yield built


async def test_every_endpoint_is_in_the_matrix(stack: Stack) -> None:
    documented = {("GET" if m == "HEAD" else m, p) for m, p in operations(stack)}
    assert documented - MATRIX.keys() == set(), "new endpoints: say in MATRIX what each caller gets"
    assert MATRIX.keys() - documented == set(), "MATRIX names endpoints the gateway does not have"
    for method, path in operations(stack):
        assert spec_of(method, path).auth == (stack.gateway.app[OPENAPI]["paths"][path][method.lower()]
                                              .get("security") != []), (method, path)


def assert_refused(answer: tuple[int, Any, Any], method: str, detail: str, what: str) -> None:
    status, body, headers = answer
    assert status == 401, (what, status, body)
    assert headers["WWW-Authenticate"], what
    if method != "HEAD":
        assert headers["Content-Type"].startswith("application/problem+json"), what
        assert body["detail"] == detail, (what, body)


async def test_nobody_and_every_bad_credential_is_refused_alike_on_every_endpoint(stack: Stack) -> None:
    foreign_key = jwt.encode({"iss": "ucloud", "sub": "alice", "realm": USER, "iat": 0, "exp": 4e9},
                             b"k" * 32, algorithm="HS256")
    for method, path in operations(stack):
        spec, url = spec_of(method, path), filled(path)
        if not spec.auth:
            status, _, _ = await stack.call(method, url)
            assert status == spec.own, (method, path)  # the same answer with or without credentials
            continue
        wrong = str((int(stack.token("alice", USER)) + 1) % 1_000_000).zfill(6)
        used = stack.token("alice", USER)
        assert (await stack.call("GET", "/v1/vms", stack.totp("alice", USER, used)))[0] == 200
        expired = await stack.session("alice", USER)
        stack.clock.advance(601)
        cases = {
            "nobody": ({}, "missing header X-Ucloud-User"),
            "wrong token": (stack.totp("alice", USER, wrong), PUBLIC),
            "replayed token": (stack.totp("alice", USER, used), PUBLIC),
            "unknown user": (stack.totp("mallory", USER, stack.token("alice", USER)), PUBLIC),
            "disabled user": (stack.totp("carol", USER), PUBLIC),
            "a realm not granted": ({**stack.totp("alice", USER), "X-Ucloud-Realm": ADMIN}, PUBLIC),
            "forged session": ({"Authorization": f"Bearer {foreign_key}"}, SESSION_REFUSED),
            "expired session": (expired, SESSION_REFUSED),
        }
        for what, (headers, detail) in cases.items():
            if spec.host_own is not None:  # a host route: a user's credential is none of its
                detail = HOST_REFUSED if "Authorization" in headers else HOST_MISSING
            assert_refused(await stack.call(method, url, headers), method, detail, f"{what}: {method} {path}")


async def test_own_other_and_admin_get_the_right_answer_on_every_endpoint(stack: Stack) -> None:
    for mode in ("totp", "session"):
        # Every TOTP moves the test's clock one step: open the sessions just before their round.
        sessions = {who: await stack.session(*who) for who in (("alice", USER), ("root", ADMIN))}
        for method, path in operations(stack):
            spec = spec_of(method, path)
            for case, actor, owner, expected in (
                ("own", ("alice", USER), "alice", spec.own),
                ("other", ("alice", USER), "bob", spec.other),
                ("admin", ("root", ADMIN), "bob", spec.admin_with_ldap if stack.kind == "ldap"
                 and spec.admin_with_ldap else spec.admin),
            ):
                call = await spec.prepare(stack, owner)
                url = call.path or path
                if mode == "session" and spec.with_session is not None:
                    expected = spec.with_session
                headers = sessions[actor] if mode == "session" else stack.totp(*actor)
                status, body, _ = await stack.call(method, url, headers if spec.auth else {}, call.json, call.query,
                                                   call.data)
                where = f"{case} ({mode}): {method} {url} -> {status} {body}"
                assert status == expected, where
                if status < 300 and call.check is not None and method != "HEAD":
                    call.check(body)
                if status == 404:  # another tenant's resource, or an admin route, does not exist for you
                    assert body is None or body["type"] == "urn:ucloud:problem:not-found", where


async def test_a_host_credential_opens_only_its_hosts_routes_and_only_for_its_own_vms(stack: Stack) -> None:
    _, credential = await host_a(stack)
    host = {"Authorization": f"Bearer {credential}"}
    for method, path in operations(stack):
        spec = spec_of(method, path)
        for case, owner, expected in (("own", "alice", spec.host_own), ("other", "bob", spec.host_other)):
            call = await spec.prepare(stack, owner)
            if not spec.auth:
                expected = spec.own  # open routes answer alike whoever calls
            elif expected is None:
                expected = 401  # every user route: a host credential is nobody there
            head = await stack.store.head()
            status, body, _ = await stack.call(method, call.path or path, host, call.json, call.query, call.data)
            assert status == expected, f"host {case}: {method} {call.path or path} -> {status} {body}"
            if status == 403:  # refused: nothing was written
                assert await stack.store.head() == head and body["type"] == "urn:ucloud:problem:forbidden"


async def test_an_admin_lists_everyones_resources_and_a_user_only_their_own(stack: Stack) -> None:
    for owner in ("alice", "bob"):
        await stack.running_vm(owner)
        await stack.ssh_key(owner)
    query = {"position": str(await stack.store.head())}
    for listing, key in (("/v1/vms", "vms"), ("/v1/ssh-keys", "ssh_keys")):
        status, body, _ = await stack.call("GET", listing, stack.totp("alice", USER), query=query)
        assert status == 200 and {row["owner"] for row in body[key]} == {"alice"}, body
    status, body, _ = await stack.call("GET", "/v1/vms", stack.totp("root", ADMIN), query=query)
    assert status == 200 and {row["owner"] for row in body["vms"]} == {"alice", "bob"}, body


async def test_a_session_cannot_be_used_by_another_name_and_dies_with_its_user(stack: Stack) -> None:
    alice = await stack.session("alice", USER)
    status, body, _ = await stack.call("GET", "/v1/vms", {**alice, "X-Ucloud-User": "bob"})
    assert status == 401 and "does not match the session" in body["detail"]
    status, body, _ = await stack.call("GET", "/v1/vms", {**alice, "X-Ucloud-Token": "123456"})
    assert status == 401 and "not both" in body["detail"]
    if stack.kind == "builtin":
        stack.auth.directory.disable_user("alice")  # type: ignore[attr-defined]
        status, body, _ = await stack.call("GET", "/v1/vms", alice)
        assert status == 401 and body["detail"] == SESSION_REFUSED
