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
        result = schemathesis(gateway.url, gateway.admin["Authorization"], tmp_path)
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert " passed" in result.stdout and "Tested: " in result.stdout, result.stdout[-3000:]
