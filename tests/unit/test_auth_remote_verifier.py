"""RemoteVerifier against a real HTTP server speaking the ungleich-otp verify protocol."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pyotp
import pytest

from tests.support.auth import ManualClock, OtpService
from tests.support.slapd import free_port
from ucloud.auth.otp import RemoteVerifier
from ucloud.auth.secrets import Secret

T0 = 1_700_000_000.0


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
async def service(clock: ManualClock) -> AsyncIterator[OtpService]:
    service = await OtpService(clock).start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
async def verifier(service: OtpService, clock: ManualClock) -> AsyncIterator[RemoteVerifier]:
    own_seed = service.add("ucloud-gateway", "ungleich-auth")
    verifier = RemoteVerifier(service.url, name="ucloud-gateway", realm="ungleich-auth", seed=Secret(own_seed),
                              clock=clock, timeout=2.0)
    try:
        yield verifier
    finally:
        await verifier.close()


async def test_a_valid_token_is_accepted(service: OtpService, verifier: RemoteVerifier) -> None:
    seed = service.add("alice", "ucloud")
    assert await verifier.verify("alice", "ucloud", pyotp.TOTP(seed).at(T0), "::1")


async def test_the_request_carries_the_verifiers_own_valid_credentials(
        service: OtpService, verifier: RemoteVerifier) -> None:
    seed = service.add("alice", "ucloud")
    token = pyotp.TOTP(seed).at(T0)
    await verifier.verify("alice", "ucloud", token, "::1")
    (body,) = service.requests
    assert body["name"] == "alice" and body["realm"] == "ucloud" and body["token"] == token
    assert body["auth_name"] == "ucloud-gateway" and body["auth_realm"] == "ungleich-auth"
    own_seed = service.seeds[("ucloud-gateway", "ungleich-auth")]
    assert pyotp.TOTP(own_seed).verify(body["auth_token"], for_time=T0)


async def test_a_wrong_token_or_unknown_user_is_refused(service: OtpService, verifier: RemoteVerifier) -> None:
    seed = service.add("alice", "ucloud")
    wrong = f"{(int(pyotp.TOTP(seed).at(T0)) + 1) % 1_000_000:06d}"
    assert not await verifier.verify("alice", "ucloud", wrong, "::1")
    assert not await verifier.verify("nobody", "ucloud", pyotp.TOTP(seed).at(T0), "::1")


async def test_a_verifier_with_the_wrong_own_seed_is_refused(service: OtpService, clock: ManualClock) -> None:
    service.add("ucloud-gateway", "ungleich-auth")
    seed = service.add("alice", "ucloud")
    verifier = RemoteVerifier(service.url, name="ucloud-gateway", realm="ungleich-auth",
                              seed=Secret(pyotp.random_base32()), clock=clock)
    try:
        assert not await verifier.verify("alice", "ucloud", pyotp.TOTP(seed).at(T0), "::1")
    finally:
        await verifier.close()


async def test_a_malformed_token_is_refused_without_asking(service: OtpService, verifier: RemoteVerifier) -> None:
    assert not await verifier.verify("alice", "ucloud", "12 456", "::1")
    assert service.requests == []


async def test_a_timeout_is_a_refusal_with_a_logged_reason_and_no_token(
        service: OtpService, clock: ManualClock, caplog: pytest.LogCaptureFixture) -> None:
    own = service.add("ucloud-gateway", "ungleich-auth")
    seed = service.add("alice", "ucloud")
    service.delay = 5.0
    verifier = RemoteVerifier(service.url, name="ucloud-gateway", realm="ungleich-auth", seed=Secret(own),
                              clock=clock, timeout=0.2)
    token = pyotp.TOTP(seed).at(T0)
    try:
        with caplog.at_level(logging.DEBUG):
            assert not await verifier.verify("alice", "ucloud", token, "::1")
    finally:
        await verifier.close()
    assert "did not answer within 0.2 s" in caplog.text
    assert token not in caplog.text
    assert pyotp.TOTP(own).at(T0) not in caplog.text and own not in caplog.text


async def test_an_unreachable_service_is_a_refusal(clock: ManualClock, caplog: pytest.LogCaptureFixture) -> None:
    seed = pyotp.random_base32()
    url = f"http://127.0.0.1:{free_port()}/ungleichotp/verify/"  # nothing listens there
    verifier = RemoteVerifier(url, name="gw", realm="ungleich-auth", seed=Secret(seed), clock=clock)
    token = pyotp.TOTP(seed).at(T0)
    try:
        with caplog.at_level(logging.DEBUG):
            assert not await verifier.verify("alice", "ucloud", token, "::1")
    finally:
        await verifier.close()
    assert "cannot reach ungleich-otp at http://127.0.0.1" in caplog.text
    assert token not in caplog.text


@pytest.mark.parametrize("status", [400, 401, 404, 500, 502])
async def test_unexpected_statuses_are_refusals_with_a_logged_reason(
        service: OtpService, verifier: RemoteVerifier, caplog: pytest.LogCaptureFixture, status: int) -> None:
    seed = service.add("alice", "ucloud")
    service.status_override = status
    token = pyotp.TOTP(seed).at(T0)
    with caplog.at_level(logging.DEBUG):
        assert not await verifier.verify("alice", "ucloud", token, "::1")
    assert f"HTTP {status}" in caplog.text
    assert token not in caplog.text


def test_configuration_errors_are_clear_and_do_not_echo_the_seed(clock: ManualClock) -> None:
    with pytest.raises(ValueError, match="http"):
        RemoteVerifier("ftp://otp.example/", name="gw", realm="r", seed=Secret(pyotp.random_base32()))
    with pytest.raises(ValueError, match="not valid base32") as error:
        RemoteVerifier("http://otp.example/", name="gw", realm="r", seed=Secret("!!seed!!"))
    assert "!!seed!!" not in str(error.value)
    with pytest.raises(TypeError, match="Secret"):
        RemoteVerifier("http://otp.example/", name="gw", realm="r", seed="ABC")  # type: ignore[arg-type]


def test_repr_hides_the_seed_and_credentials_in_the_url() -> None:
    seed = pyotp.random_base32()
    verifier = RemoteVerifier("https://user:pw@otp.example:8443/ungleichotp/verify/", name="gw", realm="r",
                              seed=Secret(seed))
    assert seed not in repr(verifier)
    assert "pw" not in repr(verifier) and "pw@" not in verifier.url_for_log
    assert verifier.url_for_log == "https://otp.example:8443/ungleichotp/verify/"
