"""Card payments through a real HTTP cycle: the test card provider runs as its own process;
ucloud creates an intent there, the card holder confirms it, the provider calls ucloud's
webhook with an HMAC signature, and the account is credited once. Forged, stale or
repeated webhooks credit nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cardprovider import sign
from tests.support.etcd import free_port
from tests.support.gateway import ServedGateway, served_gateway
from ucloud.gateway.billing_payments import CardMethod
from ucloud.gateway.billing_routes import PAYMENT_METHODS

SECRET = b"whsec-test-0123456789abcdef"


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    secret = tmp_path_factory.mktemp("card") / "secret"
    secret.write_bytes(SECRET)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tests.support.cardprovider", "--port", str(port),
                                "--secret-file", str(secret)], cwd=Path(__file__).resolve().parents[2])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{url}/v1/intents/none", timeout=1)
            except urllib.error.HTTPError:
                break  # 404: it answers
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "the card provider did not start"
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def served(provider: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedGateway]:
    secret = tmp_path_factory.mktemp("gw") / "secret"
    secret.write_bytes(SECRET + b"\n")
    patch = pytest.MonkeyPatch()
    patch.setenv("UCLOUD_CARD_PROVIDER_URL", provider)
    patch.setenv("UCLOUD_CARD_SECRET_FILE", str(secret))
    patch.setenv("UCLOUD_CARD_WEBHOOK_URL", "http://unset.invalid/")
    try:
        with served_gateway() as gateway:
            card = gateway.gateway.app[PAYMENT_METHODS]["card"]
            assert isinstance(card, CardMethod)
            card.webhook_url = f"{gateway.url}/v1/payments/card/webhook"  # known once it listens
            yield gateway
    finally:
        patch.undo()


def call(url: str, method: str = "GET", body: Any = None, user: str | None = None,
         headers: dict[str, str] | None = None, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **({"X-Ucloud-User": user} if user else {}),
        **({"X-Ucloud-Realm": "ucloud-admin"} if user == "root" else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def test_a_card_payment_goes_intent_confirmation_webhook_and_credits_once(served: ServedGateway) -> None:
    api = served.url
    status, _ = call(f"{api}/v1/prices", "POST", {"resource": "core", "amount": "1 CHF/hour"}, user="root")
    assert status == 201
    status, started = call(f"{api}/v1/payments", "POST", {"method": "card", "amount": "20 CHF"}, user="dora")
    assert status == 202 and started["status"] == "pending" and started["intent"].startswith("pi_"), started

    status, confirmed = call(started["confirm_url"], "POST")  # the card holder confirms at the provider
    assert status == 200 and confirmed["status"] == "succeeded"
    assert confirmed["webhook"]["status"] == 200, confirmed["webhook"]
    credited = json.loads(confirmed["webhook"]["body"])
    assert credited["status"] == "credited" and credited["credited_micros"] == 20_000_000
    _, balance = call(f"{api}/v1/balance?position={credited['position']}", user="dora")
    assert balance["credited_micros"] == 20_000_000

    # The provider delivers the same webhook again: nothing more is credited.
    _, again = call(started["confirm_url"], "POST")
    assert again["webhook"]["status"] == 200 and json.loads(again["webhook"]["body"])["status"] == "already credited"

    # A webhook signed without the secret is refused and credits nothing.
    _, second = call(f"{api}/v1/payments", "POST", {"method": "card", "amount": "5 CHF"}, user="dora")
    _, forged = call(second["confirm_url"] + "?tamper=1", "POST")
    assert forged["webhook"]["status"] == 400 and "signature does not match" in forged["webhook"]["body"]

    event = json.dumps({"type": "payment_intent.succeeded", "intent": {
        "id": "pi_made_up", "status": "succeeded", "amount_micros": 10**9, "currency": "CHF",
        "metadata": {"owner": "dora"}}}).encode()
    hook = f"{api}/v1/payments/card/webhook"
    for headers, why in (({}, "missing"), ({"Provider-Signature": "t=1,v1=00"}, "does not match"),
                         ({"Provider-Signature": sign(SECRET, event, int(time.time()) - 3600)}, "too old")):
        status, problem = call(hook, "POST", raw=event, headers=headers)
        assert status == 400 and problem["field"] == "Provider-Signature" and why in problem["detail"], problem
    _, balance = call(f"{api}/v1/balance", user="dora")
    assert balance["credited_micros"] == 20_000_000

    # Bad input to /v1/payments names the field: 400 outside the declared schema, 422 for
    # what a method needs beyond it (its own fields, this installation's currency, more than 0).
    for body, expected, field in (({"method": "cash"}, 400, "method"), ({"method": "card"}, 422, "amount"),
                                  ({"method": "card", "amount": "5 EUR"}, 422, "amount"),
                                  ({"method": "card", "amount": "0 CHF"}, 422, "amount"),
                                  ({"method": "card", "amount": "-5 CHF"}, 400, "amount"),
                                  ({"method": "coupon"}, 422, "code"), ({"method": "bank-transfer"}, 422, "invoice")):
        status, problem = call(f"{api}/v1/payments", "POST", body, user="dora")
        assert status == expected and problem["field"] == field, (body, problem)
    status, problem = call(f"{api}/v1/payments", "POST", {"method": "bank-transfer", "invoice": 4242}, user="dora")
    assert status == 404, problem  # nobody's invoice, or another user's: it does not exist for you
