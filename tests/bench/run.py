"""Run the benchmarks in tests/bench/: all of them, or those whose name matches.

    .venv/bin/python -m tests.bench.run                       # every benchmark
    .venv/bin/python -m tests.bench.run --list                # their names
    .venv/bin/python -m tests.bench.run scheduler control     # names containing either word
    .venv/bin/python -m tests.bench.run --quick               # smoke test: small sizes where a
                                                              # benchmark has --quick (not for figures)
    .venv/bin/python -m tests.bench.run scheduler -- --backend etcd --schedulers 1
                                                              # after --: arguments for each one run

Every module of tests/bench/ but this one and the helpers (HELPERS) is a benchmark, named after its file without
the ``bench_`` prefix, and runs as ``python -m tests.bench.<module>`` in a process of its
own (each starts and stops its own etcd, `ucloud up` or QEMU). First the machine is
printed (CPU count, memory, CPU model, kernel, Python, load average, commit), then each
benchmark's exact command and its output. The exit status is 1 if any failed.
Figures and the machines they came from: docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HELPERS = {"fake_hypervisor"}  # modules a benchmark starts, not benchmarks themselves
ROOT = HERE.parents[1]


def benchmarks() -> dict[str, str]:
    """name -> module file stem, for every benchmark in tests/bench/."""
    stems = sorted(p.stem for p in HERE.glob("*.py") if p.stem not in {"run", "__init__", *HELPERS})
    return {stem.removeprefix("bench_"): stem for stem in stems}


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory() -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    return "unknown"


def _commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"machine: nproc {len(os.sched_getaffinity(0))}, memory {_memory()}, CPU {_cpu_model()!r}, "
            f"Linux {platform.release()}, Python {platform.python_version()}; load average {load}; "
            f"commit {_commit()}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    known = benchmarks()
    parser = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"run the benchmarks whose name contains NAME "
                                                                 f"(of: {', '.join(known)})")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--quick", action="store_true", help="pass --quick to the benchmarks that have it")
    args = parser.parse_args(argv)
    if args.list:
        for name, stem in known.items():
            doc = (HERE / f"{stem}.py").read_text().split('"""')[1].strip().splitlines()[0]
            print(f"{name:<16} {doc}")
        return 0
    chosen = {n: s for n, s in known.items() if not args.names or any(word in n for word in args.names)}
    if not chosen:
        parser.error(f"no benchmark matches {' '.join(args.names)!r}; there are: {', '.join(known)}")
    print(machine(), flush=True)
    failed = []
    for name, stem in chosen.items():
        command = [sys.executable, "-m", f"tests.bench.{stem}", *extra]
        if args.quick and "--quick" in (HERE / f"{stem}.py").read_text():
            command.append("--quick")
        shown = " ".join([".venv/bin/python" if c == sys.executable else c for c in command])
        print(f"\n== {name}: {shown}", flush=True)
        began = time.monotonic()
        status = subprocess.run(command, cwd=ROOT).returncode
        print(f"== {name}: {'ok' if status == 0 else f'FAILED (exit {status})'} in {time.monotonic() - began:.0f}s",
              flush=True)
        if status != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
