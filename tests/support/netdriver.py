"""Drive the Linux network driver inside a namespace: ``python -m tests.support.netdriver
STATE_DIR [UNDERLAY [LOCAL]]`` reads a JSON list of operations on stdin and prints the
results as JSON. Run through ``ip netns exec`` by tests/support/netns.py."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from ucloud.hostagent.network.driver import NetworkSpec, PortSpec
from ucloud.hostagent.network.linux import LinuxNetworkDriver


async def main() -> None:
    state_dir, underlay, local = (sys.argv[1:] + [None, None])[:3]
    driver = LinuxNetworkDriver(Path(str(state_dir)), underlay=underlay, local=local)
    results: list[Any] = []
    for op, *rest in json.load(sys.stdin):
        args = rest[0] if rest else None
        started = time.perf_counter()
        match op:
            case "network":
                results.append(await driver.ensure_network(NetworkSpec(**{**args, "rdnss": tuple(args.get("rdnss", ()))})))
            case "remove_network":
                results.append(await driver.remove_network(args))
            case "port":
                results.append(await driver.ensure_port(PortSpec(**{**args, "addresses": tuple(args["addresses"])})))
            case "remove_port":
                results.append(await driver.remove_port(args))
            case "ports":
                results.append(sorted(await driver.ports()))
            case "networks":
                results.append(sorted(await driver.networks()))
            case "counters":
                results.append(await driver.firewall.counters(args))
            case "mtu":
                results.append(driver.mtu())
        if op in ("network", "port"):
            results[-1] = time.perf_counter() - started
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    asyncio.run(main())
