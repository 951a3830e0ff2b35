"""Time-based one-time passwords (RFC 6238): verifying tokens and enrolling users.

Every API call carries a name, a realm and a 6-digit TOTP token, as ungleich-otp
does it. Two verifiers implement ``TokenVerifier``:

* ``LocalVerifier`` checks the token with ``pyotp`` against the seed in a
  ``SecretStore``: 30 s steps, one step of clock skew either way, and each token is
  accepted once. The used-token cache is behind ``UsedTokenCache``: one gateway keeps
  it in a private SQLite file (``SqliteUsedTokenCache``, so a restart forgets no used
  token), several gateways share ``EtcdUsedTokenCache``; ``MemoryUsedTokenCache`` is
  for tests and embedders that never restart within a token's window.
* ``RemoteVerifier`` asks an external ungleich-otp-compatible service.

Neither a token, a seed nor a provisioning URI is ever logged or put into an
exception message.
"""

from __future__ import annotations

import asyncio
import binascii
import heapq
import hmac
import logging
import math
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import pyotp
import qrcode
import qrcode.constants

from ucloud.eventstore.errors import UnavailableError
from ucloud.eventstore.etcd_client import EtcdClient, cmp_create, op_put

from .files import ensure_private_dir
from .secrets import InvalidSecretKey, Secret, SecretStore, otp_key

__all__ = [
    "DIGITS",
    "STEP",
    "WINDOW",
    "AlreadyEnrolled",
    "EtcdUsedTokenCache",
    "Enrolment",
    "LocalVerifier",
    "MemoryUsedTokenCache",
    "RemoteVerifier",
    "SqliteUsedTokenCache",
    "TokenVerifier",
    "UsedTokenCache",
    "enrol",
    "qr_matrix",
    "render_qr",
    "unenrol",
    "well_formed",
]

log = logging.getLogger(__name__)

Clock = Callable[[], float]

STEP = 30  # seconds per TOTP step (RFC 6238 default, what authenticator apps use)
WINDOW = 1  # steps of clock skew accepted either side of now
DIGITS = 6
SEED_LENGTH = 32  # base32 characters = 160 bits, the HMAC-SHA1 block RFC 4226 recommends

# Verifying against a dummy seed when a user has none keeps the work (and so the
# timing) the same for unknown users and known users with a wrong token.
_DUMMY_SEED = "A" * SEED_LENGTH


def well_formed(token: str, digits: int = DIGITS) -> bool:
    """True if ``token`` is exactly ``digits`` ASCII digits."""
    return isinstance(token, str) and len(token) == digits and token.isascii() and token.isdigit()


class TokenVerifier(ABC):
    """Decides whether ``token`` proves that the caller is ``name`` in ``realm``."""

    @abstractmethod
    async def verify(self, name: str, realm: str, token: str, source: str | None) -> bool:
        """True if the token is valid now (and, where the verifier tracks it, unused).

        ``source`` is the caller's address, for logging and policy. Never raises for
        a bad token. A backend that cannot answer (the etcd secret store or used-token
        cache) raises ``UnavailableError``, which the gateway answers with 503."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


# -- one-time use ------------------------------------------------------------------


class UsedTokenCache(ABC):
    """Remembers which (name, realm, timestep) tokens were already accepted.

    For one gateway, ``MemoryUsedTokenCache`` is enough. With several gateways the
    cache must be shared, or a token accepted by one gateway can be replayed against
    another within its window: use ``EtcdUsedTokenCache`` there."""

    @abstractmethod
    async def claim(self, name: str, realm: str, timestep: int, expires_at: float) -> bool:
        """Record a use; True only for the first claim of this key before ``expires_at``
        (wall-clock seconds, after which the token can no longer be valid anyway)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


class MemoryUsedTokenCache(UsedTokenCache):
    """The used-token cache of a single gateway process; expired entries are pruned."""

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self._used: dict[tuple[str, str, int], float] = {}
        self._expiry: list[tuple[float, tuple[str, str, int]]] = []

    def __len__(self) -> int:
        self._prune()
        return len(self._used)

    def _prune(self) -> None:
        now = self._clock()
        while self._expiry and self._expiry[0][0] <= now:
            expires_at, key = heapq.heappop(self._expiry)
            if self._used.get(key) == expires_at:
                del self._used[key]

    async def claim(self, name: str, realm: str, timestep: int, expires_at: float) -> bool:
        self._prune()
        key = (name, realm, timestep)
        if key in self._used:
            return False
        self._used[key] = expires_at
        heapq.heappush(self._expiry, (expires_at, key))
        return True


class SqliteUsedTokenCache(UsedTokenCache):
    """The used-token cache of one gateway, in a private SQLite file, so a token
    accepted before a restart (or a ``kill -9``) is still refused after it.

    One row per accepted token, keyed (name, realm, timestep) with its expiry; a claim
    is an ``INSERT OR IGNORE`` in a transaction, so two gateways' processes sharing the
    file cannot both claim one token either. Rows older than their window are deleted
    on the way (at most once per ``prune_every`` seconds), so the file stays as small as
    the tokens of the last minute or two. The file (and SQLite's journal beside it) is
    created 0600 in a 0700 directory: it holds no secret, but says who logged in when.
    Every call runs in a thread; the event loop never waits on the disk."""

    SCHEMA = ("CREATE TABLE IF NOT EXISTS used_otp (name TEXT NOT NULL, realm TEXT NOT NULL, "
              "timestep INTEGER NOT NULL, expires_at REAL NOT NULL, PRIMARY KEY (name, realm, timestep))")

    def __init__(self, path: str | Path, *, clock: Clock = time.time, prune_every: float = 60.0) -> None:
        self.path = Path(path)
        self._clock = clock
        self._prune_every = prune_every
        self._pruned_at = -math.inf
        self._mutex = threading.Lock()
        ensure_private_dir(self.path.parent)
        # SQLite gives its journal files the database file's mode: create it 0600 first.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
        self._db: sqlite3.Connection | None = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=10)
        self._db.execute(self.SCHEMA)

    def __repr__(self) -> str:
        return f"SqliteUsedTokenCache({str(self.path)!r})"

    def __len__(self) -> int:
        with self._mutex:
            assert self._db is not None
            row = self._db.execute("SELECT count(*) FROM used_otp WHERE expires_at > ?", (self._clock(),)).fetchone()
        return int(row[0])

    def _claim(self, name: str, realm: str, timestep: int, expires_at: float) -> bool:
        with self._mutex:
            if self._db is None:
                raise RuntimeError(f"{self!r} is closed")
            now = self._clock()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if now - self._pruned_at >= self._prune_every:
                    self._db.execute("DELETE FROM used_otp WHERE expires_at <= ?", (now,))
                    self._pruned_at = now
                # An expired row for this key (a clock that went back) does not count.
                self._db.execute("DELETE FROM used_otp WHERE name = ? AND realm = ? AND timestep = ? "
                                 "AND expires_at <= ?", (name, realm, timestep, now))
                claimed = self._db.execute(
                    "INSERT OR IGNORE INTO used_otp (name, realm, timestep, expires_at) VALUES (?, ?, ?, ?)",
                    (name, realm, timestep, expires_at)).rowcount == 1
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return claimed

    async def claim(self, name: str, realm: str, timestep: int, expires_at: float) -> bool:
        try:
            return await asyncio.to_thread(self._claim, name, realm, timestep, expires_at)
        except sqlite3.Error as error:  # locked past the timeout, disk full, I/O error: not the caller's fault
            log.error("used-token cache %s failed: %s", self.path, error)
            raise UnavailableError("the used-token cache is unavailable; try again later") from None

    async def close(self) -> None:
        with self._mutex:
            if self._db is not None:
                self._db.close()
                self._db = None


class EtcdUsedTokenCache(UsedTokenCache):
    """A used-token cache shared by all gateways: one etcd key per accepted token,
    created only if absent (a transaction) and attached to a lease that expires with
    the token's window. The keys hold no token, only which timestep was used."""

    def __init__(self, client: EtcdClient, prefix: str = "/auth/used-otp/", *, clock: Clock = time.time) -> None:
        if not prefix.startswith("/") or not prefix.endswith("/") or prefix.startswith("/v1/"):
            raise ValueError(f"used-token prefix {prefix!r} must start and end with '/' and lie outside /v1/")
        self.client = client
        self.prefix = prefix
        self._clock = clock

    async def claim(self, name: str, realm: str, timestep: int, expires_at: float) -> bool:
        key = f"{self.prefix}{quote(realm, safe='')}/{quote(name, safe='')}/{timestep}".encode()
        # etcd rounds short TTLs up to its minimum; a longer life only refuses more replays.
        ttl = max(1, math.ceil(expires_at - self._clock()))
        lease = await self.client.lease_grant(ttl)
        result = await self.client.txn([cmp_create(key, "==", 0)], [op_put(key, b"", lease=lease)])
        if not result.succeeded:
            await self.client.lease_revoke(lease)
        return result.succeeded


# -- local verification --------------------------------------------------------------


class LocalVerifier(TokenVerifier):
    """TOTP against the seeds in a SecretStore; each token is accepted once.

    ``clock`` returns Unix time (seconds); tests inject their own. Names must be
    canonical (as the directory returns them): seeds and used tokens are keyed by it.
    """

    def __init__(self, secrets: SecretStore, used: UsedTokenCache | None = None, *, clock: Clock = time.time,
                 step: int = STEP, window: int = WINDOW, digits: int = DIGITS) -> None:
        if step <= 0 or window < 0 or not 6 <= digits <= 10:
            raise ValueError(f"bad TOTP parameters: step={step} window={window} digits={digits}")
        self.secrets = secrets
        self.used = used if used is not None else MemoryUsedTokenCache(clock)
        self.clock = clock
        self.step = step
        self.window = window
        self.digits = digits

    def __repr__(self) -> str:
        return f"LocalVerifier({self.secrets!r}, step={self.step}, window={self.window})"

    async def close(self) -> None:
        await self.used.close()

    def _match(self, seed: str, token: str, now: float) -> int | None:
        """The timestep within the window whose code is ``token``; every candidate is
        compared (constant-time) so the work does not depend on which one matches."""
        totp = pyotp.TOTP(seed, digits=self.digits, interval=self.step)
        current = int(now // self.step)
        matched = None
        for timestep in range(current - self.window, current + self.window + 1):
            if timestep >= 0 and hmac.compare_digest(totp.generate_otp(timestep), token) and matched is None:
                matched = timestep
        return matched

    async def verify(self, name: str, realm: str, token: str, source: str | None) -> bool:
        if not well_formed(token, self.digits):
            return False
        try:
            seed = await self.secrets.get(otp_key(realm, name))
        except InvalidSecretKey:
            return False
        try:
            timestep = self._match(seed.reveal() if seed is not None else _DUMMY_SEED, token, self.clock())
        except (binascii.Error, ValueError):
            log.error("stored OTP seed of %r in realm %r is not valid base32; re-enrol the user", name, realm)
            return False
        if seed is None or timestep is None:
            return False
        expires_at = float((timestep + self.window + 1) * self.step)
        if not await self.used.claim(name, realm, timestep, expires_at):
            log.info("refused a replayed OTP token of %r in realm %r from %s", name, realm, source)
            return False
        return True


# -- remote verification (ungleich-otp) ---------------------------------------------


class RemoteVerifier(TokenVerifier):
    """Asks an ungleich-otp-compatible service whether a token is valid.

    Protocol: ``POST <url>`` with a JSON object holding the verifier's own identity
    (``auth_name``, ``auth_realm``, ``auth_token`` = the current TOTP of its own seed)
    and the identity to check (``name``, ``realm``, ``token``). 200 means valid, 403
    means not. Any other status, a timeout or a connection error count as "not
    valid" and are logged with the reason (never with a token). One-time use is the
    service's business.
    """

    def __init__(self, url: str, *, name: str, realm: str, seed: Secret, timeout: float = 5.0,
                 clock: Clock = time.time, session: aiohttp.ClientSession | None = None,
                 step: int = STEP, digits: int = DIGITS) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"ungleich-otp URL must be http(s)://host/..., got {url!r}")
        if not isinstance(seed, Secret):
            raise TypeError("the verifier's seed must be a Secret")
        try:
            self._own = pyotp.TOTP(seed.reveal(), digits=digits, interval=step)
            self._own.generate_otp(0)
        except (binascii.Error, ValueError):
            raise ValueError("the verifier's own OTP seed is not valid base32") from None
        self.url = url
        # What we log: no credentials that might sit in the URL.
        self.url_for_log = urlunsplit((parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else ""),
                                       parts.path, "", ""))
        self.name = name
        self.realm = realm
        self.timeout = timeout
        self.clock = clock
        self._session = session
        self._owns_session = session is None

    def __repr__(self) -> str:
        return f"RemoteVerifier({self.url_for_log!r}, name={self.name!r}, realm={self.realm!r})"

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def verify(self, name: str, realm: str, token: str, source: str | None) -> bool:
        if not well_formed(token, self._own.digits):
            return False
        body = {
            "auth_name": self.name,
            "auth_realm": self.realm,
            "auth_token": self._own.generate_otp(int(self.clock() // self._own.interval)),
            "name": name,
            "realm": realm,
            "token": token,
        }
        try:
            async with self._get_session().post(
                self.url, json=body, timeout=aiohttp.ClientTimeout(total=self.timeout)
            ) as response:
                status = response.status
                await response.read()
        except TimeoutError:
            log.warning("ungleich-otp at %s did not answer within %.1f s: refusing %r in realm %r",
                        self.url_for_log, self.timeout, name, realm)
            return False
        except aiohttp.ClientConnectionError as error:
            log.warning("cannot reach ungleich-otp at %s (%s: %s): refusing %r in realm %r",
                        self.url_for_log, type(error).__name__, _safe_error(error), name, realm)
            return False
        except aiohttp.ClientError as error:
            log.warning("ungleich-otp at %s failed (%s): refusing %r in realm %r",
                        self.url_for_log, type(error).__name__, name, realm)
            return False
        if status == 200:
            return True
        if status == 403:
            log.info("ungleich-otp refused the token of %r in realm %r from %s", name, realm, source)
        else:
            log.warning("ungleich-otp at %s answered HTTP %d (expected 200 or 403): refusing %r in realm %r; "
                        "check the verifier's own credentials (%r in %r)",
                        self.url_for_log, status, name, realm, self.name, self.realm)
        return False

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None


def _safe_error(error: Exception) -> str:
    # Connection errors describe host, port and OS error; nothing of the request body.
    return str(error)[:200]


# -- enrolment -----------------------------------------------------------------------


class AlreadyEnrolled(Exception):
    def __init__(self, name: str, realm: str) -> None:
        super().__init__(f"{name!r} already has an OTP seed in realm {realm!r}; pass replace=True to issue a new one")
        self.name = name
        self.realm = realm


class Enrolment:
    """The result of enrolling a user: shown once to the user, stored nowhere else.

    ``seed`` and ``provisioning_uri`` (the ``otpauth://`` URI an authenticator app
    scans) are ``Secret``s; the repr shows neither."""

    __slots__ = ("name", "provisioning_uri", "realm", "seed")

    def __init__(self, name: str, realm: str, seed: Secret, provisioning_uri: Secret) -> None:
        self.name = name
        self.realm = realm
        self.seed = seed
        self.provisioning_uri = provisioning_uri

    def __repr__(self) -> str:
        return f"Enrolment(name={self.name!r}, realm={self.realm!r}, seed=***, provisioning_uri=***)"

    __str__ = __repr__


async def enrol(secrets: SecretStore, name: str, realm: str, *, issuer: str = "ucloud", replace: bool = False,
                step: int = STEP, digits: int = DIGITS) -> Enrolment:
    """Create a fresh random seed for ``name`` in ``realm`` and store it.

    Refuses with AlreadyEnrolled if a seed exists, unless ``replace`` (which
    invalidates the old authenticator). ``name`` must be the directory's canonical
    name. The returned seed and URI are shown to the user once; never log them."""
    key = otp_key(realm, name)
    seed = Secret(pyotp.random_base32(SEED_LENGTH))
    if replace:
        await secrets.put(key, seed)
    elif not await secrets.put_new(key, seed):
        raise AlreadyEnrolled(name, realm)
    uri = pyotp.TOTP(seed.reveal(), digits=digits, interval=step).provisioning_uri(
        name=f"{name} ({realm})", issuer_name=issuer)
    log.info("enrolled %r in realm %r for OTP", name, realm)
    return Enrolment(name, realm, seed, Secret(uri))


async def unenrol(secrets: SecretStore, name: str, realm: str) -> bool:
    """Remove the seed of ``name`` in ``realm``; False if there was none."""
    return await secrets.delete(otp_key(realm, name))


# Half-block glyphs: each character shows two module rows (top, bottom).
_GLYPHS = {(False, False): " ", (True, False): "\u2580", (False, True): "\u2584", (True, True): "\u2588"}


def qr_matrix(data: Secret | str, border: int = 2) -> list[list[bool]]:
    """The QR code modules (True = dark) of ``data``, quiet zone included."""
    value = data.reveal() if isinstance(data, Secret) else data
    qr = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M, border=border)
    qr.add_data(value)
    qr.make(fit=True)
    return [[bool(m) for m in row] for row in qr.get_matrix()]


def render_qr(data: Secret | str, *, dark_terminal: bool = True, border: int = 2) -> str:
    """A QR code of ``data`` as text for a terminal (two module rows per line).

    On a dark terminal the light modules are drawn as blocks, so scanners see dark
    modules on a light ground. The result contains the secret: print it, never log it."""
    matrix = qr_matrix(data, border)
    if len(matrix) % 2:
        matrix.append([False] * len(matrix[0]))
    lines = []
    for top, bottom in zip(matrix[::2], matrix[1::2], strict=True):
        lines.append("".join(_GLYPHS[(t != dark_terminal, b != dark_terminal)] for t, b in zip(top, bottom, strict=True)))
    return "\n".join(lines) + "\n"
