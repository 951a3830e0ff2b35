"""`ucloud-watchdog`: kills this host's guests when the host agent stops feeding it.

The pattern of Proxmox's watchdog-mux: a small process beside the agent, with no other
job, so it keeps working when the agent hangs (a deadlock, SIGSTOP, a stuck disk).
After every successful renewal of its heartbeat lease the agent sends the watchdog its
new fence deadline (a CLOCK_MONOTONIC time, shared by every process of the machine) as
one datagram on ``<state-dir>/watchdog.sock``. Once fed, the watchdog SIGKILLs every
QEMU under ``<state-dir>/run`` as soon as the deadline passes without a newer one, and
keeps doing so until it is fed again. The deadline is the agent's own fence deadline,
before the lease can expire in the store (docs/operations.md, "Fencing").

It finds guests as the QEMU driver does: by the lock QEMU holds on its pid file, so a
stale pid file never makes it kill an unrelated process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from pathlib import Path

import click

from .qemu import PID_FILE, _lock_holder

log = logging.getLogger("ucloud.watchdog")

SOCKET_NAME = "watchdog.sock"


def guests(run_root: Path) -> list[int]:
    """The pids of the live QEMUs under ``run_root``."""
    pids = []
    with contextlib.suppress(FileNotFoundError):
        for run_dir in run_root.iterdir():
            pid = _lock_holder(run_dir / PID_FILE)
            if pid is not None:
                pids.append(pid)
    return pids


class Watchdog:
    def __init__(self, state_dir: Path, poll: float = 0.05) -> None:
        self.state_dir = state_dir
        self.run_root = state_dir / "run"
        self.path = state_dir / SOCKET_NAME
        self.poll = poll
        self.deadline: float | None = None  # None: never fed, nothing to enforce
        self.killed = 0

    def serve(self, stop: list[bool] | None = None) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        sock.settimeout(self.poll)
        log.info("watchdog on %s, guarding %s", self.path, self.run_root)
        expired_logged = False
        try:
            while not (stop and stop[0]):
                try:
                    data = sock.recv(64)
                    self.deadline = float(data.decode())
                    expired_logged = False
                except TimeoutError:
                    pass
                except ValueError:
                    log.warning("ignored a malformed feed")
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    pids = guests(self.run_root)
                    if pids or not expired_logged:
                        log.warning("the agent missed its fence deadline: killing %d guest(s) %s", len(pids), pids)
                        expired_logged = True
                    for pid in pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                            self.killed += 1
        finally:
            sock.close()


class WatchdogFeed:
    """The agent's side: send each new fence deadline; a missing watchdog is not an error."""

    def __init__(self, state_dir: Path) -> None:
        self.path = str(state_dir / SOCKET_NAME)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def __call__(self, deadline: float) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendto(b"%.6f" % deadline, self.path)


@click.command()
@click.option("--state-dir", type=click.Path(path_type=Path), default=Path("/var/lib/ucloud"), show_default=True,
              help="The host agent's state dir: its feed socket and its guests' run directories are there.")
@click.option("-v", "--verbose", is_flag=True)
def main(state_dir: Path, verbose: bool) -> None:
    """Kill this host's guests when the host agent stops renewing its lease."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    stop = [False]

    def finish(*_: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, finish)
    signal.signal(signal.SIGINT, finish)
    Watchdog(state_dir.absolute()).serve(stop)
