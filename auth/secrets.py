"""Where secrets live: OTP seeds and the like, never in the event log.

``SecretStore`` is the port; ``FileSecretStore`` keeps all secrets in one 0600 JSON
file (the embedded default for one machine), ``EtcdSecretStore`` keeps them in etcd
under a prefix outside the log (``/secrets/`` by default, never below ``/v1``).

Secret values travel as ``Secret`` objects whose ``repr``/``str`` are redacted, so
a seed cannot end up in a log line, a traceback or an exception message by accident;
code that really needs the value calls ``reveal()``. No error raised here contains a
value.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ucloud.eventstore.etcd_client import EtcdClient, cmp_create, op_put, prefix_end

from .files import (
    PrivateFileError,
    atomic_write,
    ensure_private_dir,
    file_identity,
    locked,
    read_private,
)

__all__ = [
    "EtcdSecretStore",
    "FileSecretStore",
    "InvalidSecretKey",
    "PrivateFileError",
    "Secret",
    "SecretStore",
    "SecretStoreError",
    "otp_key",
]


class Secret:
    """A secret string that does not show itself: ``repr``/``str``/``format`` say
    ``Secret(***)``. Equality is constant-time; it is not hashable (no dict keys)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"a Secret holds a str, not {type(value).__name__}")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return format(repr(self), spec)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> Any:
        raise TypeError("a Secret cannot be pickled")


class SecretStoreError(Exception):
    """The store cannot be used: bad configuration, unreadable data, backend errors."""


class InvalidSecretKey(SecretStoreError, ValueError):
    """A secret's name does not follow the key rules."""


# Keys are slash-separated segments of URL-safe characters (otp_key() percent-encodes
# free-form names into this alphabet). No empty, "." or ".." segments.
_SEGMENT = re.compile(r"[A-Za-z0-9@._+%-]+")
MAX_KEY_LENGTH = 512


def check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise InvalidSecretKey("a secret key must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidSecretKey(f"a secret key is at most {MAX_KEY_LENGTH} characters, got {len(key)}")
    for segment in key.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT.fullmatch(segment):
            raise InvalidSecretKey(
                f"invalid secret key {key!r}: use '/'-separated segments of letters, digits and @._+%-"
            )
    return key


def otp_key(realm: str, name: str) -> str:
    """The key of the OTP seed of ``name`` in ``realm``: ``otp/<realm>/<name>``, each
    part percent-encoded so any user name maps to exactly one key."""
    if not realm or not name:
        raise InvalidSecretKey("an OTP key needs a realm and a name")
    return check_key(f"otp/{quote(realm, safe='@._+-')}/{quote(name, safe='@._+-')}")


def _as_secret(value: Secret) -> Secret:
    if not isinstance(value, Secret):
        # Accepting plain str here would invite call sites that pass values around raw.
        raise TypeError(f"secret values are Secret objects, not {type(value).__name__}")
    return value


class SecretStore(ABC):
    """Named secrets. Implementations are safe for concurrent use."""

    @abstractmethod
    async def get(self, key: str) -> Secret | None:
        """The secret stored under ``key``, or None."""

    @abstractmethod
    async def put(self, key: str, value: Secret) -> None:
        """Store ``value`` under ``key``, replacing any previous value."""

    @abstractmethod
    async def put_new(self, key: str, value: Secret) -> bool:
        """Store ``value`` only if ``key`` holds nothing yet; False if it does. Atomic."""

    @abstractmethod
    async def delete(self, key: str) -> bool:
        """Remove ``key``; False if there was nothing to remove."""

    @abstractmethod
    async def keys(self, prefix: str) -> list[str]:
        """The keys (never values) that start with ``prefix``, sorted: who is enrolled."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


class FileSecretStore(SecretStore):
    """All secrets in one JSON file with mode 0600.

    A file with a wider mode, another owner or a symlink in its place is refused
    with a clear ``PrivateFileError`` when the store opens and on every read. Writes
    are read-modify-write under an ``flock`` and land atomically (temp file + rename),
    so the gateway and the admin CLI can both write. Readers reload when the file
    changes on disk.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        ensure_private_dir(self.path.parent)
        self._mutex = threading.Lock()
        self._identity: tuple[int, int, int, int] | None = None
        self._cache: dict[str, str] = {}
        with self._mutex:
            self._load()  # fail now, not at the first request, on a bad file

    def __repr__(self) -> str:
        return f"FileSecretStore({str(self.path)!r})"

    def _parse(self, raw: bytes) -> dict[str, str]:
        try:
            document = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            # The decoder's message names a position, never the content.
            raise SecretStoreError(f"{self.path} is not valid JSON ({error.__class__.__name__} at "
                                   f"position {getattr(error, 'pos', '?')})") from None
        if not isinstance(document, dict):
            document = {}
        secrets = document.get("secrets")
        if document.get("version") != 1 or not isinstance(secrets, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in secrets.items()
        ):
            raise SecretStoreError(
                f"{self.path} is not a ucloud secret file (expected {{\"version\": 1, \"secrets\": {{...}}}})"
            )
        return secrets

    def _load(self) -> dict[str, str]:
        identity = file_identity(self.path)
        if identity is not None and identity == self._identity:
            return self._cache
        raw = read_private(self.path)
        self._cache = {} if raw is None else self._parse(raw)
        self._identity = identity
        return self._cache

    def _write(self, secrets: dict[str, str]) -> None:
        atomic_write(self.path, json.dumps({"version": 1, "secrets": secrets}, indent=1, sort_keys=True).encode())

    def _get(self, key: str) -> Secret | None:
        with self._mutex:
            value = self._load().get(key)
        return None if value is None else Secret(value)

    def _update(self, key: str, value: Secret | None, *, only_new: bool) -> bool:
        with self._mutex, locked(self.path):
            self._identity = None  # re-read under the lock: another process may have written
            secrets = dict(self._load())
            if value is None:
                if key not in secrets:
                    return False
                del secrets[key]
            else:
                if only_new and key in secrets:
                    return False
                secrets[key] = value.reveal()
            self._write(secrets)
            self._identity = None
            return True

    async def get(self, key: str) -> Secret | None:
        return await asyncio.to_thread(self._get, check_key(key))

    async def put(self, key: str, value: Secret) -> None:
        await asyncio.to_thread(self._update, check_key(key), _as_secret(value), only_new=False)

    async def put_new(self, key: str, value: Secret) -> bool:
        return await asyncio.to_thread(self._update, check_key(key), _as_secret(value), only_new=True)

    async def delete(self, key: str) -> bool:
        return await asyncio.to_thread(self._update, check_key(key), None, only_new=False)

    def _keys(self, prefix: str) -> list[str]:
        with self._mutex:
            return sorted(k for k in self._load() if k.startswith(prefix))

    async def keys(self, prefix: str) -> list[str]:
        return await asyncio.to_thread(self._keys, prefix)


class EtcdSecretStore(SecretStore):
    """Secrets in etcd under ``prefix`` (default ``/secrets/``), outside the event log.

    Production requirement, not enforced here: etcd must run with authentication and
    TLS, and the gateway's etcd user must be the only one with a role granting read on
    this prefix (``etcdctl role grant-permission gateway readwrite --prefix /secrets/``).
    ``EtcdClient`` has no credentials support yet (it opens insecure channels without
    an auth token); see docs/auth.md.
    """

    def __init__(self, client: EtcdClient, prefix: str = "/secrets/", *, log_prefix: str = "/v1",
                 close_client: bool = False) -> None:
        if not prefix.startswith("/") or not prefix.endswith("/") or prefix == "/":
            raise SecretStoreError(f"etcd secret prefix {prefix!r} must start and end with '/' and not be '/'")
        log = log_prefix.rstrip("/") + "/"
        if prefix.startswith(log) or log.startswith(prefix):
            raise SecretStoreError(
                f"etcd secret prefix {prefix!r} overlaps the event log under {log!r}: "
                f"secrets must never be readable through the log"
            )
        self.client = client
        self.prefix = prefix
        self._close_client = close_client

    def __repr__(self) -> str:
        return f"EtcdSecretStore({self.client.endpoints!r}, prefix={self.prefix!r})"

    def _key(self, key: str) -> bytes:
        return (self.prefix + check_key(key)).encode()

    async def get(self, key: str) -> Secret | None:
        kv = await self.client.get(self._key(key))
        return None if kv is None else Secret(kv.value.decode())

    async def put(self, key: str, value: Secret) -> None:
        await self.client.put(self._key(key), _as_secret(value).reveal().encode())

    async def put_new(self, key: str, value: Secret) -> bool:
        k = self._key(key)
        result = await self.client.txn([cmp_create(k, "==", 0)], [op_put(k, _as_secret(value).reveal().encode())])
        return result.succeeded

    async def delete(self, key: str) -> bool:
        return await self.client.delete(self._key(key)) > 0

    async def keys(self, prefix: str) -> list[str]:
        start = (self.prefix + prefix).encode()
        result = await self.client.range(start, prefix_end(start), keys_only=True)
        return sorted(kv.key.decode()[len(self.prefix):] for kv in result.kvs)

    async def close(self) -> None:
        if self._close_client:
            await self.client.close()
