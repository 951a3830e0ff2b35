"""The CLI's HTTP client and its settings: who to be, which API, how to prove it.

Everything that talks to the API lives here, apart from the commands (cli/main.py,
cli/account.py) that use it. It imports nothing of the server: it speaks HTTP to the
gateway and proves its identity with cli/credentials.py (TOTP sessions, docs/auth.md).

The HTTP client is aiohttp's, under asyncio.run: aiohttp is already what the gateway
runs on, so the CLI adds no dependency (no sync HTTP library is installed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tomllib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import aiohttp
import click
import msgspec

from ucloud.cli.credentials import Credentials, CredentialsError, Identity, Sessions

T = TypeVar("T")

DEFAULT_API = "http://[::1]:8080"
DEFAULT_REALM = "ucloud"
EXIT_ERROR = 1
REQUEST_TIMEOUT = 60.0  # the gateway itself waits at most ~10 s for a position

class Failure(click.ClickException):
    """One line on stderr and a non-zero exit; never a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(" ".join(str(message).split()))  # one line, whatever the server said
        self.exit_code = exit_code  # type: ignore[misc]  # click declares it per class; ours varies

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class ApiError(Failure):
    """The API answered with a problem (RFC 9457)."""

    def __init__(self, status: int, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.field = field


# -- settings --------------------------------------------------------------------------------------


class FileSettings(msgspec.Struct, forbid_unknown_fields=True):
    api: str | None = None
    user: str | None = None
    realm: str | None = None


@dataclass(frozen=True)
class Settings:
    api: str
    user: str
    realm: str
    identity: Identity | None = None  # from the credentials file: the CLI proves itself with its TOTP


def config_home() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")


def state_home() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")


def default_config_path() -> Path:
    return config_home() / "ucloud" / "config.toml"


def read_config(path: Path, explicit: bool) -> FileSettings:
    if not path.exists():
        if explicit:
            raise Failure(f"config file {path} does not exist")
        return FileSettings()
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise Failure(f"cannot read config file {path}: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise Failure(f"config file {path} is not valid TOML: {error}") from None
    try:
        return msgspec.convert(raw, FileSettings)
    except msgspec.ValidationError as error:
        raise Failure(f"config file {path}: {error} (known settings: api, user, realm)") from None


def resolve_settings(api: str | None, user: str | None, realm: str | None, config: str | None) -> Settings:
    """Flags over environment over the config file over defaults."""
    path = Path(config) if config else Path(os.environ["UCLOUD_CONFIG"]) if os.environ.get("UCLOUD_CONFIG") \
        else default_config_path()
    file = read_config(path, explicit=bool(config or os.environ.get("UCLOUD_CONFIG")))

    def pick(flag: str | None, env: str, from_file: str | None, default: str | None) -> str | None:
        for value in (flag, os.environ.get(env), from_file):
            if value:
                return value
        return default

    chosen_api = pick(api, "UCLOUD_API", file.api, DEFAULT_API)
    chosen_user = pick(user, "UCLOUD_USER", file.user, None)
    chosen_realm = pick(realm, "UCLOUD_REALM", file.realm, None)
    assert chosen_api is not None
    credentials = Credentials()
    try:
        if not chosen_user and (default := credentials.default()) is not None:
            chosen_user, default_realm = default
            chosen_realm = chosen_realm or default_realm
        if not chosen_user:
            raise Failure(f"no user set: log in with 'ucloud login NAME --realm REALM', put user = \"name\" "
                          f"in {path}, set UCLOUD_USER or pass --user")
        if not chosen_realm:  # the realm of the user's one stored identity, else the user realm
            realms = credentials.realms_of(chosen_user)
            chosen_realm = realms[0] if len(realms) == 1 else DEFAULT_REALM
        identity = credentials.find(chosen_user, chosen_realm)
    except CredentialsError as error:
        raise Failure(str(error)) from None
    if not chosen_api.startswith(("http://", "https://")):
        raise Failure(f"API URL {chosen_api!r} must start with http:// or https://")
    return Settings(chosen_api.rstrip("/"), chosen_user, chosen_realm, identity)


# -- the HTTP client -------------------------------------------------------------------------------


class Positions:
    """The last log position each API returned to this user's commands."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, int)} if isinstance(data, dict) else {}

    def get(self, api: str) -> int:
        return self._read().get(api, 0)

    def set(self, api: str, position: int) -> None:
        data = self._read()
        data[api] = position
        with contextlib.suppress(OSError):  # remembering is a convenience, never a failure
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            temporary.write_text(json.dumps(data))
            temporary.replace(self.path)


class Client:
    def __init__(self, settings: Settings, session: aiohttp.ClientSession, positions: Positions,
                 sessions: Sessions | None = None) -> None:
        self.settings = settings
        self.session = session
        self.positions = positions
        self.position = positions.get(settings.api)
        self.sessions = sessions or Sessions()
        self.per_request_totp = False  # the gateway issues no sessions: a fresh TOTP with every request
        self.opened_session = False  # this process opened the session it uses (else: from the cache)

    def _who(self) -> dict[str, str]:
        return {"X-Ucloud-User": self.settings.user, "X-Ucloud-Realm": self.settings.realm}

    async def _totp_headers(self) -> dict[str, str]:
        identity = self.settings.identity
        assert identity is not None
        step, wait = self.sessions.next_step(identity.name, identity.realm)
        if wait > 0:  # both usable steps were used already: the next one is a moment away
            await asyncio.sleep(wait)
        return {**self._who(), "X-Ucloud-Token": identity.totp(step)}

    async def open_session(self) -> str:
        """Prove the identity with a fresh TOTP and cache the session the gateway returns."""
        settings = self.settings
        status, data = await self._send("POST", "/v1/sessions", None, {}, await self._totp_headers())
        if status == 401:
            # Another client with the same seed (the admin's second machine) may have used
            # this step's token already: the next step's is valid too, once. A wrong seed
            # costs two failed attempts instead of one.
            status, data = await self._send("POST", "/v1/sessions", None, {}, await self._totp_headers())
        if status == 501:
            self.per_request_totp = True
            return ""
        if status != 201:
            self._fail(status, data, "")
        expires = datetime.fromisoformat(data["expires_at"]).timestamp()
        self.sessions.put(settings.api, settings.user, settings.realm, data["token"], expires)
        self.opened_session = True
        return str(data["token"])

    async def _auth_headers(self) -> dict[str, str]:
        settings = self.settings
        if settings.identity is None:
            return self._who()  # only a development gateway (header authentication) accepts this
        if self.per_request_totp:
            return await self._totp_headers()
        token = self.sessions.get(settings.api, settings.user, settings.realm) or await self.open_session()
        return {"Authorization": f"Bearer {token}"} if token else await self._totp_headers()

    async def _send(self, method: str, path: str, body: Any, query: dict[str, str],
                    headers: dict[str, str], payload: Any = None) -> tuple[int, Any]:
        url = self.settings.api + path
        # An upload (payload) may take longer than any other request: no total limit, but a
        # gateway that stops answering for REQUEST_TIMEOUT still ends it.
        timeout = (aiohttp.ClientTimeout(total=None, sock_read=REQUEST_TIMEOUT) if payload is not None
                   else self.session.timeout)
        try:
            async with self.session.request(method, url, json=body, params=query, headers=headers, data=payload,
                                            timeout=timeout) as response:
                status = response.status
                text = await response.text()
                content_type = response.content_type
        except aiohttp.ClientConnectionError as error:
            raise Failure(f"cannot reach the ucloud API at {self.settings.api}: {error}") from None
        except TimeoutError:
            raise Failure(f"the ucloud API at {self.settings.api} did not answer in {REQUEST_TIMEOUT:g}s") from None
        data: Any = None
        if text and content_type.endswith("json"):
            try:
                data = json.loads(text)
            except ValueError:
                raise Failure(f"the API at {url} answered {status} with malformed JSON") from None
        if data is None and content_type.endswith("json") and status < 400:
            raise Failure(f"the API at {url} answered {status} without a body")
        if status >= 400 and not isinstance(data, dict):
            data = {"detail": f"the API answered {status} {text[:200]}"}
        elif data is None and not content_type.endswith("json"):
            data = text  # an HTML or text rendering (an invoice page)
        return status, data

    def _fail(self, status: int, data: Any, hint: str) -> NoReturn:
        detail = data.get("detail") if isinstance(data, dict) else None
        field = data.get("field") if isinstance(data, dict) else None
        if status == 401 and not hint:
            who = f"{self.settings.user}@{self.settings.realm}"
            hint = (f" (as {who}: check the seed with 'ucloud login', and this machine's clock)"
                    if self.settings.identity is not None else
                    f" (no credentials for {who}: run 'ucloud login {self.settings.user} "
                    f"--realm {self.settings.realm}')")
        raise ApiError(status, (detail or f"the API answered {status}") + hint, field)

    async def request(self, method: str, path: str, body: Any = None, *, query: dict[str, str] | None = None,
                      headers: dict[str, str] | None = None, read: bool = False,
                      upload: Callable[[], Any] | None = None) -> tuple[int, Any]:
        """``upload``: makes the raw body to send (called again if the request is repeated)."""
        query = dict(query or {})
        if read and self.position:
            query["position"] = str(self.position)
        auth = await self._auth_headers()
        status, data = await self._send(method, path, body, query, {**auth, **(headers or {})},
                                        upload() if upload else None)
        if status == 401 and "Authorization" in auth and not self.opened_session:
            # The session ended early (user re-enabled, key rotated, gateway moved): one new one.
            self.sessions.drop(self.settings.api, self.settings.user, self.settings.realm)
            auth = await self._auth_headers()
            status, data = await self._send(method, path, body, query, {**auth, **(headers or {})},
                                            upload() if upload else None)
        if status >= 400:
            field = data.get("field") if isinstance(data, dict) else None
            if status in (400, 422) and field == "position" and "position" in query and read:
                # The remembered position belongs to another log (a rebuilt test cluster, say).
                self.position = 0
                self.positions.set(self.settings.api, 0)
                query.pop("position")
                return await self.request(method, path, body, query=query, headers=headers, read=True)
            self._fail(status, data, "")
        if isinstance(data, dict) and not read and isinstance(data.get("position"), int):
            self.position = max(self.position, data["position"])
            self.positions.set(self.settings.api, self.position)
        return status, data

    async def get(self, path: str, query: dict[str, str] | None = None) -> Any:
        return (await self.request("GET", path, query=query, read=True))[1]

    async def resolve_vm(self, reference: str) -> str:
        """A VM id from an id or a name (one's own, not deleted)."""
        with contextlib.suppress(ValueError):
            return str(uuid.UUID(reference))
        vms = (await self.get("/v1/vms"))["vms"]
        matches = [vm for vm in vms if vm["name"] == reference]
        if not matches:
            raise Failure(f"no VM named {reference!r}")
        if len(matches) > 1:
            ids = ", ".join(vm["id"] for vm in matches)
            raise Failure(f"{len(matches)} VMs are named {reference!r} ({ids}); give the id")
        return str(matches[0]["id"])


@dataclass
class Context:
    api: str | None
    user: str | None
    realm: str | None
    config: str | None

    def run(self, work: Callable[[Client], Awaitable[T]], settings: Settings | None = None) -> T:
        settings = settings or resolve_settings(self.api, self.user, self.realm, self.config)
        positions = Positions(state_home() / "ucloud" / "positions.json")

        async def go() -> T:
            timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                return await work(Client(settings, session, positions))

        return asyncio.run(go())
