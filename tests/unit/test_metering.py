"""Metering: random lifecycles and price changes against a per-second reference model;
the totals never depend on how the log is batched, snapshotted or folded again."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from ucloud.domain import image as image_domain
from ucloud.domain import network as network_domain
from ucloud.domain import vm as vm_domain
from ucloud.domain.catalogue import build_codec
from ucloud.domain.events import Event
from ucloud.domain.invoice import PeriodClosed
from ucloud.domain.metering import (
    MINIMUM_RUN,
    Meter,
    MeterSnapshot,
    PeriodPolicy,
    line_amount,
    totals,
)
from ucloud.domain.pricing import GIB, PriceSet, Resource

HOST = uuid.UUID(int=1)
T0 = 1_800_000_000  # a whole hour: 1,800,000,000 s is 2027-01-15T08:00:00Z


def at(t: int) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def price(resource: Resource, micros: int, t: int, per: str = "second", per_seconds: int = 1) -> PriceSet:
    return PriceSet(resource=resource, micros=micros, currency="CHF", per=per, per_seconds=per_seconds,
                    effective_from=at(t))


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[tuple[int, Event]], int]:
    """A time-ordered log: prices (set before they apply), VMs created, started, stopped,
    crashed, deleted, in random interleavings; returns (events with times, end time)."""
    t = T0
    log: list[tuple[int, Event]] = []
    vms: dict[UUID, str] = {}  # vm -> "stopped" | "running"
    for _ in range(draw(st.integers(1, 40))):
        t += draw(st.integers(0, 200))
        action = draw(st.sampled_from(["price", "create", "start", "stop", "crash", "delete"]))
        alive = sorted(vms)
        if action == "price":
            resource = draw(st.sampled_from([Resource.CORE, Resource.RAM, Resource.DISK]))
            log.append((t, price(resource, draw(st.integers(0, 5000)), t + draw(st.integers(0, 300)),
                                 *draw(st.sampled_from([("second", 1), ("minute", 60), ("hour", 3600)])))))
        elif action == "create" or not alive:
            vm_id = uuid.UUID(int=len(log) + 100)
            vms[vm_id] = "stopped"
            log.append((t, vm_domain.VmRequested(
                vm_id=vm_id, owner=draw(st.sampled_from(["alice", "bob"])), name=f"vm{len(vms)}",
                cores=draw(st.integers(1, 8)), ram=draw(st.integers(1, 8)) * GIB // 2,
                disk=draw(st.integers(1, 40)) * GIB, image="debian-12")))
        else:
            vm_id = draw(st.sampled_from(alive))
            if action == "start" and vms[vm_id] == "stopped":
                vms[vm_id] = "running"
                log.append((t, vm_domain.VmStarted(vm_id=vm_id, host_id=HOST)))
            elif action in ("stop", "crash") and vms[vm_id] == "running":
                vms[vm_id] = "stopped"
                log.append((t, vm_domain.VmStopped(vm_id=vm_id, host_id=HOST) if action == "stop"
                            else vm_domain.VmCrashed(vm_id=vm_id, host_id=HOST, reason="boom")))
            elif action == "delete":
                del vms[vm_id]
                log.append((t, vm_domain.VmDeleted(vm_id=vm_id, host_id=HOST)))
    return log, t + draw(st.integers(0, 100))


def finish(log: list[tuple[int, Event]], end: int) -> list[tuple[int, Event]]:
    """Delete every VM still there at ``end``."""
    alive: list[UUID] = []
    for _, event in log:
        if isinstance(event, vm_domain.VmRequested):
            alive.append(event.vm_id)
        elif isinstance(event, vm_domain.VmDeleted):
            alive.remove(event.vm_id)
    return [(end, vm_domain.VmDeleted(vm_id=vm_id, host_id=HOST)) for vm_id in alive]


def reference(log: list[tuple[int, Event]]) -> dict[tuple[UUID, str, int], int]:
    """Quantity-seconds per (vm, resource, price version), counted second by second."""
    prices: list[tuple[int, int, str]] = []  # (effective_from, version, resource)
    # (vm, resource, quantity, start, end, prices recorded before the run was metered)
    runs: list[tuple[UUID, str, int, int, int, int]] = []
    vms: dict[UUID, vm_domain.VmRequested] = {}
    running: dict[UUID, int] = {}
    created: dict[UUID, int] = {}
    for t, event in log:
        match event:
            case PriceSet():
                prices.append((int(event.effective_from.timestamp()), len(prices) + 1, event.resource))
            case vm_domain.VmRequested():
                vms[event.vm_id], created[event.vm_id] = event, t
            case vm_domain.VmStarted():
                running[event.vm_id] = t
            case vm_domain.VmStopped() | vm_domain.VmCrashed() | vm_domain.VmDeleted():
                if event.vm_id in running:
                    start = running.pop(event.vm_id)
                    vm = vms[event.vm_id]
                    end = max(t, start + MINIMUM_RUN)
                    runs += [(vm.vm_id, "core", vm.cores, start, end, len(prices)),
                             (vm.vm_id, "ram", vm.ram, start, end, len(prices))]
                if isinstance(event, vm_domain.VmDeleted):
                    runs.append((event.vm_id, "disk", vms[event.vm_id].disk, created[event.vm_id], t, len(prices)))
    # The version in force at each second, per resource, given the prices known so far.
    span = max((run[4] for run in runs), default=T0) - T0
    tables: dict[int, dict[str, list[int]]] = {}
    for known in {run[5] for run in runs}:
        version_at = tables[known] = {r: [0] * span for r in ("core", "ram", "disk")}
        for effective_from, version, resource in sorted(prices[:known]):
            column = version_at[resource]
            for second in range(max(0, effective_from - T0), span):
                column[second] = version  # sorted by (time, version): the later one wins
    expected: dict[tuple[UUID, str, int], int] = {}
    for vm_id, resource, quantity, start, end, known in runs:
        column = tables[known][resource]
        for second in range(start - T0, end - T0):
            version = column[second]
            if version:
                key = (vm_id, resource, version)
                expected[key] = expected.get(key, 0) + quantity
    return expected


def fold(log: list[tuple[int, Event]], periods: PeriodPolicy | None = None) -> Meter:
    meter = Meter(periods or PeriodPolicy(seconds=10**9))
    for t, event in log:
        meter.apply(event, t)
    return meter


def by_line(meter: Meter) -> dict[tuple[UUID, str, int], int]:
    result: dict[tuple[UUID, str, int], int] = {}
    for (_, _, vm, resource, version), q in totals(meter).items():
        result[(vm, resource, version)] = result.get((vm, resource, version), 0) + q
    return result


@settings(max_examples=150, deadline=None)
@given(histories())
def test_metered_quantity_seconds_equal_the_per_second_reference(history: tuple[list[tuple[int, Event]], int]) -> None:
    log, _ = history
    assert by_line(fold(log)) == reference(log)


@settings(max_examples=150, deadline=None)
@given(histories(), st.lists(st.integers(0, 50), max_size=6))
def test_folding_in_batches_with_snapshots_between_gives_identical_usage(
        history: tuple[list[tuple[int, Event]], int], cuts: list[int]) -> None:
    log, _ = history
    whole = fold(log, PeriodPolicy(seconds=3600))
    meter = Meter(PeriodPolicy(seconds=3600))
    previous = 0
    for cut in sorted({min(c, len(log)) for c in cuts}) + [len(log)]:
        for t, event in log[previous:cut]:
            meter.apply(event, t)
        previous = cut
        # A snapshot through bytes, as a process restart would read it.
        meter = Meter.load(msgspec.json.decode(msgspec.json.encode(meter.dump()), type=MeterSnapshot))
    assert totals(meter) == totals(whole)
    assert meter.vms == whole.vms


@settings(max_examples=150, deadline=None)
@given(histories(), st.lists(st.integers(0, 60), max_size=4))
def test_closing_periods_moves_seconds_between_periods_but_never_changes_them(
        history: tuple[list[tuple[int, Event]], int], closes: list[int]) -> None:
    """Period ends cut runs and disks; a run cut by a close still gets its 60 s minimum;
    across all periods the quantity-seconds are those of a log without closes."""
    log, end = history
    log = log + finish(log, end)  # every run ends, so no usage is left open in either fold
    policy = PeriodPolicy(seconds=600)
    with_closes: list[tuple[int, Event]] = []
    closed_until = 0
    marks = sorted({min(c, len(log)) for c in closes})
    for index, (t, event) in enumerate(log):
        if index in marks:
            start, period_end = policy.bounds(t)
            if start > closed_until:  # close the period before the one ``t`` is in
                previous_start = policy.bounds(start - 1)[0]
                with_closes.append((t, PeriodClosed(period_start=at(previous_start), period_end=at(start))))
                closed_until = start
        with_closes.append((t, event))
    assert by_line(fold(with_closes, policy)) == by_line(fold(log, policy))
    # and every second lies in the period it belongs to: usage of a closed period is final
    meter = fold(with_closes, policy)
    for (_, period_start, _, _, _), q in totals(meter).items():
        assert period_start % 600 == 0 and q > 0


def test_a_short_run_costs_sixty_seconds_and_a_price_change_splits_the_line() -> None:
    vm_id = uuid.UUID(int=7)
    log: list[tuple[int, Event]] = [
        (T0, price(Resource.CORE, 10, T0)),  # 10 micros per core-second
        (T0, vm_domain.VmRequested(vm_id=vm_id, owner="alice", name="web", cores=2, ram=GIB, disk=GIB,
                                   image="debian-12")),
        (T0 + 10, vm_domain.VmStarted(vm_id=vm_id, host_id=HOST)),
        (T0 + 20, vm_domain.VmStopped(vm_id=vm_id, host_id=HOST)),  # 10 s run: billed 60 s
        (T0 + 30, price(Resource.CORE, 20, T0 + 100)),
        (T0 + 50, vm_domain.VmStarted(vm_id=vm_id, host_id=HOST)),
        (T0 + 250, vm_domain.VmStopped(vm_id=vm_id, host_id=HOST)),  # 50 s old price, 150 s new
    ]
    meter = fold(log)
    period = meter.periods.bounds(T0)[0]
    lines = {(line.resource, line.price_version): line for line in meter.lines("alice", period)}
    assert lines[("core", 1)].quantity_seconds == 2 * (60 + 50)
    assert lines[("core", 1)].amount == 2 * (60 + 50) * 10
    assert lines[("core", 2)].quantity_seconds == 2 * 150
    assert lines[("core", 2)].amount == 2 * 150 * 20
    assert set(lines) == {("core", 1), ("core", 2)}  # RAM and disk are unpriced: free


def test_usage_so_far_counts_what_runs_now_without_changing_the_fold() -> None:
    vm_id = uuid.UUID(int=8)
    meter = fold([
        (T0, price(Resource.RAM, 3600, T0, "hour", 3600)),  # 0.0036 CHF per GiB-hour
        (T0, vm_domain.VmRequested(vm_id=vm_id, owner="bob", name="db", cores=1, ram=2 * GIB, disk=GIB,
                                   image="debian-12")),
        (T0 + 5, vm_domain.VmStarted(vm_id=vm_id, host_id=HOST)),
    ])
    before = totals(meter)
    period = meter.periods.bounds(T0)[0]
    [line] = meter.lines("bob", period, now=T0 + 5 + 1800)
    assert line.quantity_seconds == 2 * GIB * 1800
    assert line.amount == line_amount(meter.schedule.price(1), 2 * GIB * 1800) == 3600
    assert totals(meter) == before
    [line] = meter.lines("bob", period, now=T0 + 6)  # within the first minute: the minimum
    assert line.quantity_seconds == 2 * GIB * 60


def test_monthly_periods_are_calendar_months_in_utc() -> None:
    policy = PeriodPolicy.parse("month")
    start, end = policy.bounds(int(datetime(2027, 2, 14, tzinfo=UTC).timestamp()))
    assert (at(start), at(end)) == (datetime(2027, 2, 1, tzinfo=UTC), datetime(2027, 3, 1, tzinfo=UTC))
    start, end = policy.bounds(int(datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()))
    assert at(end) == datetime(2027, 1, 1, tzinfo=UTC)
    assert PeriodPolicy.parse("1d").bounds(86400 * 3 + 5) == (86400 * 3, 86400 * 4)


def fold_file(path: str) -> str:
    """Fold a log written by ``_write_log`` and answer its totals as canonical JSON."""
    codec = build_codec()
    meter = Meter(PeriodPolicy(seconds=3600))
    for t, tag, data in msgspec.json.decode(Path(path).read_bytes(), type=list[tuple[int, str, bytes]]):
        meter.apply(codec.decode(tag, 1, data), t)
    return msgspec.json.encode(sorted([list(map(str, k)), q] for k, q in totals(meter).items())).decode()


def test_folding_in_another_process_gives_identical_usage(tmp_path: Path) -> None:
    from tests.bench.bench_billing import lifecycle

    codec = build_codec()
    log = [(t, *codec.encode(event)[::2]) for _, event, t in lifecycle(20_000, 50)]
    path = tmp_path / "log.json"
    path.write_bytes(msgspec.json.encode(log))
    here = fold_file(str(path))
    there = subprocess.run([sys.executable, "-c", f"from tests.unit.test_metering import fold_file; "
                            f"print(fold_file({str(path)!r}))"], capture_output=True, text=True, timeout=120,
                           cwd=Path(__file__).resolve().parents[2], check=True).stdout.strip()
    assert there == here and len(json.loads(here)) > 1000


def _network_and_image_log() -> list[tuple[int, Event]]:
    net, failed, image, refused = (uuid.UUID(int=n) for n in (21, 22, 23, 24))
    return [
        (T0, price(Resource.NETWORK, 100, T0, "hour", 3600)),  # 100 micros per network-hour
        (T0, price(Resource.IMAGE_STORAGE, 3600, T0, "hour", 3600)),  # 3600 micros per GiB-hour
        (T0, network_domain.NetworkRequested(network_id=net, owner="alice", name="lan", ipam=network_domain.Ipam.AUTO)),
        (T0 + 2, network_domain.NetworkAllocated(network_id=net, vni=100, group="ff05::100", prefix="fd00:1::/64")),
        (T0, network_domain.NetworkRequested(network_id=failed, owner="alice", name="lost",
                                             ipam=network_domain.Ipam.AUTO)),
        (T0 + 1, network_domain.NetworkAllocationFailed(network_id=failed, reason="the pool is exhausted")),
        (T0, image_domain.ImageRequested(image_id=image, owner="bob", name="deb", public=False, store="fs",
                                         file_id=uuid.UUID(int=9), file_name="deb.qcow2", file_size=GIB,
                                         file_sha256="0" * 64)),
        (T0 + 100, image_domain.ImageImported(image_id=image, virtual_size=8 * GIB, stored_size=2 * GIB,
                                              location="fs:deb")),
        (T0, image_domain.ImageRequested(image_id=refused, owner="bob", name="bad", public=False, store="fs",
                                         file_id=uuid.UUID(int=10), file_name="bad.qcow2", file_size=GIB,
                                         file_sha256="1" * 64)),
        (T0 + 3, image_domain.ImageImportFailed(image_id=refused, reason="a backing file")),
        (T0 + 3602, network_domain.NetworkDeleted(network_id=net)),
        (T0 + 1900, image_domain.ImageDeleted(image_id=image)),
    ]


def test_networks_cost_while_usable_and_images_while_stored_and_failures_cost_nothing() -> None:
    log = sorted(_network_and_image_log(), key=lambda item: item[0])
    meter = fold(log)
    period = meter.periods.bounds(T0)[0]
    [network] = meter.lines("alice", period)
    assert (network.vm_name, network.resource, network.quantity_seconds) == ("lan", "network", 3600)
    assert network.amount == 100  # one network-hour
    [image] = meter.lines("bob", period)
    assert (image.vm_name, image.resource, image.quantity_seconds) == ("deb", "image-storage", 2 * GIB * 1800)
    assert image.amount == 3600  # half an hour of 2 GiB at 3600 micros per GiB-hour


def test_networks_and_images_so_far_across_a_period_end_and_a_snapshot() -> None:
    log = sorted(_network_and_image_log(), key=lambda item: item[0])
    halves = PeriodPolicy(seconds=1800)
    cut = next(i for i, (t, _) in enumerate(log) if t > T0 + 100)
    half = fold(log[:cut], halves)
    [so_far] = half.lines("alice", T0, now=T0 + 602)  # usable since T0 + 2
    assert so_far.quantity_seconds == 600
    half.close(T0, T0 + 1800)  # a period closes while both still exist: cut there
    restored = Meter.load(msgspec.msgpack.decode(msgspec.msgpack.encode(half.dump()), type=MeterSnapshot))
    for t, event in log[cut:]:
        restored.apply(event, t)
        half.apply(event, t)
    assert totals(restored) == totals(half)  # the snapshot lost nothing of what networks and images hold
    network = {start: q for (owner, start, _, r, _), q in totals(restored).items() if r == "network"}
    assert network == {T0: 1798, T0 + 1800: 1800, T0 + 3600: 2}
    image = {start: q for (owner, start, _, r, _), q in totals(restored).items() if r == "image-storage"}
    assert image == {T0: 2 * GIB * 1700, T0 + 1800: 2 * GIB * 100}
