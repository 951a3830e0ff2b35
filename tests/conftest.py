"""Shared fixtures: real backends, started by the tests themselves."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.ceph import CephCluster, ceph_cluster
from tests.support.etcd import EtcdCluster, etcd_cluster
from ucloud.eventstore.etcd import EtcdEventStore
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.memory import MemoryEventStore
from ucloud.eventstore.sqlite import SqliteEventStore

BACKENDS = ["memory", "sqlite", "etcd"]


@pytest.fixture(scope="session")
def ceph() -> Iterator[CephCluster]:
    """One throwaway single-node Ceph cluster for the whole session (tests/support/ceph.py):
    heavy on two shared cores, so few tests use it and all share it."""
    with ceph_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One real etcd member for the whole session; tests isolate by key prefix.

    Before it stops, the whole keyspace is dumped for the suite-wide secret scan."""
    with etcd_cluster(1) as cluster:
        yield cluster
        dump = cluster.members[0].etcdctl("get", "", "--prefix", "--write-out=json")
        (tmp_path_factory.getbasetemp() / "etcd-keyspace.json").write_text(dump)


def unique_prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:12]}/v1"


async def open_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> EventStore:
    if kind == "memory":
        return MemoryEventStore()
    if kind == "sqlite":
        return SqliteEventStore(tmp_path / "log.sqlite")
    if kind == "etcd":
        cluster: EtcdCluster = request.getfixturevalue("etcd")
        return EtcdEventStore(cluster.endpoints, prefix=unique_prefix(), max_txn_ops=1024)
    raise ValueError(kind)


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventStore]:
    if request.param == "etcd":
        request.applymarker(pytest.mark.etcd)
    backend = await open_store(request.param, tmp_path, request)
    try:
        yield backend
    finally:
        await backend.close()


async def forget(store: EventStore) -> None:
    """Remove what a test wrote that holds no secret but is large (tens of MiB of
    snapshots), so the suite-wide secret scan below does not read it again: a SQLite
    log's files are unlinked (the store keeps working on them until closed), an etcd
    store's prefix is deleted."""
    if isinstance(store, SqliteEventStore):
        for suffix in ("", "-wal", "-shm"):
            Path(store.path + suffix).unlink(missing_ok=True)
    elif isinstance(store, EtcdEventStore):
        from ucloud.eventstore.etcd_client import prefix_end

        await store.client.delete(store.prefix + b"/", prefix_end(store.prefix + b"/"))


# -- no secret in any log the suite wrote ---------------------------------------------------------

_SECRETS_SEEN: dict[str, str] = {}


def _record_secret_stores() -> list[tuple[type, str, object]]:
    """Wrap every SecretStore implementation's writes so the suite knows each secret it made."""
    from ucloud.auth.secrets import Secret, SecretStore

    originals = []
    for store_type in SecretStore.__subclasses__():
        for method in ("put", "put_new"):
            original = store_type.__dict__.get(method)
            if original is None:
                continue

            async def recording(self, key, value, *, _original=original):  # type: ignore[no-untyped-def]
                if isinstance(value, Secret):  # anything else is refused by the store itself
                    _SECRETS_SEEN[f"{type(self).__name__}:{key}:{len(_SECRETS_SEEN)}"] = value.reveal()
                return await _original(self, key, value)

            originals.append((store_type, method, original))
            setattr(store_type, method, recording)
    return originals


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole suite: every secret any test stored (seeds, session keys, in this
    process or in a `ucloud up` it started) is searched for, in every encoding
    tests/support/secret_scan.py knows, in every SQLite log and in the etcd keyspace
    outside the secret prefixes. One found fails the run."""
    import base64
    import bisect
    import itertools
    import json

    from tests.support.secret_scan import encodings

    originals = _record_secret_stores()
    yield
    for store_type, method, original in originals:
        setattr(store_type, method, original)
    base = tmp_path_factory.getbasetemp()
    for secret_file in base.rglob("secrets.json"):  # written by `ucloud up` subprocesses
        try:
            document = json.loads(secret_file.read_text())
        except (OSError, ValueError):
            continue
        stored = document.get("secrets") if isinstance(document, dict) else None
        for key, value in (stored.items() if isinstance(stored, dict) else ()):
            if isinstance(value, str):
                _SECRETS_SEEN[f"{secret_file}:{key}"] = value
    if not _SECRETS_SEEN:
        return  # no test in this run made a secret
    # What is scanned: every SQLite file, and the etcd keyspace outside the secret
    # prefixes, joined into one lower-cased blob: each distinct (lower-cased) encoding
    # of each secret is then one search (~3 ms per 20 MB), and case can only add
    # matches, never hide one.
    sources: list[tuple[str, bytes]] = []
    for log in list(base.rglob("*.sqlite")) + list(base.rglob("*.sqlite-wal")):
        sources.append((str(log), log.read_bytes()))
    keyspace = base / "etcd-keyspace.json"  # dumped by the etcd fixture before it stopped
    if keyspace.exists():
        for kv in json.loads(keyspace.read_text()).get("kvs", []):
            key = base64.b64decode(kv["key"])
            if key.startswith((b"/secrets", b"/auth/")):
                continue  # where secrets (and used-token markers) belong
            sources.append((f"etcd {key!r}", key + b"=" + base64.b64decode(kv.get("value", ""))))
    blob = b"\0".join(data for _, data in sources).lower()
    starts = list(itertools.accumulate((len(data) + 1 for _, data in sources), initial=0))
    by_value: dict[str, str] = {}
    for name, value in _SECRETS_SEEN.items():
        by_value.setdefault(value, name)
    found: list[str] = []
    for value, name in by_value.items():
        for form in {f.lower() for f in encodings(value)}:
            at = blob.find(form)
            if at >= 0:
                found.append(f"{sources[bisect.bisect_right(starts, at) - 1][0]}: {name}")
                break
    assert not found, f"secrets found in logs: {found}"
