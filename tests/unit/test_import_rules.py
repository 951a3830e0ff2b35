"""The dependency arrows of docs/architecture.md, checked on the source.

Every import statement of a package (at module level or inside a function) is read
with ``ast``; relative imports are resolved against the package they are in. A new
import that points the wrong way fails here, naming the file, the line and the module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# folder -> installed package; the folders pyproject.toml maps onto ucloud.*
PACKAGES = ("domain", "commands", "projections", "processes", "hostagent", "gateway", "eventstore",
            "cli", "auth", "imagestore")


def imports_of(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, a module of ``ucloud.<package>``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .x import y / from ..x import y
                base = ["ucloud", package][: max(0, 3 - node.level)]
                module = ".".join([*base, node.module] if node.module else base)
                if node.module is None:
                    found.extend((node.lineno, f"{module}.{alias.name}") for alias in node.names)
                    continue
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


def offending(package: str, allowed: set[str], skip: frozenset[str] = frozenset()) -> list[str]:
    """Imports of ``ucloud.*`` packages outside ``allowed`` in the folder ``package``."""
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if path.name in skip:
            continue
        for line, module in imports_of(path, package):
            parts = module.split(".")
            if parts[0] == "ucloud" and len(parts) > 1 and parts[1] not in allowed:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return wrong


def test_the_checker_sees_absolute_relative_and_nested_imports(tmp_path: Path) -> None:
    # A checker that finds nothing proves nothing: feed it each form it must catch.
    source = tmp_path / "m.py"
    source.write_text("import ucloud.gateway.app\n"
                      "from ucloud.gateway import identity\n"
                      "from .. import gateway\n"
                      "def f():\n    from ..gateway.keys import ACTOR\n")
    modules = [module for _, module in imports_of(source, "cli")]
    assert modules == ["ucloud.gateway.app", "ucloud.gateway", "ucloud.gateway", "ucloud.gateway.keys"]


def test_domain_imports_nothing_of_ours() -> None:
    assert offending("domain", {"domain"}) == []


def test_the_cli_imports_nothing_of_the_gateway() -> None:
    # `ucloud up` runs the gateway in-process, so cli/up.py alone may start it; every
    # other command talks HTTP (cli/client.py) and uses ucloud.auth for credentials.
    assert offending("cli", set(PACKAGES) - {"gateway"}, skip=frozenset({"up.py"})) == []


def test_up_imports_only_the_gateways_entry_point() -> None:
    modules = {module for _, module in imports_of(ROOT / "cli" / "up.py", "cli")}
    assert {m for m in modules if m.startswith("ucloud.gateway")} == {"ucloud.gateway.app", "ucloud.gateway.metadata"}


@pytest.mark.parametrize("package, allowed", [
    ("auth", {"auth", "domain", "commands", "eventstore"}),
    ("eventstore", {"eventstore"}),
    ("imagestore", {"imagestore"}),
    ("commands", {"commands", "domain", "eventstore"}),
    ("projections", {"projections", "domain", "eventstore"}),
])
def test_arrows_point_one_way(package: str, allowed: set[str]) -> None:
    assert offending(package, allowed) == []
