"""ucloud-audit: the operators' tool over the log.

Reads the log only, through the EventStore interface, so it works the same on every
backend: follow and filter the log (``tail``), one resource's history (``show``), the
log as it stood at a position (``at``), and a full consistency check (``verify``).
Everything is read in pages of at most PAGE events; nothing loads the whole log.

Exit codes: 0 fine; 1 ``verify`` found problems, or what was asked for does not exist;
2 bad usage (options, store URL); 3 the store could not be read (unreachable, or a
record that does not decode outside ``verify``); 130 interrupted (but Ctrl-C ends
``tail -f`` with 0).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TypeVar
from uuid import UUID

import click
import msgspec
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ucloud.eventstore.errors import DataError, EventStoreError
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.records import EventRecord
from ucloud.eventstore.url import InvalidStoreUrl, StoreLocation, open_store, parse_store_url

PAGE = 1000
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_STORE = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
# Event times are stamped by the writer at commit, so across writers they follow the
# position only as closely as the writers' clocks agree. Scanning backwards for
# --since, tail stops only at an event this much older than asked for.
CLOCK_SLACK = timedelta(minutes=5)

T = TypeVar("T")


# -- parsing the command line ----------------------------------------------------------

_DURATION = re.compile(r"(\d+)([smhdw])", re.ASCII)
_DURATION_ALL = re.compile(r"(?:\d+[smhdw])+", re.ASCII)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(text: str, now: datetime) -> datetime:
    """An ISO 8601 time (naive means UTC), ``now``, or a duration ago: ``30s``, ``10m``,
    ``2h``, ``1d``, ``1w``, ``1h30m``. Hand-written: the durations are five units and a
    regex, and datetime.fromisoformat reads ISO 8601 (with ``Z``) since Python 3.11."""
    value = text.strip()
    if value == "now":
        return now
    if _DURATION_ALL.fullmatch(value):
        try:
            delta = sum(
                (timedelta(**{_UNITS[unit]: int(amount)}) for amount, unit in _DURATION.findall(value)),
                timedelta(),
            )
            return now - delta
        except OverflowError:
            raise ValueError(f"{text!r} reaches too far back") from None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use ISO 8601 such as 2024-05-01T12:00:00Z, "
            "or a duration ago such as 30s, 10m, 2h, 1d, 1w"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Pattern:
    """An exact name, or a prefix written with a trailing ``*`` (``vm-*``)."""

    text: str
    prefix: bool

    @classmethod
    def parse(cls, text: str, what: str) -> Pattern:
        if not text:
            raise ValueError(f"an empty {what} pattern matches nothing")
        star = text.find("*")
        if star != -1 and star != len(text) - 1:
            raise ValueError(f"{what} pattern {text!r}: '*' may only stand at the end (a prefix, like vm-*)")
        return cls(text[:-1], True) if star != -1 else cls(text, False)

    def matches(self, value: str) -> bool:
        return value.startswith(self.text) if self.prefix else value == self.text


def _matches_any(patterns: Sequence[Pattern], value: str) -> bool:
    return not patterns or any(p.matches(value) for p in patterns)


@dataclass(frozen=True)
class Filter:
    streams: tuple[Pattern, ...] = ()
    types: tuple[Pattern, ...] = ()
    actors: tuple[Pattern, ...] = ()
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, record: EventRecord) -> bool:
        return (
            _matches_any(self.streams, record.stream)
            and _matches_any(self.types, record.type)
            and _matches_any(self.actors, record.actor)
            and (self.since is None or record.time >= self.since)
            and (self.until is None or record.time <= self.until)
        )

    def exact_types(self) -> frozenset[str] | None:
        """Types the backend can filter on itself (it knows exact types only)."""
        if self.types and not any(p.prefix for p in self.types):
            return frozenset(p.text for p in self.types)
        return None

    def single_stream(self) -> str | None:
        """The one stream asked for, if so: then reading goes through the stream's index."""
        if len(self.streams) == 1 and not self.streams[0].prefix:
            return self.streams[0].text
        return None


class WhenType(click.ParamType):
    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_when(str(value), datetime.now(UTC))
        except ValueError as error:
            self.fail(str(error), param, ctx)


class CountType(click.ParamType):
    """A number of events, or ``all``."""

    name = "N|all"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if value is None or isinstance(value, int):
            return value
        if str(value).strip().lower() == "all":
            return None
        try:
            count = int(value)
        except ValueError:
            count = -1
        if count < 0:
            self.fail(f"{value!r} is not a number of events (0 or more) nor 'all'", param, ctx)
        return count


def _patterns(values: Sequence[str], what: str) -> tuple[Pattern, ...]:
    try:
        return tuple(Pattern.parse(v, what) for v in values)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint=f"--{what}") from None


# -- output -------------------------------------------------------------------------------

def _json_or_none(data: bytes) -> tuple[bool, Any]:
    try:
        return True, msgspec.json.decode(data)
    except msgspec.DecodeError:
        return False, None


def envelope(record: EventRecord) -> dict[str, Any]:
    """The full envelope for --json; ``data`` as JSON when it parses, else base64, and
    ``data_encoding`` says which, so a JSON string and base64 are never confused."""
    parsed, value = _json_or_none(record.data)
    return {
        "position": record.position,
        "id": str(record.id),
        "type": record.type,
        "stream": record.stream,
        "version": record.version,
        "time": record.time.isoformat(),
        "actor": record.actor,
        "causation_id": None if record.causation_id is None else str(record.causation_id),
        "correlation_id": None if record.correlation_id is None else str(record.correlation_id),
        "schema": record.schema,
        "data_encoding": "json" if parsed else "base64",
        "data": value if parsed else base64.b64encode(record.data).decode(),
    }


def summarise(data: bytes) -> str:
    """One line for a table: ``key=value`` pairs of a JSON object, else compact JSON."""
    parsed, value = _json_or_none(data)
    if not parsed:
        return f"<{len(data)} bytes, not JSON>"
    if isinstance(value, dict) and value:
        return " ".join(f"{key}={_short(item)}" for key, item in value.items())
    return _short(value)


def _short(value: Any) -> str:
    if isinstance(value, str) and value and not any(c.isspace() or c in "\"=" for c in value):
        return value
    return msgspec.json.encode(value).decode()


def _time(record: EventRecord) -> str:
    return record.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


class Printer:
    """Prints events as they come: a table (header once; later batches keep the first
    batch's column widths so a followed log stays aligned) or JSON lines."""

    COLUMNS = ("position", "time (UTC)", "stream", "version", "type", "actor", "data")
    # Room kept when the first batch is empty or short, for the events that follow.
    MIN_WIDTHS = {"position": 8, "time (UTC)": 23, "stream": 24, "type": 20, "actor": 12}

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        width = None
        if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
            width = 200  # piped: wide lines rather than rich's default of 80
        self.console = Console(file=sys.stdout, width=width, markup=False, highlight=False, emoji=False)
        self.widths: list[int] | None = None
        self.printed = 0

    def print(self, records: Sequence[EventRecord]) -> None:
        if self.as_json:
            for record in records:
                sys.stdout.write(msgspec.json.encode(envelope(record)).decode() + "\n")
        elif records or self.widths is None:
            self._table(records)
        self.printed += len(records)
        sys.stdout.flush()

    def _table(self, records: Sequence[EventRecord]) -> None:
        rows = [
            (str(r.position), _time(r), r.stream, str(r.version), r.type, r.actor, summarise(r.data))
            for r in records
        ]
        first = self.widths is None
        if self.widths is None:
            self.widths = [
                max([len(name), self.MIN_WIDTHS.get(name, 0)] + [len(row[i]) for row in rows])
                for i, name in enumerate(self.COLUMNS[:-1])
            ]
        table = Table(box=box.SIMPLE_HEAD, show_header=first, show_edge=False, pad_edge=False)
        for i, name in enumerate(self.COLUMNS[:-1]):
            table.add_column(
                name,
                justify="right" if name in ("position", "version") else "left",
                min_width=self.widths[i],
                max_width=self.widths[i] if name in ("position", "time (UTC)", "version") else None,
                overflow="fold",
            )
        table.add_column("data", ratio=1, no_wrap=True, overflow="ellipsis")
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        if rows or first:
            self.console.print(table)


# -- reading the log in pages -------------------------------------------------------------

async def backwards(store: EventStore, flt: Filter, low: int, high: int) -> AsyncIterator[EventRecord]:
    """Events with low < position <= high, newest first, that may match ``flt`` (the
    caller still applies flt.matches)."""
    stream = flt.single_stream()
    if stream is not None:
        version = await store.stream_version(stream)
        while version > 0:
            page = await store.read_stream(stream, up_to_version=version, limit=PAGE, backwards=True)
            for record in page:
                if record.position <= low:
                    return
                if record.position <= high:
                    yield record
            if not page:
                return
            version = page[-1].version - 1
        return
    types = flt.exact_types()
    while high > low:
        start = max(low, high - PAGE)
        for record in reversed(await store.read_all(start, up_to=high, types=types)):
            yield record
        high = start


async def forwards(store: EventStore, flt: Filter, low: int, high: int) -> AsyncIterator[list[EventRecord]]:
    """Pages of events with low < position <= high, oldest first."""
    stream = flt.single_stream()
    if stream is not None:
        version = 0
        while True:
            page = await store.read_stream(stream, after_version=version, limit=PAGE)
            wanted = [r for r in page if low < r.position <= high]
            if wanted:
                yield wanted
            if len(page) < PAGE or page[-1].position > high:
                return
            version = page[-1].version
    types = flt.exact_types()
    while low < high:
        up_to = min(high, low + PAGE)
        yield await store.read_all(low, up_to=up_to, types=types)
        low = up_to


# -- running a command against a store ----------------------------------------------------

@dataclass
class Context:
    location: StoreLocation


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"ucloud-audit: {message}", err=True)
    sys.exit(code)


def run(ctx: click.Context, work: Callable[[EventStore], Awaitable[T]], *, following: bool = False) -> T:
    """Open the store, run ``work`` on it, close it; turn store errors into messages.

    Ctrl-C ends a follow cleanly (exit 0); anything else it interrupts exits 130, so an
    interrupted verify never looks like a passed one. A closed pipe (``| head``) ends quietly.
    """
    location: StoreLocation = ctx.ensure_object(Context).location

    async def main() -> T:
        store = open_store(location, create=False)
        try:
            return await work(store)
        finally:
            await store.close()

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0 if following else EXIT_INTERRUPTED)
    except BrokenPipeError:
        # Stop Python from failing again while flushing stdout at exit.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except InvalidStoreUrl as error:
        _fail(str(error), EXIT_USAGE)
    except DataError as error:
        _fail(f"{location}: {error} (run 'ucloud-audit verify' to find every problem)", EXIT_STORE)
    except EventStoreError as error:
        _fail(f"cannot read the log at {location}: {error}", EXIT_STORE)


def _store_option(ctx: click.Context, param: click.Parameter, value: str | None) -> StoreLocation:
    if value is None:
        raise click.BadParameter("give --store or set UCLOUD_STORE (sqlite:///path or etcd://host:port)")
    try:
        location = parse_store_url(value)
    except InvalidStoreUrl as error:
        raise click.BadParameter(str(error)) from None
    if location.scheme == "memory":
        raise click.BadParameter(
            "memory:// is an empty log living inside one process; there is nothing to audit "
            "(use sqlite:///path or etcd://host:port)"
        )
    return location


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--store",
    envvar="UCLOUD_STORE",
    callback=_store_option,
    metavar="URL",
    help="The log: sqlite:///path/to/log.sqlite (or a bare path), "
    "etcd://host:port[,host:port...][/prefix] (prefix default /v1). Env: UCLOUD_STORE.",
)
@click.pass_context
def main(ctx: click.Context, store: StoreLocation) -> None:
    """Inspect and verify the ucloud event log (read-only)."""
    ctx.obj = Context(store)


def _filter_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--stream", "streams", multiple=True, metavar="S",
                     help="Only this stream; a trailing * makes a prefix (vm-*). Repeatable."),
        click.option("--type", "types", multiple=True, metavar="T",
                     help="Only this event type; a trailing * makes a prefix (vm.*). Repeatable."),
        click.option("--actor", "actors", multiple=True, metavar="A",
                     help="Only events by this actor; a trailing * makes a prefix. Repeatable."),
        click.option("--since", type=WhenType(),
                     help="Only events at or after this time: ISO 8601 (naive is UTC) or ago, like 10m, 2h, 1d."),
        click.option("--until", type=WhenType(), help="Only events at or before this time (same forms)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _make_filter(streams: Sequence[str], types: Sequence[str], actors: Sequence[str],
                 since: datetime | None, until: datetime | None) -> Filter:
    if since is not None and until is not None and since > until:
        raise click.BadParameter(f"--since {since.isoformat()} is after --until {until.isoformat()}")
    return Filter(_patterns(streams, "stream"), _patterns(types, "type"), _patterns(actors, "actor"), since, until)


json_option = click.option("--json", "as_json", is_flag=True,
                           help="JSON lines: the full envelope of each event (data as JSON, else base64).")


@main.command(short_help="The last events, filtered; -f follows the log live.")
@click.option("-n", "--lines", "count", type=CountType(), default=10, show_default=True,
              help="How many of the last matching events to show; 'all' shows every one.")
@click.option("-f", "--follow", is_flag=True, help="Then keep printing new events as they are appended, until Ctrl-C.")
@click.option("--after-position", type=click.IntRange(min=0), default=0, metavar="P",
              help="Only events after position P.")
@_filter_options
@json_option
@click.pass_context
def tail(ctx: click.Context, count: int | None, follow: bool, after_position: int, as_json: bool,
         streams: tuple[str, ...], types: tuple[str, ...], actors: tuple[str, ...],
         since: datetime | None, until: datetime | None) -> None:
    """The last events of the log, filtered; with -f, follow the log live."""
    flt = _make_filter(streams, types, actors, since, until)
    if follow and until is not None:
        raise click.BadParameter("--until cannot be combined with --follow (new events are always later)")
    printer = Printer(as_json)

    async def work(store: EventStore) -> None:
        head = await store.head()
        if count is None:
            async for page in forwards(store, flt, after_position, head):
                printer.print([r for r in page if flt.matches(r)])
        else:
            found: deque[EventRecord] = deque()
            if count > 0:
                async for record in backwards(store, flt, after_position, head):
                    if flt.since is not None and record.time < flt.since - CLOCK_SLACK:
                        break
                    if flt.matches(record):
                        found.appendleft(record)
                        if len(found) == count:
                            break
            printer.print(list(found))
        if not follow:
            if printer.printed == 0:
                click.echo(f"no matching events (head is at position {head})", err=True)
            return
        click.echo(f"following the log after position {max(head, after_position)}; Ctrl-C stops", err=True)
        async for record in store.subscribe(max(head, after_position), types=flt.exact_types()):
            if flt.matches(record):
                printer.print([record])

    run(ctx, work, following=follow)


def _refuse_pattern(stream: str) -> None:
    if "*" in stream:
        raise click.BadParameter(
            f"{stream!r}: show takes one stream name, not a pattern (use: tail --stream {stream!r} -n all)"
        )


async def _stream_events(store: EventStore, stream: str, at: int | None, printer: Printer) -> None:
    """Print the stream's events in version order, up to position ``at``. This is the
    seam for state at a point in time: a fold over exactly these events."""
    head = await store.head()
    if at is not None and at > head:
        _fail(f"position {at} is beyond the head of the log (position {head})", EXIT_USAGE)
    high = head if at is None else at
    async for page in forwards(store, Filter(streams=(Pattern(stream, False),)), 0, high):
        printer.print(page)
    if printer.printed == 0:
        if at is not None and await store.stream_version(stream) > 0:
            first = (await store.read_stream(stream, limit=1))[0]
            _fail(f"stream {stream!r} had no events yet at position {at} "
                  f"(its first event is at position {first.position})", EXIT_PROBLEMS)
        _fail(f"stream {stream!r} has no events", EXIT_PROBLEMS)


@main.command()
@click.argument("stream")
@click.option("--at", type=click.IntRange(min=1), metavar="POSITION",
              help="Only the events up to this log position (the stream as it stood then).")
@json_option
@click.pass_context
def show(ctx: click.Context, stream: str, at: int | None, as_json: bool) -> None:
    """One resource's history: the events of STREAM in version order.

    With --at POSITION, only the events up to that position. This shows the events,
    not a folded state: folding them needs the domain aggregates and is not done yet.
    """
    _refuse_pattern(stream)
    printer = Printer(as_json)
    run(ctx, lambda store: _stream_events(store, stream, at, printer))


@main.command(short_help="The log as it stood at POSITION (events, not folded state).")
@click.argument("position", type=click.IntRange(min=1))
@click.argument("stream", required=False)
@click.option("--stream", "streams", multiple=True, metavar="S",
              help="Without STREAM: only streams matching S (a trailing * makes a prefix). Repeatable.")
@json_option
@click.pass_context
def at(ctx: click.Context, position: int, stream: str | None, streams: tuple[str, ...], as_json: bool) -> None:
    """The log as it stood at POSITION.

    With STREAM: that stream's events up to POSITION (same as show STREAM --at POSITION).
    Without: each stream's last event at or before POSITION, so its version then.
    These are events, not folded state: folding them into each resource's state needs
    the domain aggregates and is not done yet.
    """
    printer = Printer(as_json)
    if stream is not None:
        if streams:
            raise click.BadParameter("give either a STREAM argument or --stream patterns, not both")
        _refuse_pattern(stream)
        run(ctx, lambda store: _stream_events(store, stream, position, printer))
        return
    flt = Filter(streams=_patterns(streams, "stream"))

    async def work(store: EventStore) -> None:
        head = await store.head()
        if position > head:
            _fail(f"position {position} is beyond the head of the log (position {head})", EXIT_USAGE)
        last: dict[str, EventRecord] = {}
        async for page in forwards(store, flt, 0, position):
            for record in page:
                if flt.matches(record):
                    last[record.stream] = record
        printer.print([last[name] for name in sorted(last)])
        if not last:
            click.echo(f"no matching streams at position {position}", err=True)

    run(ctx, work)


# -- verify -------------------------------------------------------------------------------

@dataclass
class Verification:
    head: int = 0
    events: int = 0
    streams: dict[str, int] = field(default_factory=dict)  # stream -> last version seen
    problems: list[str] = field(default_factory=list)


async def _page_or_each(store: EventStore, low: int, high: int,
                        problems: list[str]) -> list[tuple[int, EventRecord | None]]:
    """Events with low < position <= high. When the page does not decode, read it one
    position at a time to name each record that does not (None in its place)."""
    try:
        return [(r.position, r) for r in await store.read_all(low, up_to=high)]
    except DataError:
        pass
    out: list[tuple[int, EventRecord | None]] = []
    for position in range(low + 1, high + 1):
        try:
            out.extend((r.position, r) for r in await store.read_all(position - 1, up_to=position))
        except DataError as error:
            problems.append(f"position {position}: the record does not decode ({error})")
            out.append((position, None))
    return out


async def verify_log(store: EventStore) -> Verification:
    """Check the whole log, page by page: positions 1..head gap-free, stream versions
    contiguous from 1, every record decodes, data is JSON, event ids unique."""
    result = Verification(head=await store.head())
    problems = result.problems
    ids: set[bytes] = set()
    duplicated: set[bytes] = set()
    expected = 1
    low = 0
    while low < result.head:
        high = min(result.head, low + PAGE)
        for position, record in await _page_or_each(store, low, high, problems):
            if position > expected:
                missing = f"position {expected}" if position == expected + 1 else f"positions {expected}..{position - 1}"
                problems.append(f"{missing} missing: the log has a gap before position {position}")
            elif position < expected:
                problems.append(f"position {position} appears out of order or twice (after position {expected - 1})")
            expected = max(expected, position + 1)
            if record is None:
                continue
            result.events += 1
            _check_record(record, result)
            if record.id.bytes in ids:
                duplicated.add(record.id.bytes)
            ids.add(record.id.bytes)
        low = high
    if expected <= result.head:
        missing = f"position {expected}" if expected == result.head else f"positions {expected}..{result.head}"
        problems.append(f"{missing} missing: the log ends before its head (position {result.head})")
    try:
        beyond = await store.read_all(result.head, limit=10)
    except DataError as error:
        problems.append(f"records beyond the head (position {result.head}) that do not decode: {error}")
    else:
        for record in beyond:
            problems.append(f"position {record.position} lies beyond the head (position {result.head})")
    if duplicated:
        await _name_duplicates(store, result.head, duplicated, problems)
    return result


def _check_record(record: EventRecord, result: Verification) -> None:
    last = result.streams.get(record.stream, 0)
    if record.version != last + 1:
        result.problems.append(
            f"stream {record.stream!r}: version {record.version} at position {record.position} "
            f"follows version {last} (expected {last + 1})"
        )
    result.streams[record.stream] = record.version
    try:
        msgspec.json.decode(record.data)
    except msgspec.DecodeError as error:
        result.problems.append(
            f"position {record.position} ({record.type} in {record.stream!r}): data is not valid JSON ({error})"
        )


async def _name_duplicates(store: EventStore, head: int, duplicated: set[bytes], problems: list[str]) -> None:
    """A second pass, only when ids repeat: name every position of each repeated id."""
    where: dict[bytes, list[int]] = {key: [] for key in duplicated}
    throwaway: list[str] = []
    low = 0
    while low < head:
        high = min(head, low + PAGE)
        for _, record in await _page_or_each(store, low, high, throwaway):
            if record is not None and record.id.bytes in where:
                where[record.id.bytes].append(record.position)
        low = high
    for key, positions in where.items():
        problems.append(
            f"event id {UUID(bytes=key)} is not unique: it appears at positions "
            + ", ".join(map(str, positions))
        )


@main.command(short_help="Check the whole log; exit 1 listing every problem.")
@click.pass_context
def verify(ctx: click.Context) -> None:
    """Check the whole log: positions 1..head without gaps, stream versions contiguous
    from 1, every record decodes, every event's data is JSON, event ids unique.

    Exits 0 when the log is consistent, 1 listing every problem found.
    """
    result = run(ctx, verify_log)
    location = ctx.ensure_object(Context).location
    click.echo(f"{location}: checked positions 1..{result.head}: "
               f"{result.events} events in {len(result.streams)} streams")
    if not result.problems:
        click.echo("OK: the log is consistent")
        return
    click.echo(f"FAILED: {len(result.problems)} problem{'s' if len(result.problems) != 1 else ''}:")
    for problem in result.problems:
        click.echo(f"  - {problem}")
    sys.exit(EXIT_PROBLEMS)


if __name__ == "__main__":
    main()
