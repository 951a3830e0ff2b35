"""authenticate(): headers -> Actor, one refusal message for every reason; realm rights."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pyotp
import pytest
from multidict import CIMultiDict

from tests.support.auth import ManualClock
from tests.support.slapd import free_port
from ucloud.auth.directory import BuiltinDirectory, LdapConfig, LdapDirectory
from ucloud.auth.otp import LocalVerifier, MemoryUsedTokenCache, enrol
from ucloud.auth.ratelimit import FailureLimiter, RateLimitPolicy
from ucloud.auth.realms import (
    HEADER_NAME,
    HEADER_REALM,
    HEADER_TOKEN,
    Actor,
    AuthenticationFailed,
    AuthenticationUnavailable,
    BadCredentials,
    Forbidden,
    OtpAuthenticator,
    Realms,
    acting_for,
    authenticate,
    can_manage_hosts,
    check_access,
    may_access,
    owner_filter,
    require_admin,
)
from ucloud.auth.secrets import FileSecretStore
from ucloud.eventstore.errors import UnavailableError
from ucloud.gateway import identity

T0 = 1_700_000_000.0


@dataclass
class Auth:
    directory: BuiltinDirectory
    secrets: FileSecretStore
    verifier: LocalVerifier
    used: MemoryUsedTokenCache
    limiter: FailureLimiter
    otp_clock: ManualClock
    limit_clock: ManualClock
    seeds: dict[tuple[str, str], str]

    def token(self, name: str, realm: str, offset: float = 0) -> str:
        return pyotp.TOTP(self.seeds[(name, realm)]).at(self.otp_clock.now + offset)

    def wrong(self, *identities: tuple[str, str]) -> str:
        """A well-formed token valid for none of ``identities`` now."""
        valid = {self.token(n, r, o) for n, r in identities for o in (-30, 0, 30)}
        return next(t for t in (f"{i:06d}" for i in range(1000)) if t not in valid)

    async def login(self, name: str, realm: str, token: str | None = None, source: str = "2001:db8::1") -> Actor:
        headers = {HEADER_NAME: name, HEADER_REALM: realm,
                   HEADER_TOKEN: token if token is not None else self.token(name.lower(), realm)}
        return await authenticate(headers, source, directory=self.directory, verifier=self.verifier,
                                  limiter=self.limiter)


@pytest.fixture
async def auth(tmp_path: Path) -> AsyncIterator[Auth]:
    directory = BuiltinDirectory(tmp_path / "users.json")
    secrets = FileSecretStore(tmp_path / "secrets.json")
    otp_clock, limit_clock = ManualClock(T0), ManualClock(0)
    used = MemoryUsedTokenCache(otp_clock)
    verifier = LocalVerifier(secrets, used, clock=otp_clock)
    limiter = FailureLimiter(RateLimitPolicy(3, 60), RateLimitPolicy(10, 60), clock=limit_clock)
    directory.add_user("alice", "Alice")
    directory.add_user("root", "Root", realms=["ucloud", "ucloud-admin"])
    directory.add_user("mallory", "Mallory")
    seeds = {}
    for name, realm in [("alice", "ucloud"), ("alice", "ucloud-admin"), ("root", "ucloud-admin"),
                        ("mallory", "ucloud")]:
        seeds[(name, realm)] = (await enrol(secrets, name, realm)).seed.reveal()
    directory.disable_user("mallory")
    yield Auth(directory, secrets, verifier, used, limiter, otp_clock, limit_clock, seeds)


async def test_a_user_in_the_user_realm_is_no_admin(auth: Auth) -> None:
    assert await auth.login("alice", "ucloud") == Actor("alice", "ucloud", is_admin=False)


async def test_an_admin_in_the_admin_realm_is_admin(auth: Auth) -> None:
    assert await auth.login("root", "ucloud-admin") == Actor("root", "ucloud-admin", is_admin=True)


async def test_the_name_is_canonical_whatever_case_was_sent(auth: Auth) -> None:
    token = auth.token("alice", "ucloud")
    actor = await auth.login("ALICE", "ucloud", token)
    assert actor.name == "alice"
    with pytest.raises(AuthenticationFailed):  # the same token under another spelling is a replay
        await auth.login("Alice", "ucloud", token)


async def refusal(auth: Auth, name: str, realm: str, token: str, source: str = "2001:db8::1") -> AuthenticationFailed:
    with pytest.raises(AuthenticationFailed) as error:
        await auth.login(name, realm, token, source)
    assert type(error.value) is AuthenticationFailed
    return error.value


async def test_every_refusal_looks_the_same_to_the_client(auth: Auth, caplog: pytest.LogCaptureFixture) -> None:
    good = auth.token("alice", "ucloud")
    wrong = auth.wrong(("alice", "ucloud"), ("root", "ucloud-admin"))
    with caplog.at_level(logging.DEBUG):
        errors = {
            "unknown user": await refusal(auth, "nobody", "ucloud", good, "2001:db8:1::1"),
            "user disabled": await refusal(auth, "mallory", "ucloud", auth.token("mallory", "ucloud"),
                                           "2001:db8:2::1"),
            # alice has an admin seed, but the directory does not grant her the admin realm
            "realm not granted to user": await refusal(auth, "alice", "ucloud-admin",
                                                       auth.token("alice", "ucloud-admin"), "2001:db8:3::1"),
            "wrong or replayed token": await refusal(auth, "alice", "ucloud", wrong, "2001:db8:4::1"),
        }
        await auth.login("alice", "ucloud", good, "2001:db8:5::1")
        errors["replay"] = await refusal(auth, "alice", "ucloud", good, "2001:db8:5::1")
        for _ in range(3):
            await refusal(auth, "root", "ucloud-admin", wrong, "2001:db8:6::1")
        errors["rate limited"] = await refusal(auth, "root", "ucloud-admin", auth.token("root", "ucloud-admin"),
                                               "2001:db8:6::1")
    assert {str(e) for e in errors.values()} == {AuthenticationFailed.PUBLIC_MESSAGE}
    assert errors["replay"].reason == "wrong or replayed token"
    for reason, error in errors.items():
        if reason != "replay":
            assert error.reason == reason
    assert errors["rate limited"].retry_after == pytest.approx(60)
    # The server log has the reasons, never a token.
    assert "user disabled" in caplog.text and "rate limited" in caplog.text
    for token in (good, wrong, auth.token("mallory", "ucloud"), auth.token("root", "ucloud-admin")):
        assert token not in caplog.text


async def test_a_rate_limited_attempt_is_not_even_verified(auth: Auth) -> None:
    good = auth.token("alice", "ucloud")
    wrong = auth.wrong(("alice", "ucloud"))
    for _ in range(3):
        await refusal(auth, "alice", "ucloud", wrong)
    assert (await refusal(auth, "alice", "ucloud", good)).reason == "rate limited"
    assert len(auth.used) == 0  # the good token was not looked at, so not used up
    auth.limit_clock.advance(60)
    assert (await auth.login("alice", "ucloud", good)).name == "alice"


async def test_unknown_names_are_rate_limited_like_known_ones(auth: Auth) -> None:
    for name in ("alice", "nobody"):
        for _ in range(3):
            await refusal(auth, name, "ucloud", auth.wrong(("alice", "ucloud")))
        error = await refusal(auth, name, "ucloud", auth.wrong(("alice", "ucloud")))
        assert error.reason == "rate limited" and error.retry_after == pytest.approx(60)


async def test_a_success_clears_the_users_failures(auth: Auth) -> None:
    for _ in range(2):
        await refusal(auth, "alice", "ucloud", auth.wrong(("alice", "ucloud")))
    await auth.login("alice", "ucloud")
    auth.otp_clock.advance(30)
    for _ in range(2):
        await refusal(auth, "alice", "ucloud", auth.wrong(("alice", "ucloud")))
    await auth.login("alice", "ucloud")  # 4 failures in the window, but never 3 since the last success


@pytest.mark.parametrize(("headers", "message"), [
    ({HEADER_REALM: "ucloud", HEADER_TOKEN: "123456"}, "missing header X-Ucloud-User"),
    ({HEADER_NAME: "alice", HEADER_TOKEN: "123456"}, "missing header X-Ucloud-Realm"),
    ({HEADER_NAME: "alice", HEADER_REALM: "ucloud"}, "missing header X-Ucloud-Token"),
    ({HEADER_NAME: "  ", HEADER_REALM: "ucloud", HEADER_TOKEN: "123456"}, "missing header X-Ucloud-User"),
    ({HEADER_NAME: "alice", HEADER_REALM: "other", HEADER_TOKEN: "123456"}, "unknown realm in X-Ucloud-Realm"),
    ({HEADER_NAME: "alice", HEADER_REALM: "ucloud", HEADER_TOKEN: "12345"}, "X-Ucloud-Token must be 6 digits"),
    ({HEADER_NAME: "alice", HEADER_REALM: "ucloud", HEADER_TOKEN: "12345a"}, "X-Ucloud-Token must be 6 digits"),
    ({HEADER_NAME: "al ice", HEADER_REALM: "ucloud", HEADER_TOKEN: "123456"}, "spaces or control characters"),
    ({HEADER_NAME: "al\x00ice", HEADER_REALM: "ucloud", HEADER_TOKEN: "123456"}, "spaces or control characters"),
    ({HEADER_NAME: "a" * 300, HEADER_REALM: "ucloud", HEADER_TOKEN: "123456"}, "longer than 256"),
])
async def test_malformed_credentials_are_named(auth: Auth, headers: dict[str, str], message: str) -> None:
    with pytest.raises(BadCredentials, match=message):
        await authenticate(headers, "::1", directory=auth.directory, verifier=auth.verifier, limiter=auth.limiter)
    assert auth.limiter.tracked_keys == 0  # not a guess: not counted


async def test_headers_are_case_insensitive_and_must_not_repeat(auth: Auth) -> None:
    headers = CIMultiDict({"x-ucloud-user": "alice", "X-UCLOUD-REALM": "ucloud",
                           "x-Ucloud-Token": auth.token("alice", "ucloud")})
    actor = await authenticate(headers, "::1", directory=auth.directory, verifier=auth.verifier,
                               limiter=auth.limiter)
    assert actor.name == "alice"
    assert (await authenticate({"x-ucloud-user": "root", "x-ucloud-realm": "ucloud-admin",
                                "x-ucloud-token": auth.token("root", "ucloud-admin")}, "::1",
                               directory=auth.directory, verifier=auth.verifier, limiter=auth.limiter)).is_admin
    headers.add(HEADER_NAME, "root")
    with pytest.raises(BadCredentials, match="X-Ucloud-User appears 2 times"):
        await authenticate(headers, "::1", directory=auth.directory, verifier=auth.verifier, limiter=auth.limiter)


async def test_a_directory_that_is_down_is_unavailable_not_a_refusal(auth: Auth) -> None:
    directory = LdapDirectory(LdapConfig(urls=[f"ldap://127.0.0.1:{free_port()}"], base_dn="dc=x",
                                         connect_timeout=1, timeout=1))
    try:
        with pytest.raises(AuthenticationUnavailable, match="directory is unavailable"):
            await authenticate({HEADER_NAME: "alice", HEADER_REALM: "ucloud", HEADER_TOKEN: "123456"}, "::1",
                               directory=directory, verifier=auth.verifier, limiter=auth.limiter)
    finally:
        await directory.close()
    assert auth.limiter.tracked_keys == 0


async def test_custom_realm_names(auth: Auth) -> None:
    realms = Realms(admin="ucloud-admin", user="customers")
    auth.directory.add_user("carol", realms=["customers"])
    seed = (await enrol(auth.secrets, "carol", "customers")).seed.reveal()
    actor = await authenticate({HEADER_NAME: "carol", HEADER_REALM: "customers",
                                HEADER_TOKEN: pyotp.TOTP(seed).at(T0)}, "::1", directory=auth.directory,
                               verifier=auth.verifier, limiter=auth.limiter, realms=realms)
    assert actor == Actor("carol", "customers", is_admin=False)
    with pytest.raises(BadCredentials, match="'customers' or 'ucloud-admin'"):
        await authenticate({HEADER_NAME: "carol", HEADER_REALM: "ucloud", HEADER_TOKEN: "123456"}, "::1",
                           directory=auth.directory, verifier=auth.verifier, limiter=auth.limiter, realms=realms)


# -- rights --------------------------------------------------------------------------


def test_a_user_sees_and_touches_only_their_own() -> None:
    alice = Realms().actor("alice", "ucloud")
    assert not alice.is_admin and not can_manage_hosts(alice)
    assert owner_filter(alice) == "alice"
    assert may_access(alice, "alice") and not may_access(alice, "bob")
    check_access(alice, "alice")
    with pytest.raises(Forbidden, match="alice@ucloud may not access resources of 'bob'"):
        check_access(alice, "bob")
    assert acting_for(alice, None) == "alice" and acting_for(alice, "alice") == "alice"
    with pytest.raises(Forbidden, match="only the admin realm may act for others"):
        acting_for(alice, "bob")
    with pytest.raises(Forbidden, match="adding a host needs the admin realm"):
        require_admin(alice, "adding a host")


def test_an_admin_manages_hosts_sees_everything_and_acts_for_others() -> None:
    root = Realms().actor("root", "ucloud-admin")
    assert root.is_admin and can_manage_hosts(root)
    assert owner_filter(root) is None
    assert may_access(root, "bob")
    check_access(root, "bob")
    require_admin(root, "adding a host")
    assert acting_for(root, "bob") == "bob" and acting_for(root, None) == "root"
    assert str(root) == "root@ucloud-admin"


def test_the_gateway_seam_maps_refusals_to_401_and_outages_to_503() -> None:
    # The gateway's problem table answers 401 for identity.AuthenticationFailed and
    # 503 for UnavailableError; these classes plug into it without a new mapping.
    assert issubclass(AuthenticationFailed, identity.AuthenticationFailed)
    assert issubclass(BadCredentials, identity.AuthenticationFailed)
    assert issubclass(AuthenticationUnavailable, UnavailableError)
    assert AuthenticationFailed("x").challenge


async def test_the_otp_authenticator_plugs_into_the_gateway(auth: Auth) -> None:
    authenticator = OtpAuthenticator(auth.directory, auth.verifier, auth.limiter)
    assert isinstance(authenticator, identity.Authenticator)
    actor = await authenticator.authenticate(
        {HEADER_NAME: "root", HEADER_REALM: "ucloud-admin", HEADER_TOKEN: auth.token("root", "ucloud-admin")}, "::1")
    assert actor == Actor("root", "ucloud-admin", is_admin=True)
    assert identity.resolve_authenticator(authenticator) is authenticator
    await authenticator.close()


def test_realm_configuration_is_checked() -> None:
    with pytest.raises(ValueError, match="two different"):
        Realms(admin="x", user="x")
    with pytest.raises(ValueError, match="two different"):
        Realms(admin="")
    with pytest.raises(ValueError, match="unknown realm 'other'"):
        Realms().actor("alice", "other")
    assert Realms(admin="ops").actor("a", "ops").is_admin
