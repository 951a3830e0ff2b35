"""radvd for the automatic networks a router host serves: one daemon per bridge.

Each runs daemonised with its own config, pid file and log under the state directory,
so it outlives the agent; a restarted agent finds it by its pid file and leaves it
alone when its config is unchanged (no RA gap), restarting it only when the config
changed. radvd needs IPv6 forwarding on (it refuses to advertise otherwise): the router
host sets ``net.ipv6.conf.all.forwarding=1`` in its network namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from .driver import NetworkError


def config(bridge: str, prefix: str, mtu: int, rdnss: tuple[str, ...] = ()) -> str:
    lines = [
        f"interface {bridge} {{",
        "    AdvSendAdvert on;",
        "    MinRtrAdvInterval 3;",
        "    MaxRtrAdvInterval 10;",
        f"    AdvLinkMTU {mtu};",
        f"    prefix {prefix} {{",
        "        AdvOnLink on;",
        "        AdvAutonomous on;",
        "    };",
    ]
    if rdnss:
        lines += [f"    RDNSS {' '.join(rdnss)} {{", "    };"]
    lines.append("};")
    return "\n".join(lines) + "\n"


class Radvd:
    def __init__(self, state_dir: Path, binary: str = "radvd") -> None:
        self.dir = Path(state_dir)
        self.binary = binary

    def _paths(self, bridge: str) -> tuple[Path, Path, Path]:
        return self.dir / f"{bridge}.conf", self.dir / f"{bridge}.pid", self.dir / f"{bridge}.log"

    def pid(self, bridge: str) -> int | None:
        _, pidfile, _ = self._paths(bridge)
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if b"radvd" in cmdline and str(self._paths(bridge)[0]).encode() in cmdline else None

    async def ensure(self, bridge: str, text: str) -> bool:
        """radvd runs for ``bridge`` with ``text`` as its config; True if (re)started."""
        conf, pidfile, logfile = self._paths(bridge)
        self.dir.mkdir(parents=True, exist_ok=True)
        running = self.pid(bridge)
        if running is not None and conf.exists() and conf.read_text() == text:
            return False
        if running is not None:
            await self.stop(bridge)
        tmp = conf.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, conf)
        pidfile.unlink(missing_ok=True)
        process = await asyncio.create_subprocess_exec(
            self.binary, "-C", str(conf), "-p", str(pidfile), "-m", "logfile", "-l", str(logfile),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, start_new_session=True)
        _, err = await process.communicate()  # radvd forks and its parent exits
        for _ in range(100):
            if self.pid(bridge) is not None:
                return True
            await asyncio.sleep(0.05)
        tail = logfile.read_text(errors="replace")[-800:] if logfile.exists() else ""
        raise NetworkError(f"radvd for {bridge} did not start: {err.decode(errors='replace').strip()} {tail}")

    async def stop(self, bridge: str) -> None:
        pid = self.pid(bridge)
        conf, pidfile, _ = self._paths(bridge)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not Path(f"/proc/{pid}").exists():
                    break
                await asyncio.sleep(0.05)
        pidfile.unlink(missing_ok=True)
        conf.unlink(missing_ok=True)

    def bridges(self) -> set[str]:
        return {p.stem for p in self.dir.glob("*.conf") if self.pid(p.stem) is not None}
