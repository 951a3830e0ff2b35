"""`ucloud up --no-agent` as a real subprocess on SQLite in a temporary directory, and the
`ucloud` CLI run against it from a home of its own: shared by the tests of `ucloud up`."""

from __future__ import annotations

import os
import shlex
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.slapd import free_port

BIN = Path(sys.executable).parent


def home_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UCLOUD_")}
    return {**env, "XDG_CONFIG_HOME": str(home / "config"), "XDG_STATE_HOME": str(home / "state")}


@dataclass
class Up:
    """One `ucloud up --no-agent` on SQLite in a temporary directory."""

    root: Path
    port: int
    args: tuple[str, ...]
    process: subprocess.Popen[bytes] | None = None
    runs: int = 0
    terminal: bool = False  # run it on a pseudo-terminal (util-linux `script`), as a person would
    store_in_state: bool = False  # the log at its default place, <state>/events.sqlite

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def store(self) -> Path:
        return (self.state if self.store_in_state else self.root) / "events.sqlite"

    @property
    def log(self) -> Path:
        return self.root / f"up-{self.runs}.log"

    def start(self) -> str:
        """Start it and return what it printed until it was up."""
        self.runs += 1
        out = open(self.log, "wb")
        command = [str(BIN / "ucloud"), "up", "--no-agent", "--store", f"sqlite://{self.store}",
                   "--state-dir", str(self.state), "--listen", "127.0.0.1", "--port", str(self.port), *self.args]
        if self.terminal:
            command = ["script", "-qfec", shlex.join(command), str(self.root / "typescript")]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out, stderr=out,
                                        env=home_env(self.root / "home"), start_new_session=True)
        out.close()
        deadline = time.monotonic() + 30
        while "stop: Ctrl-C" not in self.log.read_text():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)
        with urllib.request.urlopen(f"{self.api}/healthz", timeout=5) as answer:
            assert answer.status == 200
        return self.log.read_text()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            if self.terminal:  # stop `ucloud up` itself; `script` ends with it
                children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
                for child in children:
                    os.kill(int(child), signal.SIGTERM)
            else:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def ucloud(self, *args: str, home: Path | None = None, input: str | None = None,
               code: int = 0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(BIN / "ucloud"), *args], env=home_env(home or self.root / "home"),
                                capture_output=True, text=True, timeout=60, input=input)
        assert result.returncode == code, (args, result.stdout, result.stderr, self.log.read_text()[-2000:])
        return result


@pytest.fixture(name="up")
def up_fixture(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Up]:
    """A `ucloud up` not started yet (``up.start()``); parametrize indirectly for extra arguments."""
    args = getattr(request, "param", ())
    cloud = Up(tmp_path, free_port(), tuple(args))
    try:
        yield cloud
    finally:
        cloud.stop()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)
