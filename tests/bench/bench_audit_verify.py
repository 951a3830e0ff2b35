"""How fast ucloud-audit verify reads a log, on SQLite and on a real etcd (tmpfs).

    .venv/bin/python -m tests.bench.bench_audit_verify [EVENTS]

Writes EVENTS events (default 100000) in appends of 50 through the EventStore API, then
times verify_log (which pages through read_all) and tail -n 10 --type (a backward scan).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tests.support.etcd import etcd_cluster
from ucloud.cli.audit import Filter, Pattern, backwards, verify_log
from ucloud.eventstore.records import NewEvent, StreamAppend
from ucloud.eventstore.url import open_store


async def measure(url: str, events: int) -> None:
    async with open_store(url) as store:
        start = time.perf_counter()
        batch = 50
        pending = []
        for k in range(events // batch):
            data = [NewEvent(type="vm.ping", data=json.dumps({"vm": k, "n": n}).encode(), actor="bench")
                    for n in range(batch)]
            pending.append(store.append(StreamAppend(f"vm-{k}", 0, data)))
            if len(pending) == 64:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
        written = time.perf_counter() - start
        start = time.perf_counter()
        result = await verify_log(store)
        verified = time.perf_counter() - start
        assert not result.problems, result.problems[:5]
        start = time.perf_counter()
        flt = Filter(types=(Pattern("vm.ping", False),))
        found = 0
        async for record in backwards(store, flt, 0, result.head):
            found += flt.matches(record)
            if found == 10:
                break
        tailed = time.perf_counter() - start
    print(f"{url.split(':')[0]:6} {result.events} events: written in {written:.1f}s; "
          f"verify {verified:.2f}s = {result.events / verified:,.0f} events/s; tail -n 10 {tailed * 1000:.0f} ms")


def main() -> None:
    events = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        asyncio.run(measure(f"sqlite://{Path(tmp) / 'log.sqlite'}", events))
    with etcd_cluster(1) as cluster:
        asyncio.run(measure(f"etcd://{cluster.endpoints[0]}/bench-{uuid.uuid4().hex[:8]}/v1", events))


if __name__ == "__main__":
    main()
