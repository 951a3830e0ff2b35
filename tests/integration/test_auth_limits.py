"""Failed attempts are limited per user and per source network (429 with Retry-After),
and every event records who acted in which realm -- through the real gateway with
real authentication (built-in directory, file secret store, sessions, SQLite log).

Why 429 and not 401: the client learns to wait rather than to re-type its token, and
it reveals nothing about users, because unknown names are limited exactly like known
ones (the answers are compared below).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest

from tests.support.auth import ManualClock
from tests.support.auth_stack import ADMIN, USER, Stack, auth_stack
from ucloud.auth.ratelimit import FailureLimiter, RateLimitPolicy

PER_USER, PER_SOURCE, WINDOW = 3, 6, 300.0


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[tuple[Stack, ManualClock]]:
    clock = ManualClock(0.0)
    limiter = FailureLimiter(RateLimitPolicy(PER_USER, WINDOW), RateLimitPolicy(PER_SOURCE, WINDOW), clock=clock)
    async with auth_stack(tmp_path, "builtin", limiter=limiter) as stack:
        yield stack, clock


def wrong(stack: Stack) -> str:
    return str((int(stack.token("alice", USER)) + 1) % 1_000_000).zfill(6)


async def test_a_user_is_limited_after_failures_and_a_valid_token_is_kept_for_later(
        limited: tuple[Stack, ManualClock]) -> None:
    stack, clock = limited
    for _ in range(PER_USER):
        assert (await stack.call("GET", "/v1/vms", stack.totp("alice", USER, wrong(stack))))[0] == 401
    good = stack.token("alice", USER)
    status, body, headers = await stack.call("GET", "/v1/vms", stack.totp("alice", USER, good))
    assert status == 429, body
    assert int(headers["Retry-After"]) == WINDOW
    assert body["type"] == "urn:ucloud:problem:rate-limited" and "retry in 300 s" in body["detail"]
    clock.advance(WINDOW)
    # The limited attempt was not even verified, so its token is still unused.
    assert (await stack.call("GET", "/v1/vms", stack.totp("alice", USER, good)))[0] == 200


async def test_an_unknown_name_is_limited_exactly_like_a_known_one(limited: tuple[Stack, ManualClock]) -> None:
    stack, _ = limited
    answers = []
    for name in ("alice", "nobody"):
        for _ in range(PER_USER):
            assert (await stack.call("GET", "/v1/vms", stack.totp(name, USER, wrong(stack))))[0] == 401
        status, body, headers = await stack.call("GET", "/v1/vms", stack.totp(name, USER, wrong(stack)))
        answers.append((status, body, headers["Retry-After"]))
    assert answers[0] == answers[1] and answers[0][0] == 429


async def test_a_source_is_limited_across_names_and_another_source_is_not(
        limited: tuple[Stack, ManualClock]) -> None:
    stack, _ = limited
    for index in range(PER_SOURCE):  # a spray: few attempts per name, many from one place
        name = f"guess{index}"
        assert (await stack.call("GET", "/v1/vms", stack.totp(name, USER, wrong(stack))))[0] == 401
    status, body, _ = await stack.call("GET", "/v1/vms", stack.totp("bob", USER))
    assert status == 429, body  # bob did nothing wrong, but his attempt comes from the same network
    # From another address (127.0.0.2, another /32) bob gets in.
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector) as other, \
            other.get(stack.url + "/v1/vms", headers=stack.totp("bob", USER)) as response:
        assert response.status == 200, await response.text()


async def test_a_session_keeps_working_while_someone_exhausts_its_users_budget(
        limited: tuple[Stack, ManualClock]) -> None:
    stack, _ = limited
    session = await stack.session("alice", USER)
    for _ in range(PER_USER + 1):
        await stack.call("GET", "/v1/vms", stack.totp("alice", USER, wrong(stack)))
    assert (await stack.call("GET", "/v1/vms", stack.totp("alice", USER)))[0] == 429
    assert (await stack.call("GET", "/v1/vms", session))[0] == 200


async def test_every_event_records_the_acting_user_and_realm(tmp_path: Path) -> None:
    async with auth_stack(tmp_path, "builtin") as stack:
        alice_session = await stack.session("alice", USER)
        root_session = await stack.session("root", ADMIN)
        vm = {"cores": 1, "ram": "256MB", "disk": "1GB", "image": "tiny"}
        acts = [
            ("alice@ucloud", stack.totp("alice", USER), "/v1/vms", {"name": "a1", **vm}),
            ("alice@ucloud", alice_session, "/v1/vms", {"name": "a2", **vm}),
            ("alice@ucloud", alice_session, "/v1/ssh-keys",
             {"name": "k", "public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICvYBsl/DgCvGh/DMo+nY6kmlyPI24+sT5OvcdsYbW6Q"}),
            ("root@ucloud-admin", root_session, "/v1/vms", {"name": "b1", "owner": "bob", **vm}),
            ("root@ucloud-admin", stack.totp("root", ADMIN), "/v1/hosts",
             {"hostname": f"h-{uuid.uuid4().hex[:4]}", "cores": 2, "ram": "4GB", "disk": "50GB"}),
        ]
        expected: dict[int, str] = {}
        for actor, headers, path, body in acts:
            status, answer, _ = await stack.call("POST", path, headers, body)
            assert status in (201, 202), answer
            expected[answer["position"]] = actor
        records = await stack.store.read_all()
    assert records and {r.position: r.actor for r in records if r.position in expected} == expected
    for record in records:
        name, _, realm = record.actor.partition("@")
        assert name and realm, record  # every event says who, in which realm
    (for_bob,) = [r for r in records if r.type == "vm.requested" and msgspec.json.decode(r.data)["owner"] == "bob"]
    assert for_bob.actor == "root@ucloud-admin"  # an admin acting for bob is recorded as the admin
