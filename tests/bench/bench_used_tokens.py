"""What remembering used one-time tokens on disk costs a login (issue 13).

    .venv/bin/python -m tests.bench.bench_used_tokens [CLAIMS] [--dir DIR]

`ucloud up` records every accepted TOTP in a SQLite file (SqliteUsedTokenCache) so a
restart forgets none; the in-memory cache it replaced forgot them all. This times
CLAIMS claims (default 2000) one after another, as logins arrive, and 32 at a time
(logins at once), for the memory cache and for the SQLite file in DIR (default: a
temporary directory under /var/tmp, a disk, not tmpfs), and the whole token check
(LocalVerifier.verify: seed from the 0600 secret file, pyotp, the claim).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import pyotp

from ucloud.auth.otp import (
    LocalVerifier,
    MemoryUsedTokenCache,
    SqliteUsedTokenCache,
    UsedTokenCache,
)
from ucloud.auth.secrets import FileSecretStore, Secret, otp_key


async def serial(cache: UsedTokenCache, claims: int) -> float:
    start = time.perf_counter()
    for step in range(claims):
        assert await cache.claim("alice", "ucloud", step, time.time() + 90)
    return time.perf_counter() - start


async def concurrent(cache: UsedTokenCache, claims: int) -> float:
    start = time.perf_counter()
    for first in range(0, claims, 32):
        won = await asyncio.gather(*(cache.claim("bob", "ucloud", s, time.time() + 90)
                                     for s in range(first, min(first + 32, claims))))
        assert all(won)
    return time.perf_counter() - start


async def verify(directory: Path, used: UsedTokenCache, claims: int) -> float:
    secrets = FileSecretStore(directory / "secrets.json")
    seeds = [pyotp.random_base32(32) for _ in range(claims)]
    for n, seed in enumerate(seeds):
        await secrets.put(otp_key("ucloud", f"u{n}"), Secret(seed))
    verifier = LocalVerifier(secrets, used)
    now = time.time()
    start = time.perf_counter()
    for n, seed in enumerate(seeds):
        assert await verifier.verify(f"u{n}", "ucloud", pyotp.TOTP(seed).at(now), "::1")
    return time.perf_counter() - start


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("claims", nargs="?", type=int, default=2000)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="ucloud-bench-used-") as tmp:
        root = Path(tmp)
        print(f"{args.claims} claims; SQLite file in {root}")
        for name, make in (("memory", lambda sub: MemoryUsedTokenCache()),
                           ("sqlite", lambda sub: SqliteUsedTokenCache(root / sub / "used-otp.sqlite"))):
            one = await serial(make("serial"), args.claims)
            many = await concurrent(make("concurrent"), args.claims)
            (root / f"verify-{name}").mkdir()
            checked = await verify(root / f"verify-{name}", make("verify"), min(args.claims, 500))
            print(f"{name:7} one at a time: {one / args.claims * 1e3:7.3f} ms/claim | 32 at once: "
                  f"{many / args.claims * 1e3:7.3f} ms/claim | whole token check: "
                  f"{checked / min(args.claims, 500) * 1e3:7.3f} ms")


if __name__ == "__main__":
    asyncio.run(main())
