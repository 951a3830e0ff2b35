"""mypy sees across packages: a call from one ucloud package into another is checked.

Before the type-check tree existed, every ``ucloud.*`` import was ``Any`` to mypy and a
misspelt keyword argument passed silently; these tests keep that from coming back."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from mypy import api

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "pyproject.toml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def typecheck_tree() -> Path:
    subprocess.run([str(ROOT / "bootstrap"), "typecheck-tree"], cwd=ROOT, check=True)
    return ROOT / ".typecheck" / "ucloud"


def check(tmp_path: Path, source: str) -> tuple[str, int]:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(source)
    out, err, status = api.run(["--config-file", str(CONFIG), "--no-incremental", str(snippet)])
    return out + err, status


def test_a_wrong_keyword_in_a_cross_package_call_fails_the_type_check(typecheck_tree: Path,
                                                                      tmp_path: Path) -> None:
    report, status = check(tmp_path, (
        "from uuid import uuid4\n"
        "from ucloud.commands.service import CommandService\n"
        "from ucloud.commands.unit_of_work import SYSTEM\n"
        "async def f(service: CommandService) -> None:\n"
        "    await service.place_vm(SYSTEM, vm_id=uuid4(), host=uuid4())\n"))
    assert status == 1, report
    assert 'Unexpected keyword argument "host" for "place_vm" of "CommandService"' in report


def test_the_same_call_spelt_right_passes(typecheck_tree: Path, tmp_path: Path) -> None:
    report, status = check(tmp_path, (
        "from uuid import uuid4\n"
        "from ucloud.commands.service import CommandService\n"
        "from ucloud.commands.unit_of_work import SYSTEM\n"
        "async def f(service: CommandService) -> None:\n"
        "    await service.place_vm(SYSTEM, vm_id=uuid4(), host_id=uuid4())\n"))
    assert status == 0, report


def test_every_installed_package_is_in_the_checked_tree(typecheck_tree: Path) -> None:
    import tomllib

    mapping = tomllib.loads(CONFIG.read_text())["tool"]["setuptools"]["package-dir"]
    linked = {path.name: path.resolve() for path in typecheck_tree.iterdir()}
    assert linked == {name.removeprefix("ucloud."): (ROOT / folder).resolve() for name, folder in mapping.items()}
