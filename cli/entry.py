"""The `ucloud` command's entry point.

`ucloud gateway` and `ucloud processes` are daemons: they start by importing only their
own module (cli/up.py, cli/run_processes.py), not the rest of the CLI, whose imports cost about half a second
of a daemon's start-up (docs/performance.md, "Start-up over 100,000 VMs"). Every other
command, and anything before the command name (``ucloud --api URL vm list``), goes to the
whole CLI (cli/main.py), which has the same two commands too.
"""

from __future__ import annotations

import sys

DAEMONS = ("gateway", "processes")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in DAEMONS:
        if sys.argv[1] == "gateway":
            from ucloud.cli.up import gateway_command as command
        else:
            from ucloud.cli.run_processes import processes_command as command
        command.main(sys.argv[2:], prog_name=f"ucloud {sys.argv[1]}")
        return
    from ucloud.cli.main import main as whole

    whole()
