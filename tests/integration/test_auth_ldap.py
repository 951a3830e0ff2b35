"""LdapDirectory against a real slapd (Debian OpenLDAP 2.5) on a loopback port."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import pyotp
import pytest

from tests.support.auth import ManualClock
from tests.support.slapd import (
    BASE_DN,
    GROUPS_DN,
    PEOPLE_DN,
    SERVICE_DN,
    SERVICE_PW,
    Slapd,
    free_port,
    group_ldif,
    person_ldif,
    slapd_server,
)
from ucloud.auth.directory import (
    DirectoryError,
    DirectoryUnavailable,
    LdapConfig,
    LdapDirectory,
    User,
)
from ucloud.auth.otp import LocalVerifier, enrol
from ucloud.auth.ratelimit import FailureLimiter
from ucloud.auth.realms import (
    HEADER_NAME,
    HEADER_REALM,
    HEADER_TOKEN,
    Actor,
    AuthenticationFailed,
    authenticate,
)
from ucloud.auth.secrets import FileSecretStore, Secret

pytestmark = pytest.mark.ldap

PEOPLE = "\n".join([
    person_ldif("alice", "Alice Liddell", "alice@example.org"),
    person_ldif("bob", "Bob Builder", "bob@example.org", employee_type="disabled"),
    person_ldif("carol", "Carol Shaw", employee_type="staff"),
    person_ldif("dave", "Dave Admin", "dave@example.org"),
    person_ldif("star*user", "Star User"),
    # Two entries with one uid in different subtrees: a directory the filter cannot disambiguate.
    person_ldif("twin", "Twin One"),
    f"dn: ou=more,{BASE_DN}\nobjectClass: organizationalUnit\nou: more\n",
    person_ldif("twin", "Twin Two").replace(PEOPLE_DN, f"ou=more,{BASE_DN}"),
    group_ldif("admins", ["dave"]),
    group_ldif("ops", ["alice", "dave"]),
])


@pytest.fixture(scope="module")
def slapd() -> Iterator[Slapd]:
    with slapd_server(PEOPLE) as server:
        yield server


def config(server: Slapd, **overrides: object) -> LdapConfig:
    base = LdapConfig(urls=[server.url], base_dn=BASE_DN, bind_dn=SERVICE_DN, bind_password=Secret(SERVICE_PW),
                      connect_timeout=2, timeout=5)
    return replace(base, **overrides)  # type: ignore[arg-type]


@pytest.fixture
async def directory(slapd: Slapd) -> AsyncIterator[LdapDirectory]:
    directory = LdapDirectory(config(slapd))
    try:
        yield directory
    finally:
        await directory.close()


async def test_a_user_is_found_with_their_attributes(directory: LdapDirectory) -> None:
    assert await directory.lookup("alice") == User(
        name="alice", display_name="Alice Liddell", email="alice@example.org", enabled=True, realms=None)


async def test_names_match_case_insensitively_and_come_back_canonical(directory: LdapDirectory) -> None:
    user = await directory.lookup("ALICE")
    assert user is not None and user.name == "alice"


async def test_an_unknown_user_is_none(directory: LdapDirectory) -> None:
    assert await directory.lookup("nobody") is None
    assert await directory.lookup("") is None


async def test_a_user_marked_disabled_is_disabled(directory: LdapDirectory) -> None:
    bob = await directory.lookup("bob")
    assert bob is not None and bob.enabled is False
    carol = await directory.lookup("carol")  # another employeeType value does not disable
    assert carol is not None and carol.enabled is True and carol.email is None


async def test_disabled_by_mere_presence_of_an_attribute(slapd: Slapd) -> None:
    directory = LdapDirectory(config(slapd, disabled_attribute="employeeType", disabled_values=None))
    try:
        assert not (await directory.lookup("carol")).enabled  # type: ignore[union-attr]
        assert (await directory.lookup("alice")).enabled  # type: ignore[union-attr]
    finally:
        await directory.close()


@pytest.mark.parametrize("name", [
    "*", "*)(uid=*", "alice)(uid=*", "*)(|(uid=*", "al*", "*ice", "alice)", "(uid=alice)", "\\2a",
    "alice\x00", "alice)(objectClass=*", "star*",
])
async def test_filter_injection_matches_nothing(directory: LdapDirectory, name: str) -> None:
    assert await directory.lookup(name) is None


async def test_special_characters_in_a_real_name_are_matched_literally(directory: LdapDirectory) -> None:
    user = await directory.lookup("star*user")
    assert user is not None and user.name == "star*user"


async def test_a_filter_that_matches_two_entries_is_an_error(directory: LdapDirectory) -> None:
    with pytest.raises(DirectoryError, match="matches more than one entry for 'twin'"):
        await directory.lookup("twin")


async def test_groups_map_to_realms(slapd: Slapd) -> None:
    directory = LdapDirectory(config(slapd, group_base_dn=GROUPS_DN, realm_groups={"admins": "ucloud-admin"}))
    try:
        dave = await directory.lookup("dave")
        alice = await directory.lookup("alice")
        carol = await directory.lookup("carol")
    finally:
        await directory.close()
    assert dave is not None and dave.groups == {"admins", "ops"} and dave.realms == {"ucloud", "ucloud-admin"}
    assert alice is not None and alice.groups == {"ops"} and alice.realms == {"ucloud"}
    assert carol is not None and carol.groups == frozenset() and carol.realms == {"ucloud"}


async def test_connections_are_reused(slapd: Slapd) -> None:
    directory = LdapDirectory(config(slapd, pool_size=3))
    try:
        for _ in range(10):
            assert (await directory.lookup("alice")) is not None
        assert directory.connections_opened == 1
        names = ["alice", "bob", "carol", "dave", "nobody"] * 8
        users = await asyncio.gather(*(directory.lookup(n) for n in names))
        assert [u.name if u else None for u in users] == [None if n == "nobody" else n for n in names]
        assert directory.connections_opened <= 3
        assert directory.open_connections == directory.connections_opened
    finally:
        await directory.close()
    assert directory.open_connections == 0


async def test_a_wrong_bind_password_is_a_clear_error_without_the_password(slapd: Slapd) -> None:
    directory = LdapDirectory(config(slapd, bind_password=Secret("not-the-password")))
    try:
        with pytest.raises(DirectoryError, match="invalid credentials") as error:
            await directory.lookup("alice")
    finally:
        await directory.close()
    assert not isinstance(error.value, DirectoryUnavailable)
    assert "not-the-password" not in str(error.value) and SERVICE_DN in str(error.value)


async def test_an_anonymous_bind_sees_nothing_and_says_so(slapd: Slapd) -> None:
    directory = LdapDirectory(config(slapd, bind_dn=None, bind_password=None))
    try:
        with pytest.raises(DirectoryError, match="does not exist .or the service account may not read it"):
            await directory.lookup("alice")
    finally:
        await directory.close()


async def test_a_wrong_base_dn_is_named(slapd: Slapd) -> None:
    directory = LdapDirectory(config(slapd, base_dn="dc=nowhere,dc=test"))
    try:
        with pytest.raises(DirectoryError, match="base DN 'dc=nowhere,dc=test' does not exist"):
            await directory.lookup("alice")
    finally:
        await directory.close()


async def test_a_server_that_is_down_is_unavailable_and_picked_up_again() -> None:
    with slapd_server(person_ldif("alice", "Alice")) as server:
        directory = LdapDirectory(config(server, pool_size=2))
        try:
            await asyncio.gather(directory.lookup("alice"), directory.lookup("alice"))  # fill the pool
            server.stop()
            with pytest.raises(DirectoryUnavailable, match=f"LDAP {server.url}"):
                await directory.lookup("alice")
            server.start()
            assert (await directory.lookup("alice")) is not None
        finally:
            await directory.close()


async def test_a_restarted_server_is_used_without_an_error(slapd: Slapd) -> None:
    with slapd_server(person_ldif("alice", "Alice")) as server:
        directory = LdapDirectory(config(server, pool_size=3))
        try:
            await asyncio.gather(*(directory.lookup("alice") for _ in range(3)))
            server.restart()  # every pooled connection is now dead
            assert (await directory.lookup("alice")) is not None
        finally:
            await directory.close()


async def test_a_server_pool_fails_over_to_the_next_url(slapd: Slapd) -> None:
    dead = f"ldap://127.0.0.1:{free_port()}"
    directory = LdapDirectory(config(slapd, urls=[dead, slapd.url]))
    try:
        assert (await directory.lookup("alice")) is not None
    finally:
        await directory.close()


async def test_a_server_that_never_answers_times_out_without_blocking_the_loop() -> None:
    # A socket that listens but never answers: the TCP connect succeeds, the bind hangs.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        directory = LdapDirectory(LdapConfig(urls=[f"ldap://127.0.0.1:{port}"], base_dn=BASE_DN, bind_dn=SERVICE_DN,
                                             bind_password=Secret(SERVICE_PW), connect_timeout=1, timeout=1))
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        try:
            with pytest.raises(DirectoryUnavailable, match=f"127.0.0.1:{port}"):
                await directory.lookup("alice")
        finally:
            task.cancel()
            await directory.close()
    assert ticks >= 10  # the loop ran on while the search waited in its thread


async def test_starttls_refused_by_a_server_without_tls_is_unavailable(slapd: Slapd) -> None:
    directory = LdapDirectory(config(slapd, tls="starttls"))
    try:
        with pytest.raises(DirectoryUnavailable, match="StartTLS"):
            await directory.lookup("alice")
    finally:
        await directory.close()


@pytest.mark.parametrize(("settings", "message"), [
    ({"urls": []}, "at least one server URL"),
    ({"urls": ["http://x"]}, "not an ldap:// or ldaps:// URL"),
    ({"urls": ["ldap://x:99999"]}, "invalid port"),
    ({"urls": ["ldap://x/dc=a"]}, "base_dn is a separate key"),
    ({"user_filter": "(uid=alice)"}, "must contain {name}"),
    ({"user_filter": "(uid={name}"}, "not a valid LDAP filter"),
    ({"tls": "starttls", "urls": ["ldaps://x"]}, "already TLS"),
    ({"tls": "yes"}, "tls must be"),
    ({"bind_password": None}, "both bind_dn and bind_password"),
    ({"bind_password": "plain"}, "must be a Secret"),
    ({"pool_size": 0}, "pool_size"),
    ({"timeout": 0}, "timeouts must be positive"),
    ({"realm_groups": {"a": "b"}}, "needs group_base_dn"),
    ({"group_base_dn": GROUPS_DN, "group_filter": "(cn=x)"}, "must contain {dn}"),
])
def test_configuration_mistakes_are_named(settings: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"urls": ["ldap://127.0.0.1"], "base_dn": BASE_DN, "bind_dn": SERVICE_DN,
                               "bind_password": Secret(SERVICE_PW)}
    with pytest.raises(DirectoryError, match=message):
        LdapConfig(**{**base, **settings})  # type: ignore[arg-type]


def test_configuration_from_keys() -> None:
    cfg = LdapConfig.from_mapping({"urls": "ldap://127.0.0.1:389", "base_dn": BASE_DN, "bind_dn": SERVICE_DN,
                                   "bind_password": SERVICE_PW})
    assert cfg.urls == ("ldap://127.0.0.1:389",) and isinstance(cfg.bind_password, Secret)
    assert SERVICE_PW not in repr(cfg)
    with pytest.raises(DirectoryError, match=r"unknown configuration keys \['bind_pw'\]"):
        LdapConfig.from_mapping({"urls": "ldap://h", "base_dn": BASE_DN, "bind_pw": "x"})


async def test_login_end_to_end_with_ldap_users_and_group_realms(slapd: Slapd, tmp_path: object) -> None:
    from pathlib import Path

    directory = LdapDirectory(config(slapd, group_base_dn=GROUPS_DN, realm_groups={"admins": "ucloud-admin"}))
    secrets = FileSecretStore(Path(str(tmp_path)) / "secrets.json")
    clock = ManualClock(1_700_000_000)
    verifier = LocalVerifier(secrets, clock=clock)
    limiter = FailureLimiter(clock=ManualClock(0))
    dave = (await enrol(secrets, "dave", "ucloud-admin")).seed.reveal()
    alice = (await enrol(secrets, "alice", "ucloud-admin")).seed.reveal()

    async def login(name: str, realm: str, seed: str) -> Actor:
        return await authenticate({HEADER_NAME: name, HEADER_REALM: realm,
                                   HEADER_TOKEN: pyotp.TOTP(seed).at(clock.now)}, "2001:db8::7",
                                  directory=directory, verifier=verifier, limiter=limiter)

    try:
        assert await login("Dave", "ucloud-admin", dave) == Actor("dave", "ucloud-admin", is_admin=True)
        with pytest.raises(AuthenticationFailed) as error:  # alice is not in the admins group
            await login("alice", "ucloud-admin", alice)
        assert error.value.reason == "realm not granted to user"
    finally:
        await directory.close()


async def test_enabled_admins_with_ldap_are_the_admin_seeds_ldap_backs(slapd: Slapd, tmp_path: object) -> None:
    # LDAP cannot be listed cheaply; the guard asks it about each admin seed instead.
    from pathlib import Path

    from ucloud.auth.admins import AdminGuard, LastAdmin, enabled_admins
    from ucloud.auth.realms import Realms

    assert isinstance(tmp_path, Path)
    secrets = FileSecretStore(tmp_path / "secrets.json")
    for name in ("dave", "alice", "bob", "nobody", "star*user"):
        await enrol(secrets, name, "ucloud-admin")  # bob is disabled, nobody is unknown
    realms = Realms()
    mapped = LdapDirectory(config(slapd, group_base_dn=GROUPS_DN, realm_groups={"admins": "ucloud-admin"}))
    unmapped = LdapDirectory(config(slapd))
    try:
        # Groups grant the realm: only dave; without realm_groups the seeds decide.
        assert await enabled_admins(mapped, secrets, realms) == {"dave"}
        assert await enabled_admins(unmapped, secrets, realms) == {"dave", "alice", "star*user"}
        dave = await mapped.lookup("dave")
        assert dave is not None
        with pytest.raises(LastAdmin):
            async with AdminGuard(mapped, secrets, realms).dropping_seed(dave, "ucloud-admin", replacing=False):
                pytest.fail("must not get here")
    finally:
        await mapped.close()
        await unmapped.close()
