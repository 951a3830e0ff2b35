"""The CLI prints data verbatim: rich's emoji codes and markup never apply to it (a MAC
with ":ab:" in it came out as an emoji in `ucloud vm show`)."""

from __future__ import annotations

import io

from ucloud.cli import main as cli


def test_tables_and_lines_print_macs_and_brackets_as_they_are() -> None:
    out = io.StringIO()
    console = cli.console()
    console.file = out
    rows = cli.table("network", "mac")
    rows.add_row("l2", "9a:ab:06:7f:8a:ab")
    rows.add_row("[bold]x[/bold]", "02:cd:00:00:00:01")
    console.print(rows)
    console.print("owner :smile: [red]alice[/red]")
    text = out.getvalue()
    for verbatim in ("9a:ab:06:7f:8a:ab", "[bold]x[/bold]", "02:cd:00:00:00:01", ":smile:", "[red]alice[/red]"):
        assert verbatim in text
