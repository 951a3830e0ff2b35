"""schemathesis against a live gateway: the OpenAPI document states exactly what the
server checks. Every check of schemathesis runs (server errors, status codes, content
types, headers, response schemas, schema-violating requests refused, schema-valid ones
accepted, auth, ...) over every phase (examples, coverage, fuzzing, stateful), with an
admin session on a gateway with real authentication. Settings: schemathesis.toml here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.threaded_stack import threaded_stack

CONFIG = Path(__file__).with_name("schemathesis.toml")
# The authentication routes (sessions, users) are hardened on the auth branch; until then
# they run in the strict xfail below, so this list must shrink the day they pass.
AUTH_LANE = r"^/v1/(users|sessions)"
# The billing routes (billing branch) do not yet declare in their schemas everything they
# check (patterns of amounts and codes, path parameter types, positions beyond the log):
# they run in their own strict xfail below until they do.
BILLING_LANE = r"^/v1/(prices|usage|invoices|balance|accounts|coupons|payments|orders)"


def schemathesis(url: str, authorization: str, cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or "st"
    return subprocess.run(
        [st, "--config-file", str(CONFIG), "run", f"{url}/v1/openapi.json", "-H", f"Authorization: {authorization}",
         "--checks", "all", "--max-examples", "25", "--workers", "1", "--seed", "20261202",
         "--phases", "examples,coverage,fuzzing,stateful", "--no-color", *extra],
        capture_output=True, text=True, timeout=600, check=False, cwd=cwd)  # its cache stays in cwd


@pytest.mark.slow
def test_schemathesis_finds_nothing_against_a_live_gateway(tmp_path: Path) -> None:
    with threaded_stack(tmp_path) as gateway:
        result = schemathesis(gateway.url, gateway.admin["Authorization"], tmp_path, "--exclude-path-regex",
                              f"{AUTH_LANE}|{BILLING_LANE}")
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert " passed" in result.stdout and "Tested: " in result.stdout, result.stdout[-3000:]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the auth routes' declared limits and statuses come with the auth branch")
def test_schemathesis_on_the_authentication_routes(tmp_path: Path) -> None:
    with threaded_stack(tmp_path) as gateway:
        result = schemathesis(gateway.url, gateway.admin["Authorization"], tmp_path, "--include-path-regex", AUTH_LANE,
                              "--phases", "examples,coverage,fuzzing")
    assert result.returncode == 0, result.stdout[-20000:]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the billing routes' schemas do not yet state all they check")
def test_schemathesis_on_the_billing_routes(tmp_path: Path) -> None:
    with threaded_stack(tmp_path) as gateway:
        result = schemathesis(gateway.url, gateway.admin["Authorization"], tmp_path, "--include-path-regex",
                              BILLING_LANE, "--phases", "examples,coverage,fuzzing")
    assert result.returncode == 0, result.stdout[-20000:]
