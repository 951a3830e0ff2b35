"""A ucloud cluster of separate processes on a real etcd: `ucloud processes` instances and
`ucloud-host` agents (each with its own --hostname and --state-dir, optionally with its
`ucloud-watchdog`), driven from the test through the command side and read models.
Shared by the host-failure tests and benchmark."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

from tests.support.qemu import TINY_CACHE
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.domain import host as host_domain
from ucloud.eventstore.etcd import EtcdEventStore
from ucloud.hostagent.watchdog import guests
from ucloud.projections.runner import ProjectionRunner
from ucloud.projections.views import ReadModels

BIN = Path(sys.executable).parent
ALICE = Actor("alice")


@dataclass
class Agent:
    hostname: str
    state_dir: Path
    process: subprocess.Popen[bytes] | None = None
    watchdog: subprocess.Popen[bytes] | None = None

    @property
    def host_id(self) -> UUID:
        return host_domain.host_id_for(self.hostname)

    def qemus(self) -> list[int]:
        return guests(self.state_dir / "run")


@dataclass
class Cluster:
    endpoints: list[str]
    root: Path
    prefix: str = field(default_factory=lambda: f"/hf-{uuid.uuid4().hex[:8]}/v1")
    agents: dict[str, Agent] = field(default_factory=dict)
    daemons: list[subprocess.Popen[bytes]] = field(default_factory=list)
    store: EtcdEventStore | None = None
    lease_ttl: float = 3.0

    @property
    def url(self) -> str:
        return f"etcd://{','.join(self.endpoints)}{self.prefix}"

    def _spawn(self, args: list[str], log: str, **kw: object) -> subprocess.Popen[bytes]:
        out = open(self.root / log, "ab")
        process = subprocess.Popen(args, stdout=out, stderr=out, start_new_session=True, **kw)  # type: ignore[call-overload]
        out.close()
        self.daemons.append(process)
        return process

    def start_processes(self, instance: str) -> subprocess.Popen[bytes]:
        return self._spawn([str(BIN / "ucloud"), "processes", "--store", self.url, "--instance", instance,
                            "--lease-ttl", "2"], f"processes-{instance}.log")

    def start_agent(self, hostname: str, *, watchdog: bool = False, netns: str | None = None,
                    endpoint: str | None = None) -> Agent:
        """``netns``: run it (and its watchdog, and so its guests) in that network namespace,
        reaching etcd at ``endpoint``."""
        agent = self.agents.get(hostname)
        if agent is None:
            # Short: QMP/VNC socket paths under it must fit in 107 bytes.
            state = Path(tempfile.mkdtemp(prefix=f"uc{hostname}-", dir="/tmp"))
            (state / "cache").mkdir()
            (state / "cache" / "tinyguest").symlink_to(TINY_CACHE)  # built once per machine
            agent = self.agents[hostname] = Agent(hostname, state)
        prefix = ["ip", "netns", "exec", netns] if netns else []
        if watchdog:
            agent.watchdog = self._spawn([*prefix, str(BIN / "ucloud-watchdog"), "--state-dir", str(agent.state_dir)],
                                         f"watchdog-{hostname}.log")
        agent.process = self._spawn(
            [*prefix, str(BIN / "ucloud-host"), "--store", f"etcd://{endpoint}{self.prefix}" if endpoint else self.url,
             "--state-dir", str(agent.state_dir),
             "--hostname", hostname, "--accel", "tcg", "--lease-ttl", str(self.lease_ttl), "--lease-margin", "0.5"],
            f"agent-{hostname}.log")
        return agent

    def log(self, name: str) -> str:
        path = self.root / name
        return path.read_text()[-3000:] if path.exists() else ""

    async def open(self) -> CommandService:
        self.store = EtcdEventStore(self.endpoints, prefix=self.prefix, max_txn_ops=1024)
        return CommandService(self.store)

    async def models(self) -> ReadModels:
        assert self.store is not None
        models = ReadModels()
        from ucloud.domain.catalogue import build_codec

        runner = ProjectionRunner(self.store, build_codec(), models.all())
        await runner.catch_up()
        return models

    async def wait(self, predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not await predicate():
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.root.glob("*.log")))
                raise AssertionError(f"{what}: not reached in {timeout}s\n{logs}")
            await asyncio.sleep(0.1)

    def kill_host(self, agent: Agent) -> None:
        """A host dies: its agent, its watchdog and its guests, all at once."""
        for process in (agent.process, agent.watchdog):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for pid in agent.qemus():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def close(self) -> None:
        for process in self.daemons:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for agent in self.agents.values():
            for pid in agent.qemus():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            shutil.rmtree(agent.state_dir, ignore_errors=True)
        if self.store is not None:
            await self.store.close()
