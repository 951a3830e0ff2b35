"""Test helpers for authentication: a hand-driven clock and an ungleich-otp service.

The service is a test double of an EXTERNAL system (ungleich-otp), implementing its
verify protocol on a real aiohttp server on loopback, with real TOTP checks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pyotp
from aiohttp import web

from tests.support.slapd import free_port


class ManualClock:
    """A clock the test moves by hand: ``clock()`` returns ``clock.now``."""

    def __init__(self, now: float) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


FIELDS = ("auth_name", "auth_realm", "auth_token", "name", "realm", "token")


@dataclass
class OtpService:
    """ungleich-otp's verify endpoint: the caller proves itself with its own TOTP
    (and must be in ``auth_realm``), then the (name, realm, token) under test is
    checked. 200 valid, 403 not, 400 malformed."""

    clock: ManualClock
    auth_realm: str = "ungleich-auth"
    seeds: dict[tuple[str, str], str] = field(default_factory=dict)
    delay: float = 0.0
    status_override: int | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    def add(self, name: str, realm: str) -> str:
        seed = pyotp.random_base32()
        self.seeds[(name, realm)] = seed
        return seed

    def _valid(self, name: Any, realm: Any, token: Any) -> bool:
        seed = self.seeds.get((name, realm))
        return seed is not None and isinstance(token, str) and pyotp.TOTP(seed).verify(
            token, for_time=self.clock(), valid_window=1)

    async def _verify(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status_override is not None:
            return web.Response(status=self.status_override)
        if not isinstance(body, dict) or any(f not in body for f in FIELDS):
            return web.json_response({"detail": "missing fields"}, status=400)
        if body["auth_realm"] != self.auth_realm or not self._valid(
                body["auth_name"], body["auth_realm"], body["auth_token"]):
            return web.json_response({"detail": "You do not have permission"}, status=403)
        if not self._valid(body["name"], body["realm"], body["token"]):
            return web.json_response({"detail": "invalid token"}, status=403)
        return web.json_response({"status": "OK"})

    async def start(self) -> OtpService:
        app = web.Application()
        app.router.add_post("/ungleichotp/verify/", self._verify)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/ungleichotp/verify/"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
