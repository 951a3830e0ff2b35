"""`ucloud gateway` and `ucloud processes` start without the rest of the CLI (cli/entry.py);
everything else is the whole CLI, as before."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from ucloud.cli import entry
sys.argv = ["ucloud", *sys.argv[1:]]
try:
    entry.main()
except SystemExit as done:
    code = done.code
else:
    code = 0
loaded = sorted(m for m in sys.modules if m in ("ucloud.cli.main", "ucloud.hostagent.agent", "pyroute2"))
print("LOADED", ",".join(loaded), "CODE", code)
"""


def probe(*args: str) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("LOADED "), done.stdout + done.stderr
    return last, done.stdout


@pytest.mark.parametrize("daemon", ["gateway", "processes"])
def test_a_daemon_starts_without_the_rest_of_the_cli(daemon: str) -> None:
    last, out = probe(daemon, "--help")
    assert last == "LOADED  CODE 0", out  # neither the whole CLI nor a host agent's modules
    assert f"Usage: ucloud {daemon} [OPTIONS]" in out


def test_a_daemon_refuses_bad_options_as_before() -> None:
    last, out = probe("gateway", "--port", "nope")
    assert last.endswith("CODE 2"), out


def test_every_other_command_is_the_whole_cli() -> None:
    last, out = probe("--help")
    assert "ucloud.cli.main" in last and last.endswith("CODE 0"), out
    assert "gateway" in out and "processes" in out and "vm" in out
