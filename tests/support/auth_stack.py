"""A gateway with real authentication for tests: a user directory (a real slapd, or the
built-in file directory), a 0600 file secret store, TOTP with a hand-driven clock,
sessions, and a SQLite event log; served on a free loopback port in the test's loop.

The people are the same in both directories: alice and bob (users), carol (disabled),
root (admin realm); everyone but carol is enrolled in the realms they may use.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pyotp
from multidict import CIMultiDictProxy

from tests.support.auth import ManualClock
from tests.support.gateway import PUBLIC_KEY, drive_to_running
from tests.support.slapd import (
    GROUPS_DN,
    PEOPLE_DN,
    SERVICE_DN,
    SERVICE_PW,
    Slapd,
    group_ldif,
    person_ldif,
)
from ucloud.auth.directory import BuiltinDirectory, LdapConfig, LdapDirectory, UserDirectory
from ucloud.auth.otp import LocalVerifier, enrol
from ucloud.auth.ratelimit import FailureLimiter, RateLimitPolicy
from ucloud.auth.realms import HEADER_NAME, HEADER_REALM, HEADER_TOKEN, Realms
from ucloud.auth.secrets import FileSecretStore, Secret
from ucloud.auth.sessions import SessionAuthenticator, SessionSigner
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.eventstore.sqlite import SqliteEventStore
from ucloud.gateway.app import COMMANDS, GatewayConfig, RunningGateway, start

T0 = 1_700_000_000.0
USER, ADMIN = "ucloud", "ucloud-admin"

LDAP_PEOPLE = "\n".join([
    person_ldif("alice", "Alice Liddell", "alice@example.org"),
    person_ldif("bob", "Bob Builder", "bob@example.org"),
    person_ldif("carol", "Carol Shaw", employee_type="disabled"),
    person_ldif("root", "Root Admin"),
    group_ldif("admins", ["root"]),
])
# Who is enrolled where (carol too: a disabled user's valid token must still be refused).
ENROLLED = {("alice", USER), ("bob", USER), ("carol", USER), ("root", ADMIN)}

Directory = Literal["ldap", "builtin"]


def ldap_directory(slapd: Slapd) -> LdapDirectory:
    return LdapDirectory(LdapConfig(
        urls=[slapd.url], base_dn=PEOPLE_DN, bind_dn=SERVICE_DN, bind_password=Secret(SERVICE_PW),
        group_base_dn=GROUPS_DN, realm_groups={"admins": ADMIN}, default_realms=(USER,)))


def builtin_directory(path: Path) -> BuiltinDirectory:
    directory = BuiltinDirectory(path)
    directory.add_user("alice", "Alice Liddell")
    directory.add_user("bob", "Bob Builder")
    directory.add_user("carol", "Carol Shaw")
    directory.disable_user("carol")
    directory.add_user("root", "Root Admin", realms=[USER, ADMIN])
    return directory


Answer = tuple[int, Any, CIMultiDictProxy[str]]


@dataclass
class Stack:
    url: str
    gateway: RunningGateway
    store: SqliteEventStore
    auth: SessionAuthenticator
    secrets: FileSecretStore
    clock: ManualClock
    http: aiohttp.ClientSession
    kind: Directory
    seeds: dict[tuple[str, str], str] = field(default_factory=dict)

    @property
    def commands(self) -> CommandService:
        return self.gateway.app[COMMANDS]

    def token(self, name: str, realm: str) -> str:
        """A fresh TOTP of ``name`` in ``realm``: the clock moves one step first, so no
        token is ever handed out twice (the gateway would refuse the replay)."""
        self.clock.advance(30)
        return pyotp.TOTP(self.seeds[(name, realm)]).at(self.clock.now)

    def totp(self, name: str, realm: str, token: str | None = None) -> dict[str, str]:
        return {HEADER_NAME: name, HEADER_REALM: realm,
                HEADER_TOKEN: token if token is not None else self.token(name, realm)}

    async def session(self, name: str, realm: str) -> dict[str, str]:
        status, body, _ = await self.call("POST", "/v1/sessions", self.totp(name, realm))
        assert status == 201, body
        return {"Authorization": f"Bearer {body['token']}"}

    async def call(self, method: str, path: str, headers: Mapping[str, str] | None = None, json: Any = None,
                   query: Mapping[str, str] | None = None, data: bytes | None = None) -> Answer:
        async with self.http.request(method, self.url + path, headers=dict(headers or {}), json=json,
                                     params=dict(query or {}), data=data) as response:
            if method == "HEAD":
                body: Any = None
            elif response.content_type.endswith("json"):
                body = await response.json(content_type=None)
            else:
                body = await response.text()
            return response.status, body, response.headers

    # Resources, made directly through the command side as their owners would.

    async def running_vm(self, owner: str) -> uuid.UUID:
        created = await self.commands.create_vm(Actor(owner), name=f"vm-{uuid.uuid4().hex[:6]}", cores=1,
                                                ram="256MiB", disk="1GiB", image="tiny")
        await drive_to_running(self.commands, created.result, hostname=f"h-{uuid.uuid4().hex[:6]}")
        return created.result

    async def ssh_key(self, owner: str) -> str:
        name = f"k-{uuid.uuid4().hex[:6]}"
        await self.commands.add_ssh_key(Actor(owner), name, PUBLIC_KEY)
        return name

    async def file(self, owner: str) -> str:
        """A file recorded for ``owner`` (as the file scanner would record one)."""
        name = f"f-{uuid.uuid4().hex[:6]}.qcow2"
        await self.commands.record_file(Actor(owner), name, 3, "a" * 64)
        return name

    async def image(self, owner: str) -> str:
        name = f"i-{uuid.uuid4().hex[:6]}"
        await self.commands.create_image(Actor(owner), name, await self.file(owner))
        return name


@asynccontextmanager
async def auth_stack(tmp_path: Path, kind: Directory, slapd: Slapd | None = None, *,
                     limiter: FailureLimiter | None = None, session_ttl: float = 600.0) -> AsyncIterator[Stack]:
    directory: UserDirectory
    if kind == "ldap":
        assert slapd is not None
        directory = ldap_directory(slapd)
    else:
        directory = builtin_directory(tmp_path / "users.json")
    clock = ManualClock(T0)
    secrets = FileSecretStore(tmp_path / "secrets.json")
    seeds = {(name, realm): (await enrol(secrets, name, realm)).seed.reveal() for name, realm in ENROLLED}
    # Matrix tests make many failed attempts on purpose; the rate-limit tests pass their own limiter.
    limiter = limiter or FailureLimiter(RateLimitPolicy(10_000, 300), RateLimitPolicy(10_000, 300))
    auth = SessionAuthenticator(directory, LocalVerifier(secrets, clock=clock),
                                SessionSigner(secrets, ttl=session_ttl, clock=clock), limiter, Realms(),
                                secrets=secrets)
    store = SqliteEventStore(tmp_path / "events.sqlite")
    gateway = await start(GatewayConfig(store=store, listen=("127.0.0.1",), port=0, authenticator=auth,
                                        files_root=tmp_path / "files"))
    try:
        async with aiohttp.ClientSession() as http:
            yield Stack(gateway.url, gateway, store, auth, secrets, clock, http, kind, seeds)
    finally:
        await gateway.stop()
        await store.close()
        await auth.close()


def ldap_people() -> str:
    return LDAP_PEOPLE
