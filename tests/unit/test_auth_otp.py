"""TOTP verification against the secret store, one-time use, enrolment, QR codes."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pyotp
import pytest

from tests.support.auth import ManualClock
from ucloud.auth.otp import (
    AlreadyEnrolled,
    LocalVerifier,
    MemoryUsedTokenCache,
    enrol,
    qr_matrix,
    render_qr,
    unenrol,
    well_formed,
)
from ucloud.auth.secrets import FileSecretStore, Secret, otp_key

T0 = 1_700_000_000.0  # 56666666 * 30 + 20: 20 s into a step
SEED = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
async def store(tmp_path: Path) -> FileSecretStore:
    store = FileSecretStore(tmp_path / "secrets.json")
    await store.put(otp_key("ucloud", "alice"), Secret(SEED))
    return store


@pytest.fixture
def verifier(store: FileSecretStore, clock: ManualClock) -> LocalVerifier:
    return LocalVerifier(store, clock=clock)


def token_at(seconds: float, seed: str = SEED) -> str:
    """The token an authenticator app shows at ``seconds``: pyotp's own TOTP."""
    return pyotp.TOTP(seed).at(seconds)


async def test_the_current_token_is_accepted(verifier: LocalVerifier) -> None:
    assert await verifier.verify("alice", "ucloud", token_at(T0), "::1")


async def test_a_wrong_token_is_refused(verifier: LocalVerifier) -> None:
    wrong = f"{(int(token_at(T0)) + 1) % 1_000_000:06d}"
    assert not await verifier.verify("alice", "ucloud", wrong, "::1")


@pytest.mark.parametrize("offset", [-30, +30])
async def test_the_previous_and_next_steps_are_accepted(verifier: LocalVerifier, offset: int) -> None:
    assert await verifier.verify("alice", "ucloud", token_at(T0 + offset), "::1")


@pytest.mark.parametrize("offset", [-60, +60, -90, +90])
async def test_two_or_more_steps_off_are_refused(verifier: LocalVerifier, offset: int) -> None:
    token = token_at(T0 + offset)
    assert token not in {token_at(T0 - 30), token_at(T0), token_at(T0 + 30)}  # no accidental collision
    assert not await verifier.verify("alice", "ucloud", token, "::1")


async def test_a_replayed_token_is_refused(verifier: LocalVerifier, clock: ManualClock) -> None:
    token = token_at(T0)
    assert await verifier.verify("alice", "ucloud", token, "::1")
    assert not await verifier.verify("alice", "ucloud", token, "::1")
    clock.advance(30)  # still inside its window, now as the previous step
    assert not await verifier.verify("alice", "ucloud", token, "2001:db8::1")


async def test_a_token_used_early_cannot_be_replayed_in_its_own_step(verifier: LocalVerifier,
                                                                     clock: ManualClock) -> None:
    early = token_at(T0 + 30)  # the next step's token, used now (client clock ahead)
    assert await verifier.verify("alice", "ucloud", early, "::1")
    clock.advance(30)
    assert not await verifier.verify("alice", "ucloud", early, "::1")
    # The step after it has a token of its own, which is fresh.
    clock.advance(30)
    assert await verifier.verify("alice", "ucloud", token_at(clock.now), "::1")


async def test_concurrent_uses_of_one_token_succeed_exactly_once(verifier: LocalVerifier) -> None:
    token = token_at(T0)
    results = await asyncio.gather(*(verifier.verify("alice", "ucloud", token, "::1") for _ in range(10)))
    assert results.count(True) == 1


async def test_the_used_token_cache_forgets_expired_tokens(store: FileSecretStore, clock: ManualClock) -> None:
    cache = MemoryUsedTokenCache(clock)
    verifier = LocalVerifier(store, cache, clock=clock)
    for _ in range(5):
        assert await verifier.verify("alice", "ucloud", token_at(clock.now), "::1")
        clock.advance(30)
    # Now is step S+5: only the token of S+4 could still be valid (window -1); the rest are gone.
    assert len(cache) == 1
    clock.advance(30)
    assert len(cache) == 0


@pytest.mark.parametrize("token", ["", "12345", "1234567", "abcdef", "12 345", " 12345", "١٢٣٤٥٦", "12345\n"])
async def test_malformed_tokens_are_refused(verifier: LocalVerifier, token: str) -> None:
    assert not well_formed(token)
    assert not await verifier.verify("alice", "ucloud", token, "::1")


async def test_unknown_users_and_other_realms_are_refused(verifier: LocalVerifier) -> None:
    token = token_at(T0)
    assert not await verifier.verify("mallory", "ucloud", token, "::1")
    assert not await verifier.verify("alice", "ucloud-admin", token, "::1")
    assert not await verifier.verify("../alice", "ucloud", token, "::1")
    assert await verifier.verify("alice", "ucloud", token, "::1")  # not consumed by the refusals


async def test_a_corrupt_seed_is_refused_and_logged_without_the_seed(
        store: FileSecretStore, verifier: LocalVerifier, caplog: pytest.LogCaptureFixture) -> None:
    await store.put(otp_key("ucloud", "broken"), Secret("not base32 !!"))
    with caplog.at_level(logging.DEBUG):
        assert not await verifier.verify("broken", "ucloud", "123456", "::1")
    assert "not valid base32" in caplog.text
    assert "not base32 !!" not in caplog.text


def test_bad_parameters_are_refused(tmp_path: Path) -> None:
    store = FileSecretStore(tmp_path / "s.json")
    for kwargs in ({"step": 0}, {"window": -1}, {"digits": 4}):
        with pytest.raises(ValueError, match="bad TOTP parameters"):
            LocalVerifier(store, **kwargs)  # type: ignore[arg-type]


# -- enrolment -------------------------------------------------------------------------


async def test_enrolment_creates_a_seed_that_an_authenticator_can_use(
        tmp_path: Path, clock: ManualClock, caplog: pytest.LogCaptureFixture) -> None:
    store = FileSecretStore(tmp_path / "secrets.json")
    with caplog.at_level(logging.DEBUG):
        enrolment = await enrol(store, "bob", "ucloud-admin")
    uri = enrolment.provisioning_uri.reveal()
    seed = enrolment.seed.reveal()
    assert len(seed) == 32
    parsed = pyotp.parse_uri(uri)
    assert isinstance(parsed, pyotp.TOTP)
    assert parsed.secret == seed and parsed.interval == 30 and parsed.digits == 6
    assert parsed.issuer == "ucloud" and "bob" in uri and "ucloud-admin" in uri
    assert await store.get(otp_key("ucloud-admin", "bob")) == enrolment.seed
    verifier = LocalVerifier(store, clock=clock)
    assert await verifier.verify("bob", "ucloud-admin", parsed.at(clock.now), "::1")
    # Shown once, logged never.
    for text in (repr(enrolment), str(enrolment), caplog.text):
        assert seed not in text and uri not in text
    assert "enrolled 'bob'" in caplog.text


async def test_enrolling_twice_is_refused_unless_replacing(tmp_path: Path, clock: ManualClock) -> None:
    store = FileSecretStore(tmp_path / "secrets.json")
    first = await enrol(store, "bob", "ucloud")
    with pytest.raises(AlreadyEnrolled, match="replace=True"):
        await enrol(store, "bob", "ucloud")
    second = await enrol(store, "bob", "ucloud", replace=True)
    assert first.seed != second.seed
    verifier = LocalVerifier(store, clock=clock)
    old_token = pyotp.TOTP(first.seed.reveal()).at(clock.now)
    assert old_token != pyotp.TOTP(second.seed.reveal()).at(clock.now)
    assert not await verifier.verify("bob", "ucloud", old_token, "::1")
    assert await verifier.verify("bob", "ucloud", pyotp.TOTP(second.seed.reveal()).at(clock.now), "::1")
    assert await unenrol(store, "bob", "ucloud")
    assert not await unenrol(store, "bob", "ucloud")
    assert await store.get(otp_key("ucloud", "bob")) is None


def _parse_render(text: str, dark_terminal: bool) -> list[list[bool]]:
    glyphs = {" ": (False, False), "\u2580": (True, False), "\u2584": (False, True), "\u2588": (True, True)}
    rows: list[list[bool]] = []
    for line in text.rstrip("\n").split("\n"):
        pairs = [glyphs[c] for c in line]
        rows.append([top != dark_terminal for top, _ in pairs])
        rows.append([bottom != dark_terminal for _, bottom in pairs])
    return rows


@pytest.mark.parametrize("dark_terminal", [True, False])
def test_the_terminal_qr_code_is_a_faithful_picture_of_the_uri(dark_terminal: bool) -> None:
    uri = pyotp.TOTP(SEED).provisioning_uri(name="alice (ucloud)", issuer_name="ucloud")
    text = render_qr(Secret(uri), dark_terminal=dark_terminal)
    expected = qr_matrix(uri)
    picture = _parse_render(text, dark_terminal)
    assert picture[: len(expected)] == expected
    assert len(expected) >= 29  # a real QR code (version 3+) for a URI this long
    assert len({len(line) for line in text.rstrip("\n").split("\n")}) == 1
    assert render_qr(uri, dark_terminal=dark_terminal) == text  # Secret or str alike
    assert render_qr(uri + "x", dark_terminal=dark_terminal) != text
