"""The event store on an etcd with TLS, client certificates and authentication, set up
as docs/operations.md says: the right credential works end to end (append, read,
subscribe, leases), every wrong one is refused with a clear error, and a role's limits
hold (a reader cannot append, nobody but the control role reads the secret prefix)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.support.etcd_secure import SECRET_PREFIX, SecureEtcd, secure_etcd
from ucloud.eventstore.errors import AccessDenied, DataError, UnavailableError
from ucloud.eventstore.etcd import EtcdEventStore
from ucloud.eventstore.etcd_client import EtcdClient, EtcdSecurity
from ucloud.eventstore.records import NewEvent, StreamAppend
from ucloud.eventstore.url import open_store

pytestmark = [pytest.mark.etcd, pytest.mark.slow]


@pytest.fixture(scope="module")
def etcd() -> Iterator[SecureEtcd]:
    with secure_etcd(token_ttl=2) as server:
        yield server


def tls(etcd: SecureEtcd, **more: str) -> EtcdSecurity:
    """TLS with the certificate that names nobody: rights come from the password."""
    return EtcdSecurity(ca_file=str(etcd.ca), cert_file=str(etcd.directory / "client.pem"),
                        key_file=str(etcd.directory / "client-key.pem"), **more)


def control(etcd: SecureEtcd) -> EtcdSecurity:
    return tls(etcd, user="control", password_file=str(etcd.password_file("control", "control-password")))


def event(n: int) -> NewEvent:
    return NewEvent(type="thing.happened", data=b'{"n":%d}' % n)


async def test_the_control_role_appends_reads_and_follows_over_tls_with_a_password(etcd: SecureEtcd) -> None:
    async with EtcdEventStore([etcd.endpoint], prefix="/v1/a", security=control(etcd), timeout=3) as store:
        assert await store.append(StreamAppend("thing-1", 0, [event(1), event(2)])) == [1, 2]
        seen = []

        async def follow() -> None:
            async for record in store.subscribe(0):
                seen.append(record.position)
                if len(seen) == 3:
                    return

        follower = asyncio.create_task(follow())
        await asyncio.sleep(0.2)
        await store.append(StreamAppend("thing-1", 2, [event(3)]))
        await asyncio.wait_for(follower, 10)
        assert seen == [1, 2, 3]
        lease = await store.client.lease_grant(5)
        assert await store.client.lease_keepalive_once(lease) > 0


async def test_an_expired_token_is_renewed_without_the_caller_noticing(etcd: SecureEtcd) -> None:
    async with EtcdEventStore([etcd.endpoint], prefix="/v1/b", security=control(etcd), timeout=3) as store:
        await store.append(StreamAppend("thing-1", 0, [event(1)]))
        first_token = store.client._token
        await asyncio.sleep(3.5)  # the etcd under test gives tokens a 2 s life
        await store.append(StreamAppend("thing-1", 1, [event(2)]))  # a write, after the token died
        assert [r.version for r in await store.read_stream("thing-1")] == [1, 2]
        assert store.client._token is not None and store.client._token != first_token


async def test_a_store_url_carries_tls_and_credentials(etcd: SecureEtcd) -> None:
    password = etcd.password_file("control", "control-password")
    url = (f"etcd://{etcd.endpoint}/v1/c?ca={etcd.ca}&cert={etcd.directory / 'client.pem'}"
           f"&key={etcd.directory / 'client-key.pem'}&user=control&password_file={password}&timeout=3")
    async with open_store(url) as store:
        assert await store.append(StreamAppend("thing-1", 0, [event(1)])) == [1]
        assert await store.head() == 1


async def test_a_host_certificate_authenticates_as_its_common_name_and_may_only_read(etcd: SecureEtcd) -> None:
    async with EtcdEventStore([etcd.endpoint], prefix="/v1/d", security=control(etcd)) as writer:
        await writer.append(StreamAppend("thing-1", 0, [event(1)]))
    host = EtcdSecurity(ca_file=str(etcd.ca), cert_file=str(etcd.directory / "host-a.pem"),
                        key_file=str(etcd.directory / "host-a-key.pem"))
    async with EtcdEventStore([etcd.endpoint], prefix="/v1/d", security=host, timeout=3,
                              append_timeout=3) as store:
        assert [r.position for r in await store.read_all()] == [1]
        with pytest.raises(AccessDenied, match="permission denied"):
            await store.append(StreamAppend("thing-1", 1, [event(2)]))
        assert await store.stream_version("thing-1") == 1  # nothing was written


async def test_no_role_but_control_reads_the_secret_prefix(etcd: SecureEtcd) -> None:
    client = EtcdClient([etcd.endpoint], security=control(etcd))
    await client.put(SECRET_PREFIX.encode() + b"alice", b"seed")
    await client.close()
    reader = EtcdClient([etcd.endpoint], security=tls(
        etcd, user="reader", password_file=str(etcd.password_file("reader", "reader-password"))))
    try:
        assert (await reader.range(b"/v1/", b"/v10")).kvs is not None
        with pytest.raises(AccessDenied):
            await reader.get(SECRET_PREFIX.encode() + b"alice")
    finally:
        await reader.close()


async def test_a_wrong_password_is_access_denied_at_once(etcd: SecureEtcd) -> None:
    wrong = tls(etcd, user="control", password_file=str(etcd.password_file("wrong", "not-the-password")))
    async with EtcdEventStore([etcd.endpoint], prefix="/v1/e", security=wrong, timeout=3) as store:
        with pytest.raises(AccessDenied, match="authentication failed"):
            await store.head()


async def test_a_certificate_that_names_no_user_has_no_rights(etcd: SecureEtcd) -> None:
    async with EtcdEventStore([etcd.endpoint], prefix="/v1/f", security=tls(etcd), timeout=3) as store:
        with pytest.raises(AccessDenied):
            await store.head()


async def test_tls_without_a_client_certificate_is_refused(etcd: SecureEtcd) -> None:
    password = str(etcd.password_file("control", "control-password"))
    no_certificate = EtcdSecurity(ca_file=str(etcd.ca), user="control", password_file=password)
    async with EtcdEventStore([etcd.endpoint], prefix="/v1/f", security=no_certificate, timeout=1) as store:
        with pytest.raises(UnavailableError):
            await store.head()


async def test_a_client_without_tls_cannot_talk_to_a_tls_etcd(etcd: SecureEtcd) -> None:
    async with EtcdEventStore([etcd.endpoint], prefix="/v1/g", timeout=1) as store:
        with pytest.raises(UnavailableError):
            await store.head()


async def test_a_server_certificate_from_another_ca_is_refused(etcd: SecureEtcd, tmp_path: object) -> None:
    from pathlib import Path

    from tests.support.etcd_secure import make_ca

    other = Path(str(tmp_path))
    make_ca(other)
    stranger = EtcdSecurity(ca_file=str(other / "ca.pem"), cert_file=str(etcd.directory / "client.pem"),
                            key_file=str(etcd.directory / "client-key.pem"), user="control",
                            password_file=str(etcd.password_file("control", "control-password")))
    async with EtcdEventStore([etcd.endpoint], prefix="/v1/h", security=stranger, timeout=1) as store:
        with pytest.raises(UnavailableError):
            await store.head()


async def test_a_missing_certificate_file_names_the_file(etcd: SecureEtcd) -> None:
    missing = EtcdSecurity(ca_file="/nonexistent/ca.pem")
    async with EtcdEventStore([etcd.endpoint], prefix="/v1/i", security=missing, timeout=1) as store:
        with pytest.raises(DataError, match="cannot read the CA certificate /nonexistent/ca.pem"):
            await store.head()
