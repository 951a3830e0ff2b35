"""ucloud-audit against a real SQLite file and a real etcd, with logs written through the
EventStore API and corrupted underneath it."""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner, Result

from tests.support.audit import CAUSE, CORRELATION, append, event, write_known_log
from tests.support.etcd import EtcdCluster, free_port
from ucloud.cli.audit import main
from ucloud.eventstore.etcd_client import EtcdClient
from ucloud.eventstore.records import (
    RECORD_DECODER,
    RECORD_ENCODER,
    EventRecord,
    NewEvent,
    StreamAppend,
)

AUDIT = Path(sys.executable).parent / "ucloud-audit"


@pytest.fixture(params=["sqlite", "etcd"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty log: a fresh SQLite file, or a fresh key prefix on the session's etcd."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'log.sqlite'}"
    request.applymarker(pytest.mark.etcd)
    cluster: EtcdCluster = request.getfixturevalue("etcd")
    return f"etcd://{','.join(cluster.endpoints)}/audit-{uuid.uuid4().hex[:12]}/v1"


@pytest.fixture
def known(url: str) -> list[EventRecord]:
    return write_known_log(url)


def audit(url: str | None, *args: str, env: dict[str, str] | None = None) -> Result:
    store = ["--store", url] if url is not None else []
    return CliRunner(env=env).invoke(main, [*store, *args], catch_exceptions=False)


def lines(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def positions(url: str, *args: str) -> list[int]:
    return [e["position"] for e in lines(audit(url, *args, "--json"))]


# -- tail ------------------------------------------------------------------------------


def test_tail_prints_a_table_of_the_last_events(url: str, known: list[EventRecord]) -> None:
    result = audit(url, "tail")
    assert result.exit_code == 0, result.output
    rows = result.stdout.splitlines()
    assert rows[0].split()[:4] == ["position", "time", "(UTC)", "stream"]
    body = [row.split() for row in rows[2:]]
    assert [row[0] for row in body] == ["1", "2", "3", "4", "5"]
    assert body[0][3:8] == ["vm-a", "1", "vm.requested", "alice", "owner=alice"]
    assert body[4][3:8] == ["vm-a", "3", "vm.started", "hostagent/h1", "pid=4242"]
    assert " ".join(body[0][1:3]) == known[0].time.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def test_tail_n_counts_from_the_end(url: str, known: list[EventRecord]) -> None:
    assert positions(url, "tail", "-n", "2") == [4, 5]
    assert positions(url, "tail", "-n", "0") == []
    assert positions(url, "tail", "-n", "all") == [1, 2, 3, 4, 5]
    assert positions(url, "tail", "-n", "99") == [1, 2, 3, 4, 5]


def test_tail_filters_by_stream_exactly_or_by_prefix(url: str, known: list[EventRecord]) -> None:
    assert positions(url, "tail", "--stream", "vm-a") == [1, 2, 5]
    assert positions(url, "tail", "--stream", "vm-a", "-n", "2") == [2, 5]
    assert positions(url, "tail", "--stream", "vm-a", "-n", "all") == [1, 2, 5]
    assert positions(url, "tail", "--stream", "vm-*") == [1, 2, 3, 5]
    assert positions(url, "tail", "--stream", "vm-b", "--stream", "net-*") == [3, 4]
    assert positions(url, "tail", "--stream", "vm") == []


def test_tail_filters_by_type_exactly_or_by_prefix(url: str, known: list[EventRecord]) -> None:
    assert positions(url, "tail", "--type", "vm.requested") == [1, 3]
    assert positions(url, "tail", "--type", "vm.*") == [1, 2, 3, 5]
    assert positions(url, "tail", "--type", "vm.placed", "--type", "network.created") == [2, 4]
    assert positions(url, "tail", "--type", "vm.requested", "-n", "1") == [3]


def test_tail_filters_by_actor(url: str, known: list[EventRecord]) -> None:
    assert positions(url, "tail", "--actor", "alice") == [1, 4]
    assert positions(url, "tail", "--actor", "hostagent/*") == [5]
    assert positions(url, "tail", "--actor", "nobody") == []


def test_tail_after_position(url: str, known: list[EventRecord]) -> None:
    assert positions(url, "tail", "--after-position", "3") == [4, 5]
    assert positions(url, "tail", "--after-position", "3", "--stream", "vm-a") == [5]
    assert positions(url, "tail", "--after-position", "5") == []


def test_tail_since_and_until(url: str, known: list[EventRecord]) -> None:
    assert known[2].time < known[3].time  # each event was its own commit, a few ms apart
    assert positions(url, "tail", "--since", known[3].time.isoformat()) == [4, 5]
    assert positions(url, "tail", "--until", known[2].time.isoformat()) == [1, 2, 3]
    assert positions(url, "tail", "--since", known[1].time.isoformat(),
                     "--until", known[3].time.isoformat()) == [2, 3, 4]
    # a naive time is UTC; "Z" is understood
    naive = known[3].time.replace(tzinfo=None).isoformat()
    assert positions(url, "tail", "--since", naive) == [4, 5]
    assert positions(url, "tail", "--since", naive + "Z") == [4, 5]
    # relative: durations ago
    assert positions(url, "tail", "--since", "1h") == [1, 2, 3, 4, 5]
    assert positions(url, "tail", "--until", "1h") == []
    assert positions(url, "tail", "--since", "1d", "--until", "now") == [1, 2, 3, 4, 5]


def test_tail_filters_combine(url: str, known: list[EventRecord]) -> None:
    assert positions(url, "tail", "--stream", "vm-*", "--type", "vm.requested", "--actor", "bob") == [3]
    assert positions(url, "tail", "--stream", "vm-a", "--type", "vm.*", "--after-position", "1",
                     "--since", known[0].time.isoformat()) == [2, 5]


def test_tail_reads_a_log_longer_than_one_page(url: str) -> None:
    """1224 events: the last N and 'all' cross the 1000-event page boundary."""
    for k in range(24):  # 50 + 1 events per commit: within etcd's default 128 operations
        append(url, StreamAppend(f"vm-{k}", 0, [event("vm.ping", "x", n=n) for n in range(50)]),
               StreamAppend("net-z", k, [event("net.tick", "x")]))
    assert positions(url, "tail", "-n", "all") == list(range(1, 1225))
    last = positions(url, "tail", "-n", "1100", "--type", "vm.ping")
    assert len(last) == 1100 and last == sorted(last) and last[-1] == 1223
    assert positions(url, "tail", "--stream", "net-z", "-n", "all") == [51 * k for k in range(1, 25)]
    assert positions(url, "tail", "--stream", "net-z", "-n", "2") == [1173, 1224]


def test_tail_says_so_when_nothing_matches(url: str, known: list[EventRecord]) -> None:
    result = audit(url, "tail", "--stream", "nothing-here")
    assert result.exit_code == 0
    assert "no matching events (head is at position 5)" in result.stderr


def test_json_lines_carry_the_full_envelope(url: str, known: list[EventRecord]) -> None:
    append(url, StreamAppend("blob-1", 0, [NewEvent(type="blob.stored", data=b"\x00\xffnot json")]))
    by_position = {e["position"]: e for e in lines(audit(url, "tail", "-n", "all", "--json"))}
    placed = by_position[2]
    assert placed == {
        "position": 2,
        "id": str(known[1].id),
        "type": "vm.placed",
        "stream": "vm-a",
        "version": 2,
        "time": known[1].time.isoformat(),
        "actor": "scheduler",
        "causation_id": str(CAUSE),
        "correlation_id": str(CORRELATION),
        "schema": 2,
        "data_encoding": "json",
        "data": {"host": "h1"},
    }
    assert by_position[1]["causation_id"] is None and by_position[1]["schema"] == 1
    assert by_position[6]["data_encoding"] == "base64"
    assert by_position[6]["data"] == "AP9ub3QganNvbg=="  # base64 of b"\x00\xffnot json"


# -- show and at -------------------------------------------------------------------------


def test_show_prints_one_streams_history_in_version_order(url: str, known: list[EventRecord]) -> None:
    history = lines(audit(url, "show", "vm-a", "--json"))
    assert [(e["version"], e["position"], e["type"]) for e in history] == [
        (1, 1, "vm.requested"), (2, 2, "vm.placed"), (3, 5, "vm.started")]
    table = audit(url, "show", "net-1")
    assert table.exit_code == 0
    assert "prefix=2001:db8::/64" in table.stdout and "vm-a" not in table.stdout


def test_show_at_a_position_and_at_with_a_stream(url: str, known: list[EventRecord]) -> None:
    assert [e["version"] for e in lines(audit(url, "show", "vm-a", "--at", "4", "--json"))] == [1, 2]
    assert [e["version"] for e in lines(audit(url, "show", "vm-a", "--at", "5", "--json"))] == [1, 2, 3]
    assert [e["version"] for e in lines(audit(url, "at", "1", "vm-a", "--json"))] == [1]
    assert [e["position"] for e in lines(audit(url, "at", "4", "vm-a", "--json"))] == [1, 2]


def test_at_without_a_stream_shows_every_streams_last_event(url: str, known: list[EventRecord]) -> None:
    state = lines(audit(url, "at", "4", "--json"))
    assert [(e["stream"], e["version"], e["position"]) for e in state] == [
        ("net-1", 1, 4), ("vm-a", 2, 2), ("vm-b", 1, 3)]
    vms = lines(audit(url, "at", "5", "--stream", "vm-*", "--json"))
    assert [(e["stream"], e["version"]) for e in vms] == [("vm-a", 3), ("vm-b", 1)]
    early = lines(audit(url, "at", "2", "--json"))
    assert [(e["stream"], e["version"]) for e in early] == [("vm-a", 2)]


def test_show_and_at_refuse_what_does_not_exist(url: str, known: list[EventRecord]) -> None:
    missing = audit(url, "show", "vm-zzz")
    assert missing.exit_code == 1 and "stream 'vm-zzz' has no events" in missing.stderr
    early = audit(url, "show", "vm-b", "--at", "2")
    assert early.exit_code == 1
    assert "stream 'vm-b' had no events yet at position 2 (its first event is at position 3)" in early.stderr
    beyond = audit(url, "show", "vm-a", "--at", "6")
    assert beyond.exit_code == 2 and "position 6 is beyond the head of the log (position 5)" in beyond.stderr
    assert audit(url, "at", "9").exit_code == 2
    pattern = audit(url, "show", "vm-*")
    assert pattern.exit_code == 2 and "not a pattern" in pattern.stderr
    both = audit(url, "at", "3", "vm-a", "--stream", "vm-*")
    assert both.exit_code == 2 and "not both" in both.stderr


# -- verify ------------------------------------------------------------------------------


def test_verify_passes_on_a_good_log(url: str, known: list[EventRecord]) -> None:
    result = audit(url, "verify")
    assert result.exit_code == 0, result.output
    assert "checked positions 1..5: 5 events in 3 streams" in result.stdout
    assert "OK: the log is consistent" in result.stdout


def test_verify_passes_on_an_empty_log(url: str) -> None:
    assert asyncio.run(_read_all(url)) == []  # opening it creates the (empty) SQLite file
    result = audit(url, "verify")
    assert result.exit_code == 0, result.output
    assert "checked positions 1..0: 0 events in 0 streams" in result.stdout


def test_verify_passes_across_pages(url: str) -> None:
    for start in range(0, 1500, 60):
        append(url, StreamAppend("vm-long", start, [event("vm.ping", "x", n=n) for n in range(start, start + 60)]))
    result = audit(url, "verify")
    assert result.exit_code == 0, result.output
    assert "1500 events in 1 streams" in result.stdout


def test_verify_fails_on_data_that_is_not_json(url: str, known: list[EventRecord]) -> None:
    append(url, StreamAppend("vm-b", 1, [NewEvent(type="vm.noted", data=b"{oops")]))
    result = audit(url, "verify")
    assert result.exit_code == 1
    assert "FAILED: 1 problem:" in result.stdout
    assert "position 6 (vm.noted in 'vm-b'): data is not valid JSON" in result.stdout


# SQLite: corrupt rows directly with sqlite3.

def sqlite_path(url: str) -> str:
    return url.removeprefix("sqlite://")


def rewrite(url: str, row: int, **changes: Any) -> None:
    """Re-encode the record in the row at position ``row`` with some fields changed."""
    with sqlite3.connect(sqlite_path(url)) as conn:
        (blob,) = conn.execute("SELECT record FROM events WHERE position = ?", (row,)).fetchone()
        record = msgspec.structs.replace(RECORD_DECODER.decode(blob), **changes)
        conn.execute("UPDATE events SET record = ? WHERE position = ?", (RECORD_ENCODER.encode(record), row))
    conn.close()


def sql(url: str, statement: str, *args: Any) -> None:
    with sqlite3.connect(sqlite_path(url)) as conn:
        conn.execute(statement, args)
    conn.close()


def sqlite_known(tmp_path: Path) -> str:
    url = f"sqlite://{tmp_path / 'log.sqlite'}"
    write_known_log(url)
    return url


def failed(url: str) -> list[str]:
    result = audit(url, "verify")
    assert result.exit_code == 1, result.output
    problems = [line.removeprefix("  - ") for line in result.stdout.splitlines() if line.startswith("  - ")]
    assert f"FAILED: {len(problems)} problem" in result.stdout
    return problems


def test_verify_finds_a_gap_in_positions_sqlite(tmp_path: Path) -> None:
    url = sqlite_known(tmp_path)
    sql(url, "DELETE FROM events WHERE position = 3")  # vm-b's only event
    assert failed(url) == ["position 3 missing: the log has a gap before position 4"]


def test_verify_finds_a_record_that_claims_a_later_position_sqlite(tmp_path: Path) -> None:
    url = sqlite_known(tmp_path)
    rewrite(url, 5, position=7)  # the row at 5 claims position 7: 5 and 6 are missing
    assert failed(url) == ["positions 5..6 missing: the log has a gap before position 7"]


def test_verify_finds_a_version_that_skips_sqlite(tmp_path: Path) -> None:
    url = sqlite_known(tmp_path)
    rewrite(url, 5, version=4)
    assert failed(url) == ["stream 'vm-a': version 4 at position 5 follows version 2 (expected 3)"]


def test_verify_finds_a_stream_not_starting_at_version_1_sqlite(tmp_path: Path) -> None:
    url = sqlite_known(tmp_path)
    rewrite(url, 3, version=2)
    assert failed(url) == ["stream 'vm-b': version 2 at position 3 follows version 0 (expected 1)"]


def test_verify_finds_an_undecodable_record_sqlite(tmp_path: Path) -> None:
    url = sqlite_known(tmp_path)
    sql(url, "UPDATE events SET record = ? WHERE position = 4", b"\xc1garbage")
    problems = failed(url)
    assert len(problems) == 1
    assert problems[0].startswith("position 4: the record does not decode (")


def test_verify_finds_a_repeated_event_id_sqlite(tmp_path: Path) -> None:
    url = sqlite_known(tmp_path)
    records = asyncio.run(_read_all(url))
    rewrite(url, 4, id=records[0].id)
    assert failed(url) == [f"event id {records[0].id} is not unique: it appears at positions 1, 4"]


def test_verify_lists_every_problem_at_once_sqlite(tmp_path: Path) -> None:
    url = sqlite_known(tmp_path)
    append(url, StreamAppend("vm-b", 1, [event("vm.noted", "x")]))  # position 6
    sql(url, "UPDATE events SET record = ? WHERE position = 2", b"not msgpack at all")
    sql(url, "DELETE FROM events WHERE position = 4")
    rewrite(url, 6, version=3, data=b"<xml/>")
    problems = failed(url)
    assert problems[0].startswith("position 2: the record does not decode (")
    assert problems[1:] == [
        "position 4 missing: the log has a gap before position 5",
        # vm-a's version 2 was at position 2, which did not decode
        "stream 'vm-a': version 3 at position 5 follows version 1 (expected 2)",
        "stream 'vm-b': version 3 at position 6 follows version 1 (expected 2)",
        "position 6 (vm.noted in 'vm-b'): data is not valid JSON (JSON is malformed: invalid character (byte 0))",
    ]


def test_tail_on_a_corrupt_log_points_to_verify_sqlite(tmp_path: Path) -> None:
    url = sqlite_known(tmp_path)
    sql(url, "UPDATE events SET record = ? WHERE position = 4", b"\xc1")
    result = audit(url, "tail")
    assert result.exit_code == 3
    assert "does not decode" in result.stderr and "run 'ucloud-audit verify'" in result.stderr


async def _read_all(url: str) -> list[EventRecord]:
    from ucloud.eventstore.url import open_store

    async with open_store(url) as store:
        return await store.read_all()


# etcd: put garbage under the log's keys with EtcdClient.

def etcd_known(cluster: EtcdCluster) -> tuple[str, bytes]:
    prefix = f"/audit-{uuid.uuid4().hex[:12]}/v1"
    url = f"etcd://{','.join(cluster.endpoints)}{prefix}"
    write_known_log(url)
    return url, prefix.encode()


async def _etcd(cluster: EtcdCluster, *, put: dict[bytes, bytes] | None = None, delete: list[bytes] | None = None) -> None:
    client = EtcdClient(cluster.endpoints)
    try:
        for key, value in (put or {}).items():
            await client.put(key, value)
        for key in delete or []:
            assert await client.delete(key) == 1
    finally:
        await client.close()


def event_key(prefix: bytes, position: int) -> bytes:
    return prefix + b"/events/" + b"%020d" % position


@pytest.mark.etcd
def test_verify_finds_a_garbage_record_etcd(etcd: EtcdCluster) -> None:
    url, prefix = etcd_known(etcd)
    asyncio.run(_etcd(etcd, put={event_key(prefix, 2): b"\xc1 garbage"}))
    problems = failed(url)
    assert problems[0].startswith("position 2: the record does not decode (")
    assert problems[1:] == ["stream 'vm-a': version 3 at position 5 follows version 1 (expected 2)"]


@pytest.mark.etcd
def test_verify_finds_a_gap_and_a_record_beyond_the_head_etcd(etcd: EtcdCluster) -> None:
    url, prefix = etcd_known(etcd)
    records = asyncio.run(_read_all(url))
    stray = msgspec.structs.replace(records[0], position=9, stream="vm-stray", id=uuid.uuid4())
    asyncio.run(_etcd(etcd, delete=[event_key(prefix, 3)],
                      put={event_key(prefix, 9): RECORD_ENCODER.encode(stray)}))
    assert failed(url) == [
        "position 3 missing: the log has a gap before position 4",
        "position 9 lies beyond the head (position 5)",
    ]


@pytest.mark.etcd
def test_verify_finds_missing_events_before_the_head_etcd(etcd: EtcdCluster) -> None:
    url, prefix = etcd_known(etcd)
    asyncio.run(_etcd(etcd, put={prefix + b"/head": b"%020d" % 7}))
    assert failed(url) == ["positions 6..7 missing: the log ends before its head (position 7)"]


# -- follow ------------------------------------------------------------------------------


def _reader(stream: Any, into: queue.Queue[str]) -> None:
    for line in stream:
        into.put(line)


def test_follow_prints_events_appended_after_it_started(url: str, known: list[EventRecord]) -> None:
    process = subprocess.Popen(
        [str(AUDIT), "--store", url, "tail", "-f", "-n", "1", "--json", "--stream", "vm-*"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    out: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(process.stdout, out), daemon=True).start()
    try:
        first = json.loads(out.get(timeout=60))
        assert (first["position"], first["stream"]) == (5, "vm-a")
        # It has printed, so it has read the head: whatever comes now must come by following.
        append(url, StreamAppend("net-2", 0, [event("network.created", "alice")]))  # filtered out
        append(url, StreamAppend("vm-c", 0, [event("vm.requested", "carol", owner="carol")]))
        followed = json.loads(out.get(timeout=60))
        assert (followed["position"], followed["stream"], followed["data"]) == (7, "vm-c", {"owner": "carol"})
        append(url, StreamAppend("vm-c", 1, [event("vm.placed", "scheduler")]))
        assert json.loads(out.get(timeout=60))["position"] == 8
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        assert process.stderr is not None
        stderr = process.stderr.read()
        assert "following the log after position 5" in stderr
        assert "Traceback" not in stderr
        assert out.empty()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_follow_refuses_until(url: str, known: list[EventRecord]) -> None:
    result = audit(url, "tail", "-f", "--until", "1h")
    assert result.exit_code == 2 and "--until cannot be combined with --follow" in result.stderr


# -- the store option and bad input ------------------------------------------------------


def test_store_comes_from_the_environment(url: str, known: list[EventRecord]) -> None:
    result = audit(None, "tail", "-n", "1", "--json", env={"UCLOUD_STORE": url})
    assert [e["position"] for e in lines(result)] == [5]


def test_store_bare_path_is_sqlite(tmp_path: Path) -> None:
    url = sqlite_known(tmp_path)
    assert positions(sqlite_path(url), "tail", "-n", "1") == [5]


def test_missing_store_is_a_usage_error() -> None:
    result = audit(None, "tail", env={"UCLOUD_STORE": ""})
    assert result.exit_code == 2 and "give --store or set UCLOUD_STORE" in result.stderr


def test_bad_store_url_names_what_is_wrong() -> None:
    result = audit("etcd://127.0.0.1", "tail")
    assert result.exit_code == 2 and "etcd endpoint '127.0.0.1' has no port" in result.stderr
    memory = audit("memory://", "verify")
    assert memory.exit_code == 2 and "nothing to audit" in memory.stderr


def test_missing_sqlite_file_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "typo.sqlite"
    result = audit(f"sqlite://{path}", "verify")
    assert result.exit_code == 2 and f"no SQLite log at {path}" in result.stderr
    assert not path.exists()


def test_a_file_that_is_no_log_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a database\n" * 100)
    result = audit(str(text), "tail")
    assert result.exit_code == 2 and "is not a SQLite log" in result.stderr
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    result = audit(str(other), "tail")
    assert result.exit_code == 2 and "not a ucloud log (it has no events table)" in result.stderr


def test_unreachable_etcd_exits_3() -> None:
    port = free_port()
    result = audit(f"etcd://127.0.0.1:{port}", "tail")
    assert result.exit_code == 3
    assert f"cannot read the log at etcd://127.0.0.1:{port}/v1" in result.stderr


def test_bad_filters_are_usage_errors(tmp_path: Path) -> None:
    url = sqlite_known(tmp_path)
    cases = {
        ("tail", "--stream", "vm*x"): "'*' may only stand at the end",
        ("tail", "--type", ""): "an empty type pattern matches nothing",
        ("tail", "--since", "10x"): "'10x' is not a time",
        ("tail", "--since", "1h", "--until", "2h"): "is after --until",
        ("tail", "-n", "-3"): "'-3' is not a number of events",
        ("tail", "--after-position", "-1"): "--after-position",
        ("at", "0"): "0 is not in the range x>=1",
    }
    for args, message in cases.items():
        result = audit(url, *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)


def test_ctrl_c_outside_follow_exits_130(tmp_path: Path) -> None:
    """An interrupted verify must not look like a passed one. The 'etcd' here accepts
    connections and never answers, so the tool is surely inside its read when interrupted."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(60)
        port = server.getsockname()[1]
        process = subprocess.Popen([str(AUDIT), "--store", f"etcd://127.0.0.1:{port}", "verify"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            connection, _ = server.accept()
            with connection:
                process.send_signal(signal.SIGINT)
                stdout, stderr = process.communicate(timeout=60)
            assert process.returncode == 130, stderr
            assert "OK" not in stdout and "Traceback" not in stderr
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    url = sqlite_known(tmp_path)
    for k in range(20):
        append(url, StreamAppend(f"vm-{k}", 0, [event("vm.ping", "x", n=n, pad="x" * 200) for n in range(50)]))
    process = subprocess.Popen([str(AUDIT), "--store", url, "tail", "-n", "all", "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stderr is not None
        assert json.loads(process.stdout.readline())["position"] == 1
        process.stdout.close()  # like `| head -1`: ~250 kB more output than a pipe holds
        assert process.wait(timeout=60) == 0
        assert b"Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
