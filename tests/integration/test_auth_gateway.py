"""The OTP authenticator plugged into the real gateway through its Authenticator seam."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pyotp
import pytest

from tests.support.auth import ManualClock
from tests.support.slapd import free_port
from ucloud.auth.directory import BuiltinDirectory, LdapConfig, LdapDirectory
from ucloud.auth.otp import LocalVerifier, enrol
from ucloud.auth.ratelimit import FailureLimiter
from ucloud.auth.realms import (
    HEADER_NAME,
    HEADER_REALM,
    HEADER_TOKEN,
    AuthenticationFailed,
    OtpAuthenticator,
)
from ucloud.auth.secrets import FileSecretStore
from ucloud.eventstore.memory import MemoryEventStore
from ucloud.gateway.app import GatewayConfig, RunningGateway, start

T0 = 1_700_000_000.0


@dataclass
class Served:
    url: str
    seeds: dict[str, str]
    clock: ManualClock

    def headers(self, name: str, realm: str, token: str | None = None) -> dict[str, str]:
        return {HEADER_NAME: name, HEADER_REALM: realm,
                HEADER_TOKEN: token if token is not None else pyotp.TOTP(self.seeds[name]).at(self.clock.now)}


async def serve(authenticator: OtpAuthenticator) -> tuple[RunningGateway, MemoryEventStore]:
    store = MemoryEventStore()
    gateway = await start(GatewayConfig(store=store, listen=("127.0.0.1",), port=0, authenticator=authenticator))
    return gateway, store


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    directory = BuiltinDirectory(tmp_path / "users.json")
    secrets = FileSecretStore(tmp_path / "secrets.json")
    clock = ManualClock(T0)
    directory.add_user("alice")
    directory.add_user("root", realms=["ucloud", "ucloud-admin"])
    seeds = {"alice": (await enrol(secrets, "alice", "ucloud")).seed.reveal(),
             "root": (await enrol(secrets, "root", "ucloud-admin")).seed.reveal()}
    authenticator = OtpAuthenticator(directory, LocalVerifier(secrets, clock=clock), FailureLimiter())
    gateway, store = await serve(authenticator)
    try:
        yield Served(gateway.url, seeds, clock)
    finally:
        await gateway.stop()
        await store.close()
        await authenticator.close()


async def get(url: str, headers: dict[str, str]) -> tuple[int, dict[str, object], aiohttp.ClientResponse]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, await response.json(content_type=None), response


async def test_a_valid_token_gets_in_and_a_replay_does_not(served: Served) -> None:
    headers = served.headers("alice", "ucloud")
    status, body, _ = await get(f"{served.url}/v1/vms", headers)
    assert status == 200, body
    status, body, response = await get(f"{served.url}/v1/vms", headers)
    assert status == 401 and body["detail"] == AuthenticationFailed.PUBLIC_MESSAGE
    assert response.headers["WWW-Authenticate"]


async def test_an_admin_token_reaches_admin_routes_and_a_user_token_does_not(served: Served) -> None:
    status, body, _ = await get(f"{served.url}/v1/hosts", served.headers("root", "ucloud-admin"))
    assert status == 200, body
    status, body, _ = await get(f"{served.url}/v1/hosts", served.headers("alice", "ucloud"))
    assert status in (403, 404), body  # the gateway hides admin routes from users as 404


async def test_unknown_users_and_wrong_tokens_get_the_same_answer(served: Served) -> None:
    wrong = "000000" if pyotp.TOTP(served.seeds["alice"]).at(T0) != "000000" else "111111"
    answers = [await get(f"{served.url}/v1/vms", h) for h in (
        served.headers("alice", "ucloud", wrong),
        served.headers("nobody", "ucloud", pyotp.TOTP(served.seeds["alice"]).at(T0)),
    )]
    assert [status for status, _, _ in answers] == [401, 401]
    assert answers[0][1]["detail"] == answers[1][1]["detail"] == AuthenticationFailed.PUBLIC_MESSAGE


async def test_a_missing_token_is_named(served: Served) -> None:
    status, body, _ = await get(f"{served.url}/v1/vms", {HEADER_NAME: "alice", HEADER_REALM: "ucloud"})
    assert status == 401 and body["detail"] == "missing header X-Ucloud-Token"


async def test_a_directory_that_is_down_gives_503(tmp_path: Path) -> None:
    directory = LdapDirectory(LdapConfig(urls=[f"ldap://127.0.0.1:{free_port()}"], base_dn="dc=x",
                                         connect_timeout=1, timeout=1))
    authenticator = OtpAuthenticator(directory, LocalVerifier(FileSecretStore(tmp_path / "s.json")))
    gateway, store = await serve(authenticator)
    try:
        status, body, response = await get(f"{gateway.url}/v1/vms",
                                           {HEADER_NAME: "alice", HEADER_REALM: "ucloud", HEADER_TOKEN: "123456"})
    finally:
        await gateway.stop()
        await store.close()
        await authenticator.close()
    assert status == 503 and "directory is unavailable" in str(body["detail"])
    assert response.headers["Retry-After"]
