"""What the CLI knows to prove who it is: OTP identities and cached sessions.

``$XDG_CONFIG_HOME/ucloud/credentials`` (0600, JSON) holds the identities ``ucloud
login`` stored: name, realm and TOTP seed, and which one is the default. With an
identity the CLI proves itself to the gateway as docs/auth.md describes: it sends a
fresh TOTP to ``POST /v1/sessions`` and uses the session token it gets back
(``Authorization: Bearer``) for every request until shortly before it expires.
Sessions are cached per API and identity in ``$XDG_STATE_HOME/ucloud/sessions``
(0600), so ``ucloud vm create`` followed by ``ucloud vm list`` opens one session,
not two.

Each TOTP is accepted once, so the CLI remembers the last time step it used per
identity and never sends the same one twice: when it already used the current
step it takes the next one (the gateway accepts one step of clock skew), and only
if that is used too does it wait for the step after.

Both files go through auth/files.py: refused when others may read them,
replaced atomically, written under a lock.
"""

from __future__ import annotations

import binascii
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pyotp

from ucloud.auth.files import (
    PrivateFileError,
    atomic_write,
    ensure_private_dir,
    locked,
    read_private,
)

STEP = 30
DIGITS = 6
SESSION_MARGIN = 30.0  # a cached session is not used in its last seconds (clocks, slow requests)


class CredentialsError(Exception):
    """A credentials or session file is unusable, or a seed is malformed."""


class Seed:
    """A TOTP seed that does not show itself in reprs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Seed(***)"

    __str__ = __repr__


@dataclass(frozen=True)
class Identity:
    name: str
    realm: str
    seed: Seed

    def totp(self, timestep: int) -> str:
        return pyotp.TOTP(self.seed.reveal(), digits=DIGITS, interval=STEP).generate_otp(timestep)


def config_dir() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "ucloud"


def state_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "ucloud"


def credentials_path() -> Path:
    return Path(os.environ["UCLOUD_CREDENTIALS"]) if os.environ.get("UCLOUD_CREDENTIALS") \
        else config_dir() / "credentials"


def sessions_path() -> Path:
    return state_dir() / "sessions"


def parse_seed(text: str) -> tuple[Seed, str | None, str | None]:
    """A seed from what a user pastes: the base32 seed itself or an ``otpauth://totp/``
    URI. Returns (seed, name, realm); name and realm come from a URI's label
    ``name (realm)`` as the gateway writes it, else None."""
    text = text.strip()
    name = realm = None
    if text.lower().startswith("otpauth://"):
        try:
            totp = pyotp.parse_uri(text)
        except ValueError as error:
            raise CredentialsError(f"not a usable otpauth:// URI: {error}") from None
        if not isinstance(totp, pyotp.TOTP) or totp.digits != DIGITS or totp.interval != STEP \
                or totp.digest().name != "sha1":
            raise CredentialsError(f"the URI must be a TOTP with {DIGITS} digits, {STEP} s steps and SHA1")
        label = unquote(urlsplit(text).path.lstrip("/"))
        label = label.split(":", 1)[1] if ":" in label else label
        if label.endswith(")") and " (" in label:
            name, realm = label[:-1].split(" (", 1)
        seed = totp.secret
    else:
        seed = "".join(text.split()).upper()
    if len(seed) < 16:
        raise CredentialsError("the seed is too short to be a ucloud seed (at least 16 base32 characters)")
    try:
        pyotp.TOTP(seed).generate_otp(0)
    except (binascii.Error, ValueError):
        raise CredentialsError("the seed is not valid base32 (letters A-Z and digits 2-7)") from None
    return Seed(seed), name, realm


def _load(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = read_private(path)
    except PrivateFileError as error:
        raise CredentialsError(str(error)) from None
    if raw is None:
        return {}
    try:
        document = json.loads(raw)
    except ValueError:
        raise CredentialsError(f"{path} is not a ucloud {what} file (not JSON); remove it and log in again") from None
    if not isinstance(document, dict) or document.get("version") != 1:
        raise CredentialsError(f"{path} is not a ucloud {what} file (version 1); remove it and log in again")
    return document


def _save(path: Path, document: dict[str, Any]) -> None:
    ensure_private_dir(path.parent)
    atomic_write(path, json.dumps(document, indent=1, sort_keys=True).encode())


class Credentials:
    """The identities file."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or credentials_path()

    def _identities(self, document: dict[str, Any]) -> list[dict[str, str]]:
        identities = document.get("identities", [])
        if not isinstance(identities, list) or not all(
                isinstance(i, dict) and all(isinstance(i.get(k), str) for k in ("name", "realm", "seed"))
                for i in identities):
            raise CredentialsError(f"{self.path}: malformed identities; remove the file and log in again")
        return identities

    def identities(self) -> list[Identity]:
        return [Identity(i["name"], i["realm"], Seed(i["seed"])) for i in self._identities(_load(self.path, "credentials"))]

    def default(self) -> tuple[str, str] | None:
        document = _load(self.path, "credentials")
        chosen = document.get("default")
        if isinstance(chosen, dict) and isinstance(chosen.get("name"), str) and isinstance(chosen.get("realm"), str):
            return chosen["name"], chosen["realm"]
        return None

    def find(self, name: str, realm: str) -> Identity | None:
        key = (name.casefold(), realm)
        return next((i for i in self.identities() if (i.name.casefold(), i.realm) == key), None)

    def realms_of(self, name: str) -> list[str]:
        return [i.realm for i in self.identities() if i.name.casefold() == name.casefold()]

    def store(self, identity: Identity, make_default: bool = True) -> None:
        ensure_private_dir(self.path.parent)
        with locked(self.path):
            document = _load(self.path, "credentials") or {"version": 1}
            key = (identity.name.casefold(), identity.realm)
            kept = [i for i in self._identities(document) if (i["name"].casefold(), i["realm"]) != key]
            kept.append({"name": identity.name, "realm": identity.realm, "seed": identity.seed.reveal()})
            document["identities"] = kept
            if make_default or not isinstance(document.get("default"), dict):
                document["default"] = {"name": identity.name, "realm": identity.realm}
            _save(self.path, document)

    def forget(self, name: str, realm: str) -> bool:
        if not self.path.exists():
            return False
        with locked(self.path):
            document = _load(self.path, "credentials")
            key = (name.casefold(), realm)
            identities = self._identities(document)
            kept = [i for i in identities if (i["name"].casefold(), i["realm"]) != key]
            if len(kept) == len(identities):
                return False
            document["identities"] = kept
            chosen = document.get("default")
            if isinstance(chosen, dict) and (str(chosen.get("name")).casefold(), chosen.get("realm")) == key:
                document["default"] = {"name": kept[-1]["name"], "realm": kept[-1]["realm"]} if kept else None
            _save(self.path, document)
            return True


class Sessions:
    """Cached session tokens per (API, name, realm), and the last TOTP step used per identity."""

    def __init__(self, path: Path | None = None, clock: Any = time.time) -> None:
        self.path = path or sessions_path()
        self.clock = clock

    @staticmethod
    def _key(api: str, name: str, realm: str) -> str:
        return f"{api} {name.casefold()} {realm}"

    def _document(self) -> dict[str, Any]:
        try:
            document = _load(self.path, "sessions")
        except CredentialsError:
            return {}  # a cache: an unusable one is rebuilt, never a failure
        return document

    def _update(self, change: Any) -> None:
        ensure_private_dir(self.path.parent)
        with locked(self.path):
            document = self._document() or {"version": 1}
            document.setdefault("sessions", {})
            document.setdefault("steps", {})
            now = self.clock()
            document["sessions"] = {k: v for k, v in document["sessions"].items()
                                    if isinstance(v, dict) and isinstance(v.get("expires_at"), int | float)
                                    and v["expires_at"] > now}
            change(document)
            _save(self.path, document)

    def get(self, api: str, name: str, realm: str) -> str | None:
        entry = self._document().get("sessions", {}).get(self._key(api, name, realm))
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
            return None
        expires = entry.get("expires_at")
        if not isinstance(expires, int | float) or expires - SESSION_MARGIN <= self.clock():
            return None
        return str(entry["token"])

    def put(self, api: str, name: str, realm: str, token: str, expires_at: float) -> None:
        self._update(lambda d: d["sessions"].__setitem__(self._key(api, name, realm),
                                                        {"token": token, "expires_at": expires_at}))

    def drop(self, api: str, name: str, realm: str) -> None:
        self._update(lambda d: d["sessions"].pop(self._key(api, name, realm), None))

    def drop_identity(self, name: str, realm: str) -> None:
        def change(document: dict[str, Any]) -> None:
            suffix = f" {name.casefold()} {realm}"
            document["sessions"] = {k: v for k, v in document["sessions"].items() if not k.endswith(suffix)}
            document["steps"].pop(f"{name.casefold()} {realm}", None)

        if self.path.exists():
            self._update(change)

    def next_step(self, name: str, realm: str) -> tuple[int, float]:
        """The TOTP time step to use now, never one used before, and how many seconds to
        wait before sending it (0 unless the current and the next step are both used)."""
        chosen: list[tuple[int, float]] = []
        key = f"{name.casefold()} {realm}"

        def change(document: dict[str, Any]) -> None:
            now = self.clock()
            current = int(now // STEP)
            last = document["steps"].get(key)
            step = current if not isinstance(last, int) or last < current else last + 1
            wait = 0.0 if step <= current + 1 else (step - 1) * STEP - now + 0.5
            document["steps"][key] = step
            chosen.append((step, wait))

        self._update(change)
        return chosen[0]
