"""A test card-payment provider: its own process, a real HTTP cycle, signed webhooks.

    python -m tests.support.cardprovider --port PORT --secret-file FILE

POST /v1/intents {"amount_micros", "currency", "webhook_url", "metadata"} creates a payment
intent (201 {"id", "status": "requires_confirmation", "confirm_url"}); POST
/v1/intents/{id}/confirm (what the card holder's browser would do) marks it succeeded and
delivers the webhook: POST webhook_url with the intent as JSON and the header
``Provider-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>" under the shared
secret>`` (the scheme real providers use). The confirm answer carries the webhook's status,
so a test sees whether ucloud accepted it. GET /v1/intents/{id} shows an intent.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

INTENTS = web.AppKey("intents", dict)
SECRET = web.AppKey("secret", bytes)


def sign(secret: bytes, body: bytes, at: int | None = None) -> str:
    at = int(time.time()) if at is None else at
    digest = hmac.new(secret, f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={digest}"


async def create(request: web.Request) -> web.Response:
    body: dict[str, Any] = await request.json()
    if not isinstance(body.get("amount_micros"), int) or body["amount_micros"] <= 0:
        return web.json_response({"error": "amount_micros must be a positive integer"}, status=400)
    intent = {"id": f"pi_{uuid.uuid4().hex}", "status": "requires_confirmation", "amount_micros": body["amount_micros"],
              "currency": body.get("currency", ""), "metadata": body.get("metadata", {}),
              "webhook_url": body.get("webhook_url", "")}
    request.app[INTENTS][intent["id"]] = intent
    confirm = f"{request.scheme}://{request.host}/v1/intents/{intent['id']}/confirm"
    return web.json_response({**intent, "confirm_url": confirm}, status=201)


async def confirm(request: web.Request) -> web.Response:
    intent = request.app[INTENTS].get(request.match_info["id"])
    if intent is None:
        return web.json_response({"error": "no such intent"}, status=404)
    intent["status"] = "succeeded"
    event = json.dumps({"type": "payment_intent.succeeded", "intent": {
        k: intent[k] for k in ("id", "status", "amount_micros", "currency", "metadata")}}).encode()
    secret = request.app[SECRET]
    if request.query.get("tamper") == "1":  # for tests: a webhook someone without the secret forged
        secret = b"not-the-secret"
    async with aiohttp.ClientSession() as session, session.post(
            intent["webhook_url"], data=event,
            headers={"Content-Type": "application/json", "Provider-Signature": sign(secret, event)}) as answer:
        delivered = {"status": answer.status, "body": await answer.text()}
    return web.json_response({**intent, "webhook": delivered})


async def show(request: web.Request) -> web.Response:
    intent = request.app[INTENTS].get(request.match_info["id"])
    return web.json_response(intent or {"error": "no such intent"}, status=200 if intent else 404)


def make_app(secret: bytes) -> web.Application:
    app = web.Application()
    app[INTENTS] = {}
    app[SECRET] = secret
    app.router.add_post("/v1/intents", create)
    app.router.add_post("/v1/intents/{id}/confirm", confirm)
    app.router.add_get("/v1/intents/{id}", show)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret-file", type=Path, required=True)
    args = parser.parse_args()
    web.run_app(make_app(args.secret_file.read_bytes().strip()), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
