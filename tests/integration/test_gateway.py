"""The HTTP API v1 against real stores (memory, SQLite, etcd): every route, every error
class as problem+json, idempotency, read-your-writes, OpenAPI completeness, metrics,
and two stateless gateways on one etcd log.

No scheduler or host agent runs here: tests drive placement and observations through
the CommandService, as those components would.
"""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import BACKENDS, open_store, unique_prefix
from tests.support.gateway import ADMIN, OTHER_KEY, PUBLIC_KEY, Api, drive_to_running, user, vm_body
from ucloud.commands.unit_of_work import SYSTEM, Actor
from ucloud.domain import vm as vm_domain
from ucloud.eventstore.errors import (
    DataError,
    InvalidAppend,
    StreamConflict,
    TrackingConflict,
    UnavailableError,
)
from ucloud.eventstore.etcd import EtcdEventStore
from ucloud.eventstore.memory import MemoryEventStore
from ucloud.eventstore.url import InvalidStoreUrl
from ucloud.gateway.app import (
    COMMANDS,
    FOLLOWER,
    READ_MODELS,
    RUNNER,
    AuthenticationFailed,
    GatewayConfig,
    init_app,
    start,
)
from ucloud.gateway.identity import HeaderAuthenticator, resolve_authenticator
from ucloud.gateway.keys import LEASES
from ucloud.gateway.openapi import build_openapi
from ucloud.gateway.problems import problem_for

PROBLEM = "application/problem+json"


def rsa_key(bits: int) -> str:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = rsa.generate_private_key(65537, bits).public_key()
    return key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode() + " me@host"


@dataclass
class Gateway:
    app: web.Application
    client: TestClient[Any, Any]

    def as_(self, name: str, realm: str | None = None) -> Api:
        return Api(self.client, user(name, realm))

    @property
    def admin(self) -> Api:
        return Api(self.client, ADMIN)

    @property
    def anonymous(self) -> Api:
        return Api(self.client, {})


@pytest.fixture(params=BACKENDS)
async def gw(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Gateway]:
    if request.param == "etcd":
        request.applymarker(pytest.mark.etcd)
    store = await open_store(request.param, tmp_path, request)
    app = init_app(GatewayConfig(store=store, read_timeout=2.0))
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield Gateway(app, client)
    finally:
        await client.close()
        await store.close()


def assert_problem(status: int, body: Any, response: aiohttp.ClientResponse, expected: int,
                   detail: str | None = None, field: str | None = None) -> None:
    assert status == expected, body
    assert response.content_type == PROBLEM
    assert body["status"] == expected
    assert body["type"].startswith("urn:ucloud:problem:")
    assert body["title"]
    assert body["detail"]
    if detail is not None:
        assert re.search(detail, body["detail"]), body["detail"]
    if field is not None:
        assert body.get("field") == field, body


# -- VMs -------------------------------------------------------------------------------------------


async def test_a_created_vm_is_read_back_at_the_position_its_creation_returned(gw: Gateway) -> None:
    alice = gw.as_("alice")
    status, created, response = await alice.call("POST", "/v1/vms", vm_body("web1"))
    assert status == 202, created
    assert created["status"] == "requested"
    assert response.headers["Location"] == f"/v1/vms/{created['id']}"
    assert int(response.headers["X-Ucloud-Position"]) == created["position"] > 0

    listing = await alice.ok("GET", f"/v1/vms?position={created['position']}")
    assert [vm["id"] for vm in listing["vms"]] == [created["id"]]
    assert listing["position"] >= created["position"]
    vm = await alice.ok("GET", f"/v1/vms/{created['id']}", headers={"X-Ucloud-Position": str(created["position"])})
    assert (vm["name"], vm["owner"], vm["cores"], vm["ram"], vm["disk"], vm["image"]) == (
        "web1", "alice", 2, 2 * 1024**3, 10 * 1024**3, "debian-12")
    assert (vm["status"], vm["desired"], vm["restart_policy"], vm["host_id"]) == ("requested", "running", "always", None)
    status_only = await alice.ok("GET", f"/v1/vms/{created['id']}/status?position={created['position']}")
    assert status_only["status"] == "requested" and status_only["id"] == created["id"]


async def test_sizes_are_accepted_as_people_write_them(gw: Gateway) -> None:
    alice = gw.as_("alice")
    created = await alice.ok("POST", "/v1/vms", vm_body("small", cores="3", ram="512mb", disk=1073741824))
    vm = await alice.ok("GET", f"/v1/vms/{created['id']}?position={created['position']}")
    assert (vm["cores"], vm["ram"], vm["disk"]) == (3, 512 * 1024**2, 1024**3)
    created = await alice.ok("POST", "/v1/vms", vm_body("big", ram="1 TiB", disk="2GiB", restart_policy="never"))
    vm = await alice.ok("GET", f"/v1/vms/{created['id']}?position={created['position']}")
    assert (vm["ram"], vm["disk"], vm["restart_policy"]) == (1024**4, 2 * 1024**3, "never")


@pytest.mark.parametrize(("body", "field", "detail"), [
    (vm_body(ram="2XB"), "ram", "'2XB' is not a size"),
    (vm_body(disk="-1GB"), "disk", "not a size"),
    (vm_body(ram=0), "ram", "Expected `int` >= 1"),
    (vm_body(cores=2.5), "cores", "Expected `int \\| str`, got `float`"),
    (vm_body(cores=0), "cores", "Expected `int` >= 1"),
    (vm_body(name="web\n"), "name", "is not a name"),
    (vm_body(name="Web1"), "name", "is not a name"),
    (vm_body(cores="١٢"), "cores", "not a whole number of cores"),
    (vm_body(ram="1" + " " * 100 + "x"), "ram", "length <= 48"),
    (vm_body(ram="9" * 300), "ram", "length <= 48"),
    (vm_body(ssh_keys=["k"] * 2000), "ssh_keys", "length <= 1024"),
    (vm_body(ram=2**70), "ram", "<= 9223372036854775807"),
    (vm_body(ram=True), "ram", "got `bool`"),
    (vm_body(name="not a hostname"), "name", "hostname"),
    (vm_body(image=""), "image", "is not a name"),
    (vm_body(restart_policy="sometimes"), "restart_policy", "Invalid enum value 'sometimes'"),
    (vm_body(ssh_keys=[1]), "ssh_keys[0]", "Expected `str`"),
    ({"cores": 1, "ram": "1G", "disk": "1G", "image": "x"}, "name", "missing required field `name`"),
    (vm_body(colour="blue"), "colour", "unknown field `colour`"),
])
async def test_a_bad_vm_body_answers_400_naming_the_field(gw: Gateway, body: Any, field: str, detail: str) -> None:
    status, problem, response = await gw.as_("alice").call("POST", "/v1/vms", body)
    assert_problem(status, problem, response, 400, detail, field)
    assert problem["detail"].startswith(field.split("[")[0])


@pytest.mark.parametrize(("body", "field", "detail"), [
    (vm_body(ram="5TiB"), "ram", "more than this installation allows for a VM's RAM"),
    (vm_body(disk="99999999999999999999P"), "disk", "more than this installation allows for a VM's disk"),
    (vm_body(cores="2000"), "cores", "more than this installation allows for a VM's cores"),
    (vm_body(cores="0"), "cores", "at least 1"),
    (vm_body(ram="1.3B"), "ram", "not a whole number of bytes"),
    (vm_body(ram="8MiB"), "ram", "at least 16MiB"),
    (vm_body(ram="0"), "ram", "must be positive"),
    (vm_body(ssh_keys=["k"] * 33), "ssh_keys", "at most 32"),
    (vm_body(ssh_keys=["nokey"]), "ssh_keys", "no SSH key named 'nokey'"),
])
async def test_a_well_formed_value_beyond_the_limits_answers_422_naming_the_field(
        gw: Gateway, body: Any, field: str, detail: str) -> None:
    status, problem, response = await gw.as_("alice").call("POST", "/v1/vms", body)
    assert_problem(status, problem, response, 422, detail, field)


@pytest.mark.parametrize(("data", "detail"), [
    (b"{", "not valid JSON"),
    (b"", "needs a JSON object body"),
    (b"[1, 2]", "must be a JSON object"),
    (b"\xff\xfe", "not valid UTF-8"),
    (b'{"name": "web\xff"}', "not valid UTF-8"),
])
async def test_a_body_that_is_not_a_json_object_answers_400(gw: Gateway, data: bytes, detail: str) -> None:
    status, problem, response = await gw.as_("alice").call(
        "POST", "/v1/vms", data=data, headers={"Content-Type": "application/json"})
    assert_problem(status, problem, response, 400, detail)


async def test_a_body_over_the_size_limit_answers_413(gw: Gateway) -> None:
    status, problem, response = await gw.as_("alice").call(
        "POST", "/v1/ssh-keys", data=b'{"name": "' + b"x" * (2 * 1024 * 1024) + b'"}')
    assert_problem(status, problem, response, 413)


async def test_an_unknown_vm_answers_404_and_a_malformed_id_400(gw: Gateway) -> None:
    alice = gw.as_("alice")
    missing = uuid.uuid4()
    for method, path in [("GET", f"/v1/vms/{missing}"), ("GET", f"/v1/vms/{missing}/status"),
                         ("POST", f"/v1/vms/{missing}/start"), ("POST", f"/v1/vms/{missing}/stop"),
                         ("POST", f"/v1/vms/{missing}/reboot"), ("DELETE", f"/v1/vms/{missing}")]:
        status, problem, response = await alice.call(method, path)
        assert_problem(status, problem, response, 404, str(missing))
    status, problem, response = await alice.call("GET", "/v1/vms/not-a-uuid")
    assert_problem(status, problem, response, 400, "not a UUID", "id")
    status, problem, response = await alice.call("POST", "/v1/vms/not-a-uuid/stop")
    assert_problem(status, problem, response, 400, "not a UUID", "id")
    # Python's UUID() takes these too; the document's format uuid does not.
    for other_form in (missing.hex, f"urn:uuid:{missing}", f"{missing}%0A", "%D9%A1" + str(missing)[1:]):
        status, problem, response = await alice.call("GET", f"/v1/vms/{other_form}")
        assert_problem(status, problem, response, 400, "not a UUID", "id")


async def test_another_tenants_vm_answers_404_exactly_like_a_missing_one(gw: Gateway) -> None:
    alice, bob = gw.as_("alice"), gw.as_("bob")
    created = await alice.ok("POST", "/v1/vms", vm_body("secret"))
    position = created["position"]
    vm_id = created["id"]
    for method, path in [("GET", f"/v1/vms/{vm_id}?position={position}"),
                         ("GET", f"/v1/vms/{vm_id}/status?position={position}"),
                         ("POST", f"/v1/vms/{vm_id}/stop"), ("POST", f"/v1/vms/{vm_id}/start"),
                         ("POST", f"/v1/vms/{vm_id}/reboot"), ("DELETE", f"/v1/vms/{vm_id}")]:
        status, problem, response = await bob.call(method, path)
        assert_problem(status, problem, response, 404, f"VM {vm_id} does not exist")
    assert (await bob.ok("GET", f"/v1/vms?position={position}"))["vms"] == []
    status, problem, response = await bob.call("GET", "/v1/vms?owner=alice")
    assert_problem(status, problem, response, 404)
    # Still there, untouched, for its owner.
    assert (await alice.ok("GET", f"/v1/vms/{vm_id}"))["status"] == "requested"
    # A realm is not a name: "alice" in another realm is still alice for ownership, not an admin.
    assert (await gw.as_("alice", "ucloud").ok("GET", f"/v1/vms/{vm_id}"))["owner"] == "alice"


async def test_admins_see_every_vm_and_may_filter_by_owner(gw: Gateway) -> None:
    a = await gw.as_("alice").ok("POST", "/v1/vms", vm_body("a1"))
    b = await gw.as_("bob").ok("POST", "/v1/vms", vm_body("b1"))
    position = max(a["position"], b["position"])
    everyone = await gw.admin.ok("GET", f"/v1/vms?position={position}")
    assert {vm["id"] for vm in everyone["vms"]} == {a["id"], b["id"]}
    only_bob = await gw.admin.ok("GET", "/v1/vms?owner=bob")
    assert [vm["id"] for vm in only_bob["vms"]] == [b["id"]]
    assert (await gw.admin.ok("GET", f"/v1/vms/{a['id']}"))["owner"] == "alice"
    # An admin may act for a user: create in their name, stop their VM.
    made = await gw.admin.ok("POST", "/v1/vms", vm_body("for-carol", owner="carol"))
    carol = await gw.as_("carol").ok("GET", f"/v1/vms/{made['id']}?position={made['position']}")
    assert carol["owner"] == "carol"
    status, problem, response = await gw.as_("bob").call("POST", "/v1/vms", vm_body("for-carol", owner="carol"))
    assert_problem(status, problem, response, 404, "admin realm")


async def test_the_vm_lifecycle_through_the_api(gw: Gateway) -> None:
    alice = gw.as_("alice")
    commands = gw.app[COMMANDS]
    created = await alice.ok("POST", "/v1/vms", vm_body("life"))
    vm_id = uuid.UUID(created["id"])
    host_id = await drive_to_running(commands, vm_id)
    position = (await commands.report(SYSTEM, vm_domain.ReportStarted(vm_id=vm_id, host_id=host_id))).position
    vm = await alice.ok("GET", f"/v1/vms/{vm_id}?position={position}")
    assert (vm["status"], vm["host_id"], vm["accelerator"]) == ("running", str(host_id), "tcg")

    stopped = await alice.ok("POST", f"/v1/vms/{vm_id}/stop", status=202)
    assert stopped["id"] == str(vm_id)
    status = await alice.ok("GET", f"/v1/vms/{vm_id}/status?position={stopped['position']}")
    assert (status["status"], status["desired"]) == ("stopping", "stopped")
    status_code, problem, response = await alice.call("POST", f"/v1/vms/{vm_id}/reboot")
    assert_problem(status_code, problem, response, 422, "cannot reboot a VM that is stopping")
    await commands.report(SYSTEM, vm_domain.ReportStopped(vm_id=vm_id, host_id=host_id))

    started = await alice.ok("POST", f"/v1/vms/{vm_id}/start", status=202)
    assert (await alice.ok("GET", f"/v1/vms/{vm_id}/status?position={started['position']}"))["status"] == "starting"
    position = (await commands.report(SYSTEM, vm_domain.ReportStarted(vm_id=vm_id, host_id=host_id))).position
    await alice.ok("GET", f"/v1/vms/{vm_id}?position={position}")
    rebooted = await alice.ok("POST", f"/v1/vms/{vm_id}/reboot", status=202)
    assert rebooted["position"] > position

    deleted = await alice.ok("DELETE", f"/v1/vms/{vm_id}", status=202)
    status = await alice.ok("GET", f"/v1/vms/{vm_id}/status?position={deleted['position']}")
    assert (status["status"], status["desired"]) == ("deleting", "deleted")
    position = (await commands.report(SYSTEM, vm_domain.ReportDeleted(vm_id=vm_id, host_id=host_id))).position
    assert (await alice.ok("GET", f"/v1/vms/{vm_id}/status?position={position}"))["status"] == "deleted"
    assert (await alice.ok("GET", "/v1/vms"))["vms"] == []
    with_deleted = await alice.ok("GET", "/v1/vms?include_deleted=true")
    assert [vm["status"] for vm in with_deleted["vms"]] == ["deleted"]


async def test_stopping_a_deleted_vm_is_rejected_with_422(gw: Gateway) -> None:
    alice = gw.as_("alice")
    created = await alice.ok("POST", "/v1/vms", vm_body("gone"))
    await alice.ok("DELETE", f"/v1/vms/{created['id']}", status=202)  # never placed: deleted at once
    for action in ("stop", "start", "reboot"):
        status, problem, response = await alice.call("POST", f"/v1/vms/{created['id']}/{action}")
        assert_problem(status, problem, response, 422, "is deleted")
    status, problem, response = await alice.call("GET", "/v1/vms?include_deleted=maybe")
    assert_problem(status, problem, response, 400, "not a boolean", "include_deleted")


async def test_starting_a_running_vm_twice_is_not_an_error(gw: Gateway) -> None:
    alice = gw.as_("alice")
    created = await alice.ok("POST", "/v1/vms", vm_body("twice"))
    await drive_to_running(gw.app[COMMANDS], uuid.UUID(created["id"]))
    again = await alice.ok("POST", f"/v1/vms/{created['id']}/start", status=202)
    assert again["position"] > created["position"]


# -- idempotency ----------------------------------------------------------------------------------------


async def test_an_idempotency_key_gives_a_retry_the_same_vm(gw: Gateway) -> None:
    alice = gw.as_("alice")
    key = {"Idempotency-Key": "order-7"}
    status, first, _ = await alice.call("POST", "/v1/vms", vm_body("once"), key)
    assert status == 202
    status, again, response = await alice.call("POST", "/v1/vms", vm_body("once"), key)
    assert status == 200
    assert again["id"] == first["id"] and again["status"] == "requested"
    assert response.headers["Location"] == f"/v1/vms/{first['id']}"
    listing = await alice.ok("GET", f"/v1/vms?position={again['position']}")
    assert [vm["id"] for vm in listing["vms"]] == [first["id"]]

    for changed in (vm_body("once", cores=4), vm_body("once", restart_policy="never"), vm_body("other")):
        status, problem, response = await alice.call("POST", "/v1/vms", changed, key)
        assert_problem(status, problem, response, 422, "Idempotency-Key was already used")
    # Keys are per user: bob's same key makes bob's own VM.
    bobs = await gw.as_("bob").ok("POST", "/v1/vms", vm_body("once"), status=202, headers=key)
    assert bobs["id"] != first["id"]
    status, problem, response = await alice.call("POST", "/v1/vms", vm_body("x"), {"Idempotency-Key": "k" * 300})
    assert_problem(status, problem, response, 400, "longer than 255", "Idempotency-Key")


async def test_concurrent_retries_with_one_idempotency_key_make_one_vm(gw: Gateway) -> None:
    alice = gw.as_("alice")
    answers = await asyncio.gather(*(
        alice.call("POST", "/v1/vms", vm_body("race"), {"Idempotency-Key": "race-1"}) for _ in range(5)))
    assert {status for status, _, _ in answers} <= {200, 202}
    assert len({body["id"] for _, body, _ in answers}) == 1
    position = max(body["position"] for _, body, _ in answers)
    assert len((await alice.ok("GET", f"/v1/vms?position={position}"))["vms"]) == 1


# -- read your writes ------------------------------------------------------------------------------------


async def test_a_position_the_read_models_do_not_reach_in_time_answers_503(tmp_path: Path) -> None:
    store = MemoryEventStore()
    app = init_app(GatewayConfig(store=store, read_timeout=0.3))
    async with TestClient(TestServer(app)) as client:
        alice = Api(client, user("alice"))
        await app[FOLLOWER].stop()
        created = await alice.ok("POST", "/v1/vms", vm_body("late"))
        status, problem, response = await alice.call("GET", f"/v1/vms?position={created['position']}")
        assert_problem(status, problem, response, 503, f"did not reach position {created['position']}")
        assert response.headers["Retry-After"] == "1"
        status, problem, response = await alice.call("GET", "/healthz")
        assert_problem(status, problem, response, 503, "not following the log")
        metrics = await (await client.get("/metrics")).text()
        assert "ucloud_projection_lag_events 1.0" in metrics
        app[FOLLOWER].start()
        listing = await alice.ok("GET", f"/v1/vms?position={created['position']}")
        assert [vm["name"] for vm in listing["vms"]] == ["late"]
        assert (await alice.ok("GET", "/healthz"))["following"] is True


async def test_a_bad_position_answers_400_and_a_future_one_422(gw: Gateway) -> None:
    alice = gw.as_("alice")
    status, problem, response = await alice.call("GET", "/v1/vms?position=abc")
    assert_problem(status, problem, response, 400, "not a whole number", "position")
    status, problem, response = await alice.call("GET", "/v1/vms?position=%D9%A1%D9%A2")  # Arabic-Indic 12
    assert_problem(status, problem, response, 400, "not a whole number", "position")
    status, problem, response = await alice.call("GET", "/v1/vms", headers={"X-Ucloud-Position": "-3"})
    assert_problem(status, problem, response, 400, "at least 0", "X-Ucloud-Position")
    status, problem, response = await alice.call("GET", "/v1/vms?position=" + "9" * 300)
    assert_problem(status, problem, response, 400, "not a whole number", "position")
    status, problem, response = await alice.call("GET", "/v1/vms?position=999999")
    assert_problem(status, problem, response, 422, "beyond the end of the log", "position")


# -- authentication --------------------------------------------------------------------------------------


async def test_a_request_without_a_user_answers_401(gw: Gateway) -> None:
    for method, path in [("GET", "/v1/vms"), ("POST", "/v1/vms"), ("GET", "/v1/ssh-keys"), ("GET", "/v1/hosts"),
                         ("DELETE", f"/v1/vms/{uuid.uuid4()}")]:
        status, problem, response = await gw.anonymous.call(method, path)
        assert_problem(status, problem, response, 401, "missing X-Ucloud-User")
        assert response.headers["WWW-Authenticate"]
    status, problem, response = await gw.anonymous.call("GET", "/v1/vms", headers={"X-Ucloud-User": "../etc"})
    assert_problem(status, problem, response, 401, "not a user name")
    status, problem, response = await gw.anonymous.call(
        "GET", "/v1/vms", headers={"X-Ucloud-User": "alice", "X-Ucloud-Realm": "a realm"})
    assert_problem(status, problem, response, 401, "not a realm name")
    # Open routes need nobody.
    for path in ("/healthz", "/metrics", "/v1/openapi.json"):
        assert (await gw.client.get(path)).status == 200


class TokenAuthenticator:
    """A stand-in for the real (LDAP + TOTP) authenticator: async, from its own header."""

    def __init__(self, tokens: Mapping[str, Actor]) -> None:
        self.tokens = tokens
        self.sources: list[str] = []

    async def authenticate(self, headers: Mapping[str, str], source: str) -> Actor:
        self.sources.append(source)
        actor = self.tokens.get(headers.get("Authorization", ""))
        if actor is None:
            raise AuthenticationFailed("unknown token", challenge='Bearer realm="ucloud"')
        return actor


async def test_another_authenticator_slots_in_by_configuration() -> None:
    authenticator = TokenAuthenticator({"Bearer t1": Actor("alice"), "Bearer t2": Actor("ops", "ucloud-admin", True)})
    app = init_app(GatewayConfig(store=MemoryEventStore(), authenticator=authenticator))
    async with TestClient(TestServer(app)) as client:
        # The development headers mean nothing to it.
        status, problem, response = await Api(client, user("alice")).call("GET", "/v1/vms")
        assert_problem(status, problem, response, 401, "unknown token")
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="ucloud"'
        created = await Api(client, {"Authorization": "Bearer t1"}).ok("POST", "/v1/vms", vm_body())
        hosts = await Api(client, {"Authorization": "Bearer t2"}).ok("GET", f"/v1/hosts?position={created['position']}")
        assert hosts["hosts"] == []
        assert authenticator.sources and all(authenticator.sources)


def test_authenticators_are_configured_by_object_name_or_import_path() -> None:
    assert isinstance(resolve_authenticator("header"), HeaderAuthenticator)
    assert isinstance(resolve_authenticator("ucloud.gateway.identity:HeaderAuthenticator"), HeaderAuthenticator)
    with pytest.raises(ValueError, match="write 'header' or 'package.module:factory'"):
        resolve_authenticator("ldap")
    with pytest.raises(ValueError, match="has no Nope"):
        resolve_authenticator("ucloud.gateway.identity:Nope")
    with pytest.raises(TypeError, match="no authenticate"):
        resolve_authenticator(object())  # type: ignore[arg-type]
    actor = HeaderAuthenticator().authenticate({"X-Ucloud-User": "root", "X-Ucloud-Realm": "ucloud-admin"}, "::1")
    assert actor == Actor("root", "ucloud-admin", is_admin=True)
    assert HeaderAuthenticator().authenticate({"X-Ucloud-User": "al"}, "") == Actor("al", "ucloud", False)


# -- SSH keys ----------------------------------------------------------------------------------------------


async def test_ssh_keys_are_added_listed_used_and_deleted(gw: Gateway) -> None:
    alice = gw.as_("alice")
    status, added, response = await alice.call("POST", "/v1/ssh-keys", {"name": "laptop", "public_key": PUBLIC_KEY})
    assert status == 201, added
    assert added["fingerprint"].startswith("SHA256:") and added["name"] == "laptop"
    assert response.headers["Location"] == "/v1/ssh-keys/laptop"
    listing = await alice.ok("GET", f"/v1/ssh-keys?position={added['position']}")
    assert [(k["name"], k["public_key"], k["fingerprint"]) for k in listing["ssh_keys"]] == [
        ("laptop", PUBLIC_KEY, added["fingerprint"])]
    assert (await gw.as_("bob").ok("GET", "/v1/ssh-keys"))["ssh_keys"] == []
    status, problem, response = await gw.as_("bob").call("GET", "/v1/ssh-keys?owner=alice")
    assert_problem(status, problem, response, 404)
    assert [k["name"] for k in (await gw.admin.ok("GET", "/v1/ssh-keys?owner=alice"))["ssh_keys"]] == ["laptop"]

    vm = await alice.ok("POST", "/v1/vms", vm_body("keyed", ssh_keys=["laptop"]))
    assert (await alice.ok("GET", f"/v1/vms/{vm['id']}?position={vm['position']}"))["ssh_keys"] == ["laptop"]
    status, problem, response = await gw.as_("bob").call("POST", "/v1/vms", vm_body(ssh_keys=["laptop"]))
    assert_problem(status, problem, response, 422, "no SSH key named 'laptop'", "ssh_keys")

    status, problem, response = await alice.call("POST", "/v1/ssh-keys", {"name": "laptop", "public_key": OTHER_KEY})
    assert_problem(status, problem, response, 422, "already exists")
    deleted = await alice.ok("DELETE", "/v1/ssh-keys/laptop", status=200)
    assert (await alice.ok("GET", f"/v1/ssh-keys?position={deleted['position']}"))["ssh_keys"] == []
    status, problem, response = await alice.call("DELETE", "/v1/ssh-keys/laptop")
    assert_problem(status, problem, response, 404, "no SSH key named 'laptop'")
    status, problem, response = await gw.as_("bob").call("DELETE", "/v1/ssh-keys/laptop")
    assert_problem(status, problem, response, 404)


@pytest.mark.parametrize(("body", "field", "detail"), [
    ({"name": "k", "public_key": "ssh-rsa n@pe!"}, "public_key", "one OpenSSH public key line"),
    ({"name": "k", "public_key": "-----BEGIN OPENSSH PRIVATE KEY-----"}, "public_key", "private key"),
    ({"name": "k", "public_key": "hello"}, "public_key", "one OpenSSH public key line"),
    ({"name": "k", "public_key": PUBLIC_KEY + "\n"}, "public_key", "one OpenSSH public key line"),
    ({"name": "k", "public_key": "ssh-ed25519 " + "A" * 20000}, "public_key", "length <= 16384"),
    ({"name": "k\n", "public_key": PUBLIC_KEY}, "name", "is not a name"),
    ({"name": "bad name", "public_key": PUBLIC_KEY}, "name", "is not a name"),
    ({"name": "k"}, "public_key", "missing required field `public_key`"),
])
async def test_a_bad_ssh_key_answers_400_naming_the_field(gw: Gateway, body: Any, field: str, detail: str) -> None:
    status, problem, response = await gw.as_("alice").call("POST", "/v1/ssh-keys", body)
    assert_problem(status, problem, response, 400, detail, field)


@pytest.mark.parametrize(("public_key", "detail"), [
    ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5", "not a valid ssh-ed25519 key"),  # the type, no key material
    ("ssh-ed25519 " + base64.b64encode(b"\0\0\0\x0bssh-ed25519" + b"\0" * 9000).decode(), "not a valid"),
    (PUBLIC_KEY.replace("ssh-ed25519", "ssh-rsa"), "not a valid ssh-rsa key"),  # the blob says ed25519
    (rsa_key(1024), "2048 to 16384 bits, this one has 1024"),
])
async def test_ssh_key_material_that_does_not_parse_answers_422(gw: Gateway, public_key: str, detail: str) -> None:
    status, problem, response = await gw.as_("alice").call("POST", "/v1/ssh-keys", {"name": "k", "public_key": public_key})
    assert_problem(status, problem, response, 422, detail, "public_key")


# -- hosts --------------------------------------------------------------------------------------------------


async def test_hosts_are_for_the_admin_realm_and_404_for_everyone_else(gw: Gateway) -> None:
    body = {"hostname": "node1.example", "cores": 8, "ram": "32GB", "disk": "1TiB"}
    for api in (gw.as_("alice"), gw.as_("alice", "ucloud")):
        status, problem, response = await api.call("GET", "/v1/hosts")
        assert_problem(status, problem, response, 404, "admin realm")
        status, problem, response = await api.call("POST", "/v1/hosts", body)
        assert_problem(status, problem, response, 404, "admin realm")

    status, registered, _ = await gw.admin.call("POST", "/v1/hosts", body)
    assert status == 201, registered
    status, again, _ = await gw.admin.call("POST", "/v1/hosts", body)
    assert status == 200 and again["id"] == registered["id"]
    status, problem, response = await gw.admin.call("POST", "/v1/hosts", {**body, "ram": "lots"})
    assert_problem(status, problem, response, 400, "not a size", "ram")

    vm = await gw.as_("alice").ok("POST", "/v1/vms", vm_body("placed", cores=2, ram="4GB", disk="20GB"))
    await gw.app[COMMANDS].mark_host_up(SYSTEM, uuid.UUID(registered["id"]), 1, 3.0)  # as its agent would
    placed = await gw.app[COMMANDS].place_vm(SYSTEM, uuid.UUID(vm["id"]), uuid.UUID(registered["id"]))
    hosts = (await gw.admin.ok("GET", f"/v1/hosts?position={placed.position}"))["hosts"]
    assert len(hosts) == 1
    host = hosts[0]
    assert (host["hostname"], host["cores"], host["ram"], host["disk"]) == ("node1.example", 8, 32 * 1024**3, 1024**4)
    assert (host["used_cores"], host["used_ram"], host["used_disk"], host["vms"]) == (2, 4 * 1024**3, 20 * 1024**3, 1)
    # Up in the log, but no agent holds its heartbeat lease: suspect (gone, not yet declared).
    assert (host["status"], host["session"]) == ("suspect", 1)
    leases = gw.app[LEASES]
    grant = await leases.acquire(f"host-{registered['id']}", "node1.example", 5.0)  # as its agent does
    assert grant is not None
    [host] = (await gw.admin.ok("GET", "/v1/hosts"))["hosts"]
    assert (host["status"], host["session"]) == ("up", 1)
    await leases.release(grant)
    [host] = (await gw.admin.ok("GET", "/v1/hosts"))["hosts"]
    assert host["status"] == "suspect"


# -- errors of the event store, and aiohttp's own --------------------------------------------------------------


async def test_an_unreachable_event_store_answers_503() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket closes
    store = EtcdEventStore([dead], prefix=unique_prefix(), timeout=0.5, append_timeout=1.0)
    app = init_app(GatewayConfig(store=store))
    try:
        async with TestClient(TestServer(app)) as client:
            status, problem, response = await Api(client, user("alice")).call("POST", "/v1/vms", vm_body())
            assert_problem(status, problem, response, 503)
            assert response.headers["Retry-After"] == "1"
            status, problem, response = await Api(client, {}).call("GET", "/healthz")
            assert_problem(status, problem, response, 503)
    finally:
        await store.close()


@pytest.mark.parametrize(("error", "status", "slug"), [
    (StreamConflict("vm-1", 1, 2), 409, "conflict"),
    (TrackingConflict("scheduler", 3, 5), 409, "conflict"),
    (UnavailableError("etcd did not answer"), 503, "unavailable"),
    (InvalidAppend("an event is too large"), 400, "invalid"),
    (DataError("undecodable record at position 7"), 500, "internal"),
    (RuntimeError("secret internals"), 500, "internal"),
])
def test_event_store_errors_map_to_their_problems(error: Exception, status: int, slug: str) -> None:
    problem, _ = problem_for(error, "/v1/vms")
    assert (problem.status, problem.type) == (status, f"urn:ucloud:problem:{slug}")
    assert "secret internals" not in problem.detail
    assert problem.instance == "/v1/vms"


async def test_unknown_paths_and_methods_answer_problems(gw: Gateway) -> None:
    status, problem, response = await gw.as_("alice").call("GET", "/v2/nothing")
    assert_problem(status, problem, response, 404, "no such resource")
    status, problem, response = await gw.as_("alice").call("PUT", "/v1/vms")
    assert_problem(status, problem, response, 405, "allowed")
    assert "POST" in response.headers["Allow"]


# -- OpenAPI, metrics, health ---------------------------------------------------------------------------------


async def test_openapi_documents_every_route_and_nothing_else(gw: Gateway) -> None:
    document = await gw.anonymous.ok("GET", "/v1/openapi.json")
    assert document["openapi"].startswith("3.")
    served = {(route.method.lower(), route.resource.canonical) for route in gw.app.router.routes()
              if route.resource is not None}
    documented = {(method, path) for path, operations in document["paths"].items() for method in operations}
    assert documented == served
    assert ("post", "/v1/vms") in documented and ("get", "/v1/openapi.json") in documented
    schemas = document["components"]["schemas"]

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(document):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation["summary"] and operation["operationId"] and operation["responses"], (method, path)
            for name in re.findall(r"{(\w+)}", path):
                assert any(p["name"] == name and p["in"] == "path" for p in operation["parameters"])
    create = document["paths"]["/v1/vms"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/CreateVmBody"}
    assert set(schemas["CreateVmBody"]["required"]) == {"name", "cores", "ram", "disk", "image"}
    assert {"202", "200", "400", "401", "422"} <= set(create["responses"])
    assert any(p["name"] == "Idempotency-Key" for p in create["parameters"])
    assert any(p["name"] == "position" for p in document["paths"]["/v1/vms"]["get"]["parameters"])
    assert document["paths"]["/healthz"]["get"]["security"] == []


def test_a_route_without_documentation_is_refused() -> None:
    async def undocumented(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/undocumented", undocumented)
    with pytest.raises(RuntimeError, match="POST /v1/undocumented has no ApiDoc"):
        build_openapi(app)


async def test_metrics_count_requests_by_route_and_status_and_expose_the_lag(gw: Gateway) -> None:
    alice = gw.as_("alice")
    await alice.ok("POST", "/v1/vms", vm_body())
    await alice.call("GET", f"/v1/vms/{uuid.uuid4()}")
    await gw.anonymous.call("GET", "/v1/vms")
    response = await gw.client.get("/metrics")
    assert response.status == 200 and response.content_type == "text/plain"
    text = await response.text()
    assert re.search(r'^ucloud_gateway_requests_total\{method="POST",route="/v1/vms",status="202"\} 1\.0$', text, re.M)
    assert re.search(r'^ucloud_gateway_requests_total\{method="GET",route="/v1/vms/\{id\}",status="404"\} 1\.0$',
                     text, re.M)
    assert re.search(r'^ucloud_gateway_requests_total\{method="GET",route="/v1/vms",status="401"\} 1\.0$', text, re.M)
    assert re.search(r'^ucloud_gateway_request_duration_seconds_count\{method="POST",route="/v1/vms"\} 1\.0$',
                     text, re.M)
    assert re.search(r"^ucloud_projection_lag_events \d+\.0$", text, re.M)
    assert re.search(r"^ucloud_projection_position \d+\.0$", text, re.M)


async def test_health_reports_the_read_models_position(gw: Gateway) -> None:
    created = await gw.as_("alice").ok("POST", "/v1/vms", vm_body())
    await gw.app[RUNNER].wait_for(created["position"], 5)
    health = await gw.anonymous.ok("GET", "/healthz")
    assert health["status"] == "ok" and health["following"] is True
    assert health["head"] >= created["position"] and health["position"] >= created["position"]
    assert health["lag"] == max(0, health["head"] - health["position"])


# -- statelessness ---------------------------------------------------------------------------------------------


@pytest.mark.etcd
async def test_two_gateways_on_one_etcd_log_serve_the_same_data(etcd: Any) -> None:
    prefix = unique_prefix()
    stores = [EtcdEventStore(etcd.endpoints, prefix=prefix, max_txn_ops=1024) for _ in range(2)]
    apps = [init_app(GatewayConfig(store=store)) for store in stores]
    clients = [TestClient(TestServer(app)) for app in apps]
    try:
        for client in clients:
            await client.start_server()
        on_a, on_b = (Api(client, user("alice")) for client in clients)
        created = await on_a.ok("POST", "/v1/vms", vm_body("shared"), headers={"Idempotency-Key": "k1"})
        seen = await on_b.ok("GET", f"/v1/vms/{created['id']}?position={created['position']}")
        assert seen["name"] == "shared"
        status, retried, _ = await on_b.call("POST", "/v1/vms", vm_body("shared"), {"Idempotency-Key": "k1"})
        assert status == 200 and retried["id"] == created["id"]
        key = await on_b.ok("POST", "/v1/ssh-keys", {"name": "k", "public_key": PUBLIC_KEY})
        stopped = await on_b.ok("DELETE", f"/v1/vms/{created['id']}")
        position = max(key["position"], stopped["position"])
        assert [k["name"] for k in (await on_a.ok("GET", f"/v1/ssh-keys?position={position}"))["ssh_keys"]] == ["k"]
        assert (await on_a.ok("GET", f"/v1/vms/{created['id']}/status?position={position}"))["status"] == "deleted"
        assert apps[0][READ_MODELS].vms.by_id.keys() == apps[1][READ_MODELS].vms.by_id.keys()
    finally:
        for client in clients:
            await client.close()
        for store in stores:
            await store.close()


async def test_a_restarted_gateway_rebuilds_its_read_models_from_the_log(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite"
    config = GatewayConfig(store_url=f"sqlite://{path}", snapshot_interval=3600)
    async with TestClient(TestServer(init_app(config))) as client:
        created = await Api(client, user("alice")).ok("POST", "/v1/vms", vm_body("durable"))
    assert path.exists()
    async with TestClient(TestServer(init_app(config))) as client:
        vm = await Api(client, user("alice")).ok("GET", f"/v1/vms/{created['id']}?position={created['position']}")
        assert vm["name"] == "durable"


def test_a_bad_configuration_is_refused_with_a_clear_message() -> None:
    with pytest.raises(InvalidStoreUrl, match="unknown scheme 'postgres'"):
        init_app(GatewayConfig(store_url="postgres://db/ucloud"))
    with pytest.raises(ValueError, match="port must be"):
        GatewayConfig(port=70000)
    with pytest.raises(ValueError, match="read_timeout must be positive"):
        GatewayConfig(read_timeout=0)


# -- serving -----------------------------------------------------------------------------------------------------


async def test_start_listens_on_ipv6_and_ipv4_loopback_with_one_port() -> None:
    store = MemoryEventStore()
    gateway = await start(GatewayConfig(store=store, listen=("::1", "127.0.0.1"), port=0))
    try:
        assert [host for host, _ in gateway.addresses] == ["::1", "127.0.0.1"]
        ports = {port for _, port in gateway.addresses}
        assert len(ports) == 1 and ports != {0}
        port = ports.pop()
        assert gateway.url == f"http://[::1]:{port}"
        async with aiohttp.ClientSession() as session:
            for base in (f"http://[::1]:{port}", f"http://127.0.0.1:{port}"):
                async with session.get(f"{base}/healthz") as response:
                    assert response.status == 200
    finally:
        await gateway.stop()
        await store.close()


async def test_start_fails_clearly_when_the_first_address_cannot_bind() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on \\[127.0.0.1\\]:{port}"):
            await start(GatewayConfig(store=MemoryEventStore(), listen=("127.0.0.1",), port=port))


async def test_an_installations_limits_are_enforced_and_stated_in_the_document() -> None:
    from ucloud.domain.limits import Limits

    store = MemoryEventStore()
    limits = Limits(vm_ram=8 * 1024**3, vm_cores=4, vm_ssh_keys=2, host_ram=1024**4)
    app = init_app(GatewayConfig(store=store, limits=limits))
    try:
        async with TestClient(TestServer(app)) as client:
            alice, admin = Api(client, user("alice")), Api(client, ADMIN)
            document = await alice.ok("GET", "/v1/openapi.json")
            schemas = document["components"]["schemas"]
            vm = schemas["CreateVmBody"]["properties"]
            assert vm["ram"]["anyOf"][0]["maximum"] == 8 * 1024**3
            assert vm["cores"]["anyOf"][0]["maximum"] == 4
            assert vm["ssh_keys"]["maxItems"] == 2
            assert schemas["RegisterHostBody"]["properties"]["ram"]["anyOf"][0]["maximum"] == 1024**4
            assert "x-ucloud-limit" not in str(document)
            for body, field in ((vm_body(ram="9GiB"), "ram"), (vm_body(cores=5), "cores"),
                                (vm_body(ssh_keys=["a", "b", "c"]), "ssh_keys")):
                status, problem, response = await alice.call("POST", "/v1/vms", body)
                assert_problem(status, problem, response, 422, "more than this installation allows|at most 2", field)
            assert (await alice.call("POST", "/v1/vms", vm_body(ram="8GiB", cores=4)))[0] == 202
            status, problem, response = await admin.call(
                "POST", "/v1/hosts", {"hostname": "big", "cores": 8, "ram": "1048576P", "disk": "1TiB"})  # 2**70 bytes
            assert_problem(status, problem, response, 422, "a host's RAM", "ram")
    finally:
        await store.close()


async def test_ssh_keys_named_twice_are_installed_once(gw: Gateway) -> None:
    alice = gw.as_("alice")
    await alice.ok("POST", "/v1/ssh-keys", {"name": "laptop", "public_key": PUBLIC_KEY})
    created = await alice.ok("POST", "/v1/vms", vm_body("twice-keyed", ssh_keys=["laptop", "laptop", "laptop"]))
    vm = await alice.ok("GET", f"/v1/vms/{created['id']}?position={created['position']}")
    assert vm["ssh_keys"] == ["laptop"]
