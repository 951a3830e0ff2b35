"""Session tokens, the CLI's credentials and TOTP step bookkeeping, and the secret scanner
the integration tests rely on."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from urllib.parse import quote

import jwt
import pyotp
import pytest

from tests.support.auth import ManualClock
from tests.support.secret_scan import leaks
from ucloud.auth.secrets import FileSecretStore
from ucloud.auth.sessions import SESSION_KEY, SessionInvalid, SessionSigner
from ucloud.cli.credentials import (
    STEP,
    Credentials,
    CredentialsError,
    Identity,
    Seed,
    Sessions,
    parse_seed,
)
from ucloud.commands.unit_of_work import Actor

T0 = 1_700_000_000.0


@pytest.fixture
def signer(tmp_path: Path) -> SessionSigner:
    return SessionSigner(FileSecretStore(tmp_path / "secrets.json"), ttl=600, clock=ManualClock(T0))


async def test_a_session_names_its_user_and_realm_until_it_expires(signer: SessionSigner) -> None:
    issued = await signer.issue(Actor("alice", "ucloud"))
    assert issued.expires_at == T0 + 600 and "Secret(***)" in repr(issued)
    assert await signer.verify(issued.token.reveal()) == ("alice", "ucloud")
    assert isinstance(signer.clock, ManualClock)
    signer.clock.advance(599)
    assert await signer.verify(issued.token.reveal()) == ("alice", "ucloud")
    signer.clock.advance(1)
    with pytest.raises(SessionInvalid, match="expired"):
        await signer.verify(issued.token.reveal())


async def test_forged_altered_and_foreign_sessions_are_refused(signer: SessionSigner, tmp_path: Path) -> None:
    token = (await signer.issue(Actor("alice", "ucloud"))).token.reveal()
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "root"
    claims["realm"] = "ucloud-admin"
    altered = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    other = SessionSigner(FileSecretStore(tmp_path / "other" / "secrets.json"), clock=signer.clock)
    foreign = (await other.issue(Actor("alice", "ucloud"))).token.reveal()
    unsigned = jwt.encode({"iss": "ucloud", "sub": "root", "realm": "ucloud-admin", "iat": 0, "exp": 4e9}, None,
                          algorithm="none")
    for bad in (f"{header}.{altered}.{signature}", foreign, unsigned, "garbage", token[:-2]):
        with pytest.raises(SessionInvalid):
            await signer.verify(bad)


async def test_the_session_key_is_created_once_and_shared_through_the_store(tmp_path: Path) -> None:
    store = FileSecretStore(tmp_path / "secrets.json")
    first, second = SessionSigner(store, clock=lambda: T0), SessionSigner(store, clock=lambda: T0)
    token = (await first.issue(Actor("bob"))).token.reveal()
    assert await second.verify(token) == ("bob", "ucloud")  # another gateway on the same store
    key = await store.get(SESSION_KEY)
    assert key is not None and len(base64.urlsafe_b64decode(key.reveal())) == 32
    assert os.stat(tmp_path / "secrets.json").st_mode & 0o777 == 0o600


def test_a_seed_is_taken_from_base32_or_a_provisioning_uri() -> None:
    seed = pyotp.random_base32(32)
    uri = pyotp.TOTP(seed).provisioning_uri(name="alice (ucloud)", issuer_name="ucloud")
    parsed, name, realm = parse_seed(uri)
    assert (parsed.reveal(), name, realm) == (seed, "alice", "ucloud")
    parsed, name, realm = parse_seed(" ".join([seed[:8].lower(), seed[8:]]) + "\n")
    assert (parsed.reveal(), name, realm) == (seed, None, None)
    assert repr(parsed) == "Seed(***)"


@pytest.mark.parametrize(("text", "error"), [
    ("this is not base32 at all, 0189!", "not valid base32"),
    ("JBSWY3DP", "too short"),
    ("otpauth://hotp/x?secret=JBSWY3DPEHPK3PXPJBSWY3DP&counter=1", "must be a TOTP"),
    ("otpauth://totp/x?secret=JBSWY3DPEHPK3PXPJBSWY3DP&digits=8", "6 digits"),
    ("otpauth://totp/x?digits=6", "not a usable"),
])
def test_a_bad_seed_is_named(text: str, error: str) -> None:
    with pytest.raises(CredentialsError, match=error):
        parse_seed(text)


def test_credentials_are_private_and_the_last_login_is_the_default(tmp_path: Path) -> None:
    credentials = Credentials(tmp_path / "ucloud" / "credentials")
    credentials.store(Identity("admin", "ucloud-admin", Seed("A" * 32)))
    credentials.store(Identity("alice", "ucloud", Seed("B" * 32)))
    assert credentials.default() == ("alice", "ucloud")
    assert credentials.find("ALICE", "ucloud") is not None and credentials.realms_of("admin") == ["ucloud-admin"]
    assert os.stat(credentials.path).st_mode & 0o777 == 0o600
    assert credentials.forget("alice", "ucloud") and credentials.default() == ("admin", "ucloud-admin")
    os.chmod(credentials.path, 0o644)
    with pytest.raises(CredentialsError, match="chmod 600"):
        credentials.identities()


def test_the_cli_never_sends_one_totp_step_twice(tmp_path: Path) -> None:
    clock = ManualClock(T0)
    sessions = Sessions(tmp_path / "sessions", clock=clock)
    current = int(clock.now // STEP)
    assert sessions.next_step("alice", "ucloud") == (current, 0.0)
    assert sessions.next_step("alice", "ucloud") == (current + 1, 0.0)  # the gateway's window allows it
    step, wait = sessions.next_step("alice", "ucloud")  # both used: wait for the step after
    assert step == current + 2 and wait == pytest.approx((current + 1) * STEP - clock.now + 0.5)
    assert sessions.next_step("bob", "ucloud") == (current, 0.0)  # per identity
    clock.advance(3 * STEP)
    assert sessions.next_step("alice", "ucloud") == (current + 3, 0.0)


def test_cached_sessions_are_not_used_in_their_last_seconds(tmp_path: Path) -> None:
    clock = ManualClock(T0)
    sessions = Sessions(tmp_path / "sessions", clock=clock)
    sessions.put("http://api", "alice", "ucloud", "tok", T0 + 100)
    assert sessions.get("http://api", "alice", "ucloud") == "tok"
    assert sessions.get("http://other", "alice", "ucloud") is None
    clock.advance(71)
    assert sessions.get("http://api", "alice", "ucloud") is None
    (tmp_path / "sessions").write_text("not json")  # a cache: a broken one is rebuilt, not fatal
    assert sessions.get("http://api", "alice", "ucloud") is None


def test_the_scanner_finds_a_seed_in_any_encoding() -> None:
    seed = pyotp.random_base32(32)
    raw = base64.b32decode(seed)
    key = base64.urlsafe_b64encode(os.urandom(32)).decode()
    for blob in (seed.encode(), seed.lower().encode(), raw, raw.hex().encode(), base64.b64encode(raw),
                 quote(f"otpauth://totp/x?secret={seed}", safe="").encode(), seed.encode("utf-16-le")):
        assert leaks(b"..." + blob + b"...", {"seed": seed}) == ["seed"], blob
    assert leaks(base64.urlsafe_b64decode(key), {"key": key}) == ["key"]
    assert leaks(b"nothing to see", {"seed": seed, "key": key}) == []
