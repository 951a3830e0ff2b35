"""Secrets and the shared used-token cache in a real etcd, outside the event log."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pyotp
import pytest

from tests.support.auth import ManualClock
from tests.support.etcd import EtcdCluster, free_port
from ucloud.auth.otp import EtcdUsedTokenCache, LocalVerifier, enrol
from ucloud.auth.secrets import EtcdSecretStore, Secret, SecretStoreError
from ucloud.eventstore.errors import UnavailableError
from ucloud.eventstore.etcd_client import EtcdClient, prefix_end

pytestmark = pytest.mark.etcd

SEED = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
T0 = 1_700_000_000.0


@pytest.fixture
async def client(etcd: EtcdCluster) -> AsyncIterator[EtcdClient]:
    client = EtcdClient(etcd.endpoints)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def prefix() -> str:
    return f"/secrets-{uuid.uuid4().hex[:8]}/"


async def test_put_get_delete_put_new(client: EtcdClient, prefix: str) -> None:
    store = EtcdSecretStore(client, prefix)
    assert await store.get("otp/ucloud/alice") is None
    await store.put("otp/ucloud/alice", Secret(SEED))
    assert await store.get("otp/ucloud/alice") == Secret(SEED)
    assert not await store.put_new("otp/ucloud/alice", Secret("OTHER"))
    assert await store.get("otp/ucloud/alice") == Secret(SEED)
    assert await store.put_new("otp/ucloud/bob", Secret("BOB"))
    assert await store.delete("otp/ucloud/alice")
    assert not await store.delete("otp/ucloud/alice")
    assert await store.get("otp/ucloud/alice") is None
    assert SEED not in repr(store)


async def test_keys_lists_names_under_a_prefix_never_values(client: EtcdClient, prefix: str) -> None:
    store = EtcdSecretStore(client, prefix)
    for key in ("otp/ucloud-admin/root", "otp/ucloud-admin/st%2Ar", "otp/ucloud/alice", "session/hmac-key"):
        await store.put(key, Secret(SEED))
    assert await store.keys("otp/ucloud-admin/") == ["otp/ucloud-admin/root", "otp/ucloud-admin/st%2Ar"]
    assert await store.keys("otp/") == ["otp/ucloud-admin/root", "otp/ucloud-admin/st%2Ar", "otp/ucloud/alice"]
    assert await store.keys("nothing/") == []


async def test_secrets_live_under_their_prefix_and_nowhere_near_the_log(client: EtcdClient, prefix: str) -> None:
    store = EtcdSecretStore(client, prefix)
    await store.put("otp/ucloud/alice", Secret(SEED))
    kv = await client.get(f"{prefix}otp/ucloud/alice".encode())
    assert kv is not None and kv.value == SEED.encode()
    log = await client.range(b"/v1/", prefix_end(b"/v1/"))
    assert all(SEED.encode() not in item.value for item in log.kvs)


@pytest.mark.parametrize("bad", ["/v1/", "/v1/events/secrets/", "/", "/v", "secrets/", "/secrets"])
async def test_a_prefix_inside_or_around_the_log_is_refused(client: EtcdClient, bad: str) -> None:
    with pytest.raises(SecretStoreError, match="prefix"):
        EtcdSecretStore(client, bad)


async def test_two_gateways_sharing_the_etcd_cache_accept_a_token_once(client: EtcdClient, prefix: str) -> None:
    clock = ManualClock(T0)
    secrets = EtcdSecretStore(client, prefix)
    seed = (await enrol(secrets, "alice", "ucloud")).seed.reveal()
    used_prefix = f"{prefix}used/"
    first = LocalVerifier(secrets, EtcdUsedTokenCache(client, used_prefix, clock=clock), clock=clock)
    second = LocalVerifier(secrets, EtcdUsedTokenCache(client, used_prefix, clock=clock), clock=clock)
    token = pyotp.TOTP(seed).at(T0)
    results = await asyncio.gather(*(v.verify("alice", "ucloud", token, "::1") for v in [first, second] * 4))
    assert results.count(True) == 1
    # The record holds no token and expires with a lease.
    record = await client.range(used_prefix.encode(), prefix_end(used_prefix.encode()))
    assert len(record.kvs) == 1
    assert record.kvs[0].value == b"" and token.encode() not in record.kvs[0].key and record.kvs[0].lease != 0


async def test_the_used_token_prefix_must_lie_outside_the_log(client: EtcdClient) -> None:
    with pytest.raises(ValueError, match="outside /v1/"):
        EtcdUsedTokenCache(client, "/v1/used/")


async def test_a_secret_store_that_cannot_be_reached_is_unavailable() -> None:
    client = EtcdClient([f"127.0.0.1:{free_port()}"], timeout=1.0)
    verifier = LocalVerifier(EtcdSecretStore(client, "/secrets/"))
    try:
        with pytest.raises(UnavailableError, match="etcd 127.0.0.1"):
            await verifier.verify("alice", "ucloud", "123456", "::1")
    finally:
        await client.close()
