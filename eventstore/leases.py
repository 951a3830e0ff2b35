"""Leases: who leads a process manager, and which host agents are alive.

One small port with three adapters, all passing tests/contract/test_leases_contract.py:

- ``EtcdLeases``: real etcd leases (grant, keep-alive, revoke through our client in
  eventstore/etcd_client.py). A lease key ``<prefix>/leases/<name>`` holds the holder's
  name and is attached to the lease, so etcd itself deletes it when the holder stops
  renewing: no clock of ours decides that a holder is gone.
- ``SqliteLeases``: a ``leases`` table in a file beside the SQLite log
  (``<log>.leases``: renewals never queue behind the log's writer), with expiry times on
  the wall clock (all holders share the machine's clock); ``BEGIN IMMEDIATE`` serialises
  processes.
- ``MemoryLeases``: one process, for unit tests and in-process stacks.

``hold()`` keeps a lease renewed in the background and knows the latest moment at which
the holder may still act as the holder: the start of its last successful renewal plus the
TTL minus a margin (``HeldLease.deadline``, on CLOCK_MONOTONIC, shared by every process of
the machine). The store's expiry is at least the renewal's *arrival* plus the TTL, so the
holder always stops believing in its lease before anyone else can take it. The host
agent fences its guests on that deadline (docs/operations.md, "Fencing").
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import math
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import EventStoreError, InvalidAppend, UnavailableError
from .records import validate_slice

if TYPE_CHECKING:
    from .etcd_client import EtcdClient
    from .interface import EventStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grant:
    """A lease held: ``token`` tells this grant from a later one of the same holder."""

    name: str
    holder: str
    ttl: float
    token: int


class Leases(abc.ABC):
    """Named leases with a TTL; at most one holder per name at any time."""

    @abc.abstractmethod
    async def acquire(self, name: str, holder: str, ttl: float) -> Grant | None:
        """Take the lease ``name`` for ``ttl`` seconds; None if someone holds it."""

    @abc.abstractmethod
    async def renew(self, grant: Grant) -> bool:
        """Extend a held lease by its TTL from now; False if it is gone (expired, taken)."""

    @abc.abstractmethod
    async def release(self, grant: Grant) -> None:
        """Give the lease up at once (a clean shutdown: no one waits for the TTL)."""

    @abc.abstractmethod
    async def holders(self, prefix: str = "") -> dict[str, str]:
        """The live leases whose names start with ``prefix``: name -> holder."""

    @abc.abstractmethod
    async def held(self, name: str, token: int) -> bool:
        """Is the lease ``name`` live now under the grant ``token``? (The gateway checks a
        host's claim to be up in a session against its heartbeat lease.)"""

    async def close(self) -> None:
        return None


def _check(name: str, ttl: float | None = None) -> None:
    try:
        validate_slice(name)  # the same rule as stream names: no '/', bounded, ASCII
    except InvalidAppend as error:
        raise ValueError(str(error).replace("slice name", "lease name")) from None
    if ttl is not None and not (0 < ttl <= 3600):
        raise ValueError(f"lease TTL must be in (0, 3600] seconds, got {ttl}")


# -- memory ---------------------------------------------------------------------------------


class MemoryLeases(Leases):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._held: dict[str, tuple[str, int, float]] = {}  # name -> holder, token, expiry
        self._tokens = 0

    def _live(self, name: str) -> tuple[str, int, float] | None:
        entry = self._held.get(name)
        if entry is not None and entry[2] <= self.clock():
            del self._held[name]
            return None
        return entry

    async def acquire(self, name: str, holder: str, ttl: float) -> Grant | None:
        _check(name, ttl)
        if self._live(name) is not None:
            return None
        self._tokens += 1
        self._held[name] = (holder, self._tokens, self.clock() + ttl)
        return Grant(name, holder, ttl, self._tokens)

    async def renew(self, grant: Grant) -> bool:
        entry = self._live(grant.name)
        if entry is None or entry[1] != grant.token:
            return False
        self._held[grant.name] = (grant.holder, grant.token, self.clock() + grant.ttl)
        return True

    async def release(self, grant: Grant) -> None:
        entry = self._live(grant.name)
        if entry is not None and entry[1] == grant.token:
            del self._held[grant.name]

    async def holders(self, prefix: str = "") -> dict[str, str]:
        return {name: entry[0] for name in list(self._held)
                if name.startswith(prefix) and (entry := self._live(name)) is not None}

    async def held(self, name: str, token: int) -> bool:
        entry = self._live(name)
        return entry is not None and entry[1] == token


# -- SQLite ---------------------------------------------------------------------------------


class SqliteLeases(Leases):
    """Leases in a SQLite file of their own beside the log (wall-clock expiry, one machine)."""

    def __init__(self, path: Path | str, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self._lock = asyncio.Lock()
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            # Only the service reads it (who holds what is no secret, but the state dir is private).
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            conn = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 10000")
            conn.execute("CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, "
                         "token INTEGER NOT NULL, expires REAL NOT NULL)")
            self._conn = conn
        return self._conn

    async def _run(self, work: Callable[[sqlite3.Connection], object]) -> object:
        def transaction() -> object:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        async with self._lock:
            try:
                return await asyncio.to_thread(transaction)
            except sqlite3.Error as error:
                raise UnavailableError(f"leases in {self.path}: {error}") from error

    async def acquire(self, name: str, holder: str, ttl: float) -> Grant | None:
        _check(name, ttl)

        def work(conn: sqlite3.Connection) -> Grant | None:
            now = self.clock()
            row = conn.execute("SELECT expires FROM leases WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] > now:
                return None
            token = self._next_token(conn)  # only grows: an old grant never matches a new one
            conn.execute("INSERT OR REPLACE INTO leases (name, holder, token, expires) VALUES (?, ?, ?, ?)",
                         (name, holder, token, now + ttl))
            return Grant(name, holder, ttl, token)

        return await self._run(work)  # type: ignore[return-value]

    @staticmethod
    def _next_token(conn: sqlite3.Connection) -> int:
        conn.execute("CREATE TABLE IF NOT EXISTS lease_tokens (id INTEGER PRIMARY KEY CHECK (id = 1), "
                     "last INTEGER NOT NULL)")
        conn.execute("INSERT OR IGNORE INTO lease_tokens (id, last) VALUES (1, 0)")
        conn.execute("UPDATE lease_tokens SET last = last + 1 WHERE id = 1")
        return int(conn.execute("SELECT last FROM lease_tokens WHERE id = 1").fetchone()[0])

    async def renew(self, grant: Grant) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            now = self.clock()
            cursor = conn.execute("UPDATE leases SET expires = ? WHERE name = ? AND token = ? AND expires > ?",
                                  (now + grant.ttl, grant.name, grant.token, now))
            return cursor.rowcount == 1

        return bool(await self._run(work))

    async def release(self, grant: Grant) -> None:
        await self._run(lambda conn: conn.execute(
            "UPDATE leases SET expires = 0 WHERE name = ? AND token = ?", (grant.name, grant.token)))

    async def holders(self, prefix: str = "") -> dict[str, str]:
        def work(conn: sqlite3.Connection) -> dict[str, str]:
            rows = conn.execute("SELECT name, holder FROM leases WHERE expires > ? AND substr(name, 1, ?) = ?",
                                (self.clock(), len(prefix), prefix)).fetchall()
            return {name: holder for name, holder in rows}

        return await self._run(work)  # type: ignore[return-value]

    async def held(self, name: str, token: int) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT token FROM leases WHERE name = ? AND expires > ?",
                               (name, self.clock())).fetchone()
            return row is not None and int(row[0]) == token

        return bool(await self._run(work))

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.to_thread(conn.close)


# -- etcd -----------------------------------------------------------------------------------


class EtcdLeases(Leases):
    """Real etcd leases; TTLs are whole seconds (rounded up), at least 1."""

    def __init__(self, client: EtcdClient, prefix: bytes = b"/v1") -> None:
        self.client = client
        self.prefix = prefix.rstrip(b"/") + b"/leases/"

    def _key(self, name: str) -> bytes:
        return self.prefix + name.encode()

    async def acquire(self, name: str, holder: str, ttl: float) -> Grant | None:
        from .etcd_client import cmp_create, op_put

        _check(name, ttl)
        lease_id = await self.client.lease_grant(max(1, math.ceil(ttl)))
        key = self._key(name)
        try:
            result = await self.client.txn([cmp_create(key, "==", 0)], [op_put(key, holder.encode(), lease_id)])
        except BaseException:
            with contextlib.suppress(Exception):
                await self.client.lease_revoke(lease_id)
            raise
        if not result.succeeded:
            with contextlib.suppress(EventStoreError):
                await self.client.lease_revoke(lease_id)
            return None
        return Grant(name, holder, ttl, lease_id)

    async def renew(self, grant: Grant) -> bool:
        return await self.client.lease_keepalive_once(grant.token) > 0

    async def release(self, grant: Grant) -> None:
        with contextlib.suppress(EventStoreError):
            await self.client.lease_revoke(grant.token)

    async def holders(self, prefix: str = "") -> dict[str, str]:
        from .etcd_client import prefix_end

        start = self._key(prefix)
        result = await self.client.range(start, prefix_end(start))
        return {kv.key[len(self.prefix):].decode(): kv.value.decode() for kv in result.kvs}

    async def held(self, name: str, token: int) -> bool:
        # The key lives exactly as long as its etcd lease, and is attached to it.
        kv = await self.client.get(self._key(name))
        return kv is not None and kv.lease == token


_MEMORY: dict[int, MemoryLeases] = {}


def leases_for(store: EventStore) -> Leases:
    """The leases that go with a log: etcd leases beside an etcd log, a table in the
    SQLite file beside a SQLite log, one shared MemoryLeases per in-memory store."""
    from .etcd import EtcdEventStore
    from .memory import MemoryEventStore
    from .sqlite import SqliteEventStore

    if isinstance(store, EtcdEventStore):
        return EtcdLeases(store.client, store.prefix)
    if isinstance(store, SqliteEventStore):
        if store.path == ":memory:":
            return _MEMORY.setdefault(id(store), MemoryLeases())
        return SqliteLeases(store.path + ".leases")
    if isinstance(store, MemoryEventStore):
        return _MEMORY.setdefault(id(store), MemoryLeases())
    raise TypeError(f"no leases for a {type(store).__name__}")


# -- holding a lease ------------------------------------------------------------------------


@dataclass
class HeldLease:
    """A lease kept renewed by ``hold``. ``deadline`` (time.monotonic) is the last moment
    its holder may still act as the holder; ``lost`` is set once it is past or refused."""

    grant: Grant
    margin: float
    deadline: float
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    renewals: int = 0
    on_renewed: Callable[[float], None] | None = None

    @property
    def valid(self) -> bool:
        return not self.lost.is_set() and time.monotonic() < self.deadline


async def acquire_when_free(leases: Leases, name: str, holder: str, ttl: float,
                            poll: float | None = None) -> Grant:
    """Wait until the lease is free and take it (a standby waiting to lead)."""
    poll = poll if poll is not None else max(0.05, ttl / 4)
    while True:
        try:
            grant = await leases.acquire(name, holder, ttl)
        except EventStoreError as error:
            log.info("lease %s: cannot ask the store now (%s); trying again", name, error)
            grant = None
        if grant is not None:
            return grant
        await asyncio.sleep(poll)


@contextlib.asynccontextmanager
async def hold(leases: Leases, grant: Grant, *, margin: float | None = None,
               on_renewed: Callable[[float], None] | None = None) -> AsyncIterator[HeldLease]:
    """Keep ``grant`` renewed (every TTL/4) while the block runs; ``lost`` is set when a
    renewal is refused or the deadline passes without one. The lease is released on exit.
    ``on_renewed(deadline)`` is called after each successful renewal (the agent feeds its
    watchdog there)."""
    margin = margin if margin is not None else grant.ttl / 4
    if not 0 <= margin < grant.ttl:
        raise ValueError(f"lease margin must be in [0, TTL), got {margin} for TTL {grant.ttl}")
    started = time.monotonic()
    held = HeldLease(grant, margin, started + grant.ttl - margin, on_renewed=on_renewed)
    if on_renewed is not None:
        on_renewed(held.deadline)
    keeper = asyncio.create_task(_keep(leases, held), name=f"lease-{grant.name}")
    try:
        yield held
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        if not held.lost.is_set():  # a lost lease is gone already: nothing to give back
            with contextlib.suppress(EventStoreError, OSError, TimeoutError):
                async with asyncio.timeout(2):
                    await leases.release(grant)


async def _keep(leases: Leases, held: HeldLease) -> None:
    interval = held.grant.ttl / 4
    while not held.lost.is_set():
        now = time.monotonic()
        if now >= held.deadline:
            log.warning("lease %s: not renewed in time; it is lost", held.grant.name)
            held.lost.set()
            return
        await asyncio.sleep(min(interval, max(0.0, held.deadline - now)))
        sent = time.monotonic()
        try:
            async with asyncio.timeout(max(0.1, held.deadline - sent)):
                renewed = await leases.renew(held.grant)
        except (EventStoreError, OSError, TimeoutError) as error:
            log.info("lease %s: renewal failed (%s)", held.grant.name, error)
            continue
        except Exception:
            # Never let the keeper die quietly: the holder would believe in a dead lease
            # until its deadline, and nobody would say why.
            log.exception("lease %s: renewal failed", held.grant.name)
            continue
        if not renewed:
            log.warning("lease %s: the store no longer knows it; it is lost", held.grant.name)
            held.lost.set()
            return
        held.renewals += 1
        held.deadline = max(held.deadline, sent + held.grant.ttl - held.margin)
        if held.on_renewed is not None:
            held.on_renewed(held.deadline)
