"""The persistent used-token cache of one gateway (SqliteUsedTokenCache): a token
accepted once stays refused across a reopen of the file, in another process too,
old rows are pruned, and the file is private."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pyotp
import pytest

from tests.support.auth import ManualClock
from ucloud.auth.otp import LocalVerifier, SqliteUsedTokenCache
from ucloud.auth.secrets import FileSecretStore, Secret, otp_key
from ucloud.eventstore.errors import UnavailableError

T0 = 1_700_000_000.0
SEED = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


def rows(path: Path) -> list[tuple[str, str, int]]:
    with sqlite3.connect(path) as db:
        return [tuple(r) for r in db.execute("SELECT name, realm, timestep FROM used_otp ORDER BY timestep")]


async def test_a_claim_survives_closing_and_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "used-otp.sqlite"
    clock = ManualClock(T0)
    cache = SqliteUsedTokenCache(path, clock=clock)
    assert await cache.claim("alice", "ucloud", 7, T0 + 60)
    assert not await cache.claim("alice", "ucloud", 7, T0 + 60)
    assert await cache.claim("alice", "ucloud-admin", 7, T0 + 60)  # another realm is another token
    await cache.close()
    reopened = SqliteUsedTokenCache(path, clock=clock)
    assert not await reopened.claim("alice", "ucloud", 7, T0 + 60)
    assert await reopened.claim("alice", "ucloud", 8, T0 + 60)
    await reopened.close()


async def test_a_verifier_on_a_new_cache_refuses_a_token_the_old_one_accepted(tmp_path: Path) -> None:
    secrets = FileSecretStore(tmp_path / "secrets.json")
    await secrets.put(otp_key("ucloud", "alice"), Secret(SEED))
    clock = ManualClock(T0)
    token = pyotp.TOTP(SEED).at(T0)
    first = LocalVerifier(secrets, SqliteUsedTokenCache(tmp_path / "used.sqlite", clock=clock), clock=clock)
    assert await first.verify("alice", "ucloud", token, "::1")
    await first.close()  # the gateway stops (or dies: the row was committed before the answer)
    second = LocalVerifier(secrets, SqliteUsedTokenCache(tmp_path / "used.sqlite", clock=clock), clock=clock)
    assert not await second.verify("alice", "ucloud", token, "::1")
    await second.close()


async def test_expired_rows_are_pruned_by_age(tmp_path: Path) -> None:
    path = tmp_path / "used.sqlite"
    clock = ManualClock(T0)
    cache = SqliteUsedTokenCache(path, clock=clock, prune_every=0)
    assert await cache.claim("alice", "ucloud", 1, T0 + 30)
    assert await cache.claim("bob", "ucloud", 2, T0 + 90)
    assert len(rows(path)) == 2 and len(cache) == 2
    clock.advance(60)  # alice's token can no longer be valid: its row goes at the next claim
    assert await cache.claim("carol", "ucloud", 3, T0 + 150)
    assert rows(path) == [("bob", "ucloud", 2), ("carol", "ucloud", 3)]
    clock.advance(1000)
    assert await cache.claim("alice", "ucloud", 1, clock() + 30)  # an expired key counts as unused
    assert rows(path) == [("alice", "ucloud", 1)]
    await cache.close()


def test_concurrent_claims_in_three_processes_succeed_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "used.sqlite"
    SqliteUsedTokenCache(path)  # create the file
    script = (
        "import asyncio, sys, time\n"
        "from ucloud.auth.otp import SqliteUsedTokenCache\n"
        "async def main():\n"
        "    cache = SqliteUsedTokenCache(sys.argv[1])\n"
        "    won = [await cache.claim('alice', 'ucloud', step, time.time() + 600) for step in range(200)]\n"
        "    print(sum(won))\n"
        "asyncio.run(main())\n"
    )
    processes = [subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
                 for _ in range(3)]
    won = [int(p.communicate(timeout=120)[0]) for p in processes]
    assert sum(won) == 200  # every step claimed once in all, whoever got it
    assert len(rows(path)) == 200


async def test_concurrent_claims_in_one_process_succeed_exactly_once(tmp_path: Path) -> None:
    cache = SqliteUsedTokenCache(tmp_path / "used.sqlite")
    results = await asyncio.gather(*(cache.claim("alice", "ucloud", 5, 1e12) for _ in range(20)))
    assert results.count(True) == 1
    await cache.close()


def test_the_file_is_private_and_its_directory_made_private(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual umask, which would make a plain new file 0644
    try:
        path = tmp_path / "new" / "used.sqlite"
        SqliteUsedTokenCache(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_a_symlink_in_place_of_the_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").touch()
    (tmp_path / "used.sqlite").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        SqliteUsedTokenCache(tmp_path / "used.sqlite")


async def test_a_cache_that_cannot_write_is_unavailable_not_a_refusal(tmp_path: Path) -> None:
    path = tmp_path / "used.sqlite"
    cache = SqliteUsedTokenCache(path)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the file: the claim times out
    cache._db.execute("PRAGMA busy_timeout = 100")  # type: ignore[union-attr]
    try:
        with pytest.raises(UnavailableError, match="used-token cache is unavailable"):
            await cache.claim("alice", "ucloud", 1, 1e12)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert await cache.claim("alice", "ucloud", 1, 1e12)  # and it recovers
    await cache.close()
