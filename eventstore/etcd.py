"""etcd backend: the production log, and with a 3-member cluster no single point of failure.

Key layout (prefix ``/v1`` by default):

    /v1/events/<position:020d>            the event record (msgpack EventRecord)
    /v1/streams/<stream>/<version:010d>   index: msgpack [position, event id]
    /v1/head                              the last position, b"%020d"
    /v1/tracking/<consumer>               a consumer's last position, b"%020d@<request token hex>"
    /v1/slices/<slice>/<position:020d>    index: the event at that position is in the slice
    /v1/slices-from                       b"%020d": slices are complete after this position
    /v1/snapshots/<stream>                the newest snapshot (msgpack Snapshot)
    /v1/snapshot-chunks/<stream>/<generation>/<index:08d>
                                          pieces of a snapshot too large for one value

One append is one etcd transaction. It compares the head (so positions stay gap-free
and totally ordered across every writer), and for every stream that the version it
expects exists and the next one does not. The GroupCommitter packs many appends into
one transaction; when it fails, the failure branch reads back exactly the keys that
were compared, so each request is judged alone: a conflict is reported to its caller,
the others go again in the next transaction.

A write whose outcome is unknown (leader lost, connection cut) is simply tried again:
the stream's next-version key then already holds our event id, which we recognise as
our own earlier success instead of a conflict. So an acknowledged append is written
exactly once, even across fail-over. A tracking record carries the token of the
request that wrote it, so a tracking-only request is recognised the same way.

Every request has a deadline (``append_timeout`` from its submission): until then an
unconfirmed write is retried across the cluster's endpoints; after it the caller gets
an UnavailableError, never a raw gRPC error. Reads are retried across endpoints by
the client; subscriptions retry for ever (a disturbance only delays them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Collection, Sequence
from typing import Any
from uuid import UUID, uuid4

import msgspec

from .errors import DataError, StreamConflict, TrackingConflict, UnavailableError
from .etcd_client import (
    EtcdClient,
    EtcdSecurity,
    TxnBuilder,
    cmp_mod,
    cmp_version,
    op_get,
    op_put,
    prefix_end,
    range_kvs,
)
from .group_commit import GroupCommitter, PendingAppend
from .interface import EventStore
from .records import (
    RECORD_DECODER,
    RECORD_ENCODER,
    SNAPSHOT_DECODER,
    EventRecord,
    Snapshot,
    StreamAppend,
    Tracking,
    slice_entries,
    to_record,
    utcnow,
    validate_append,
)

log = logging.getLogger(__name__)

_INDEX = msgspec.msgpack.Decoder(tuple[int, bytes])
PAGE = 2000


def _pad(position: int) -> bytes:
    return b"%020d" % position


class EtcdEventStore(EventStore):
    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        prefix: str = "/v1",
        max_txn_ops: int = 128,
        max_txn_bytes: int = 1024 * 1024,
        append_timeout: float = 30.0,
        timeout: float = 5.0,
        security: EtcdSecurity | None = None,
    ) -> None:
        if max_txn_ops < 8:
            raise ValueError(f"max_txn_ops must be at least 8 (etcd's default is 128), got {max_txn_ops}")
        if append_timeout <= 0 or timeout <= 0:
            raise ValueError(f"timeouts must be positive, got append_timeout={append_timeout}, timeout={timeout}")
        self.client = EtcdClient(endpoints, timeout=timeout, security=security)
        self.prefix = prefix.rstrip("/").encode()
        self.append_timeout = append_timeout
        self._head_key = self.prefix + b"/head"
        self._events = self.prefix + b"/events/"
        # Cost of a request in etcd operations, bounded by --max-txn-ops: the success
        # branch puts 2 keys per event, the compares and the failure branch touch 2 keys
        # per stream; one op of every branch is reserved for the head.
        self._committer = GroupCommitter(self._commit_batch, max_cost=max_txn_ops - 1, max_bytes=max_txn_bytes,
                                         timeout=append_timeout)
        self.max_txn_ops = max_txn_ops
        # Snapshots above this size are stored in chunks of ``snapshot_chunk_bytes``,
        # each one etcd value well under the default request limit of 1.5 MiB.
        self.snapshot_inline_bytes = 256 * 1024
        self.snapshot_chunk_bytes = 512 * 1024
        self.page = PAGE
        self.transactions = 0  # write transactions sent, for benchmarks and tests
        self._head_cache: int | None = None
        self._slices_marked = False
        self._tracking_cache: dict[str, bytes] = {}
        self._known_head = 0
        self._head_event: asyncio.Event | None = None
        self._watcher: asyncio.Task[None] | None = None

    @property
    def committer(self) -> GroupCommitter:
        """The group committer (its ``batches`` and ``requests`` counters show batching)."""
        return self._committer

    # -- keys -------------------------------------------------------------------

    def _event_key(self, position: int) -> bytes:
        return self._events + _pad(position)

    def _stream_prefix(self, stream: str) -> bytes:
        return self.prefix + b"/streams/" + stream.encode() + b"/"

    def _stream_key(self, stream: str, version: int) -> bytes:
        return self._stream_prefix(stream) + b"%010d" % version

    def _tracking_key(self, consumer: str) -> bytes:
        return self.prefix + b"/tracking/" + consumer.encode()

    # -- append -----------------------------------------------------------------

    def _slice_prefix(self, name: str) -> bytes:
        return self.prefix + b"/slices/" + name.encode() + b"/"

    async def append(self, *appends: StreamAppend, tracking: Tracking | None = None) -> list[int]:
        events = validate_append(appends, tracking)
        entries = slice_entries(appends)
        if entries and not self._slices_marked:
            await self._mark_slices()
        cost = 2 * events + entries + 2 * len(appends) + (1 if tracking else 0)
        return await self._committer.submit(appends, tracking, cost)

    async def _mark_slices(self) -> None:
        """Before the first sliced append: record (once per log) that slices are
        complete after the current head. Events before it were written by code that knew
        no slices; a reader that needs them reads the log itself up to here."""
        key = self.prefix + b"/slices-from"
        head = await self._read_head()
        await self.client.txn([cmp_version(key, "==", 0)], [op_put(key, _pad(head))])
        self._slices_marked = True

    async def slices_from(self) -> int | None:
        kv = await self.client.get(self.prefix + b"/slices-from")
        return int(kv.value) if kv is not None else None

    async def read_slice(self, slice: str, after: int = 0, *, up_to: int | None = None,
                         limit: int | None = None) -> list[EventRecord]:
        prefix = self._slice_prefix(slice)
        end = prefix + _pad(up_to + 1) if up_to is not None else prefix_end(prefix)
        start = prefix + _pad(after + 1)
        records: list[EventRecord] = []
        while limit is None or len(records) < limit:
            page = self.page if limit is None else min(self.page, limit - len(records))
            index = await self.client.range(start, end, limit=page, keys_only=True)
            positions = [int(kv.key[len(prefix):]) for kv in index.kvs]
            chunk = max(1, self.max_txn_ops)
            for i in range(0, len(positions), chunk):
                ops = [op_get(self._event_key(p)) for p in positions[i : i + chunk]]
                result = await self.client.txn([], ops, read_only=True)
                for response in result.responses:
                    kvs = range_kvs(response)
                    if not kvs:
                        raise DataError(f"slice {slice!r} indexes an event that is missing from the log")
                    records.append(_decode(kvs[0].value))
            if not index.more or not index.kvs:
                break
            start = index.kvs[-1].key + b"\0"
        return records

    async def _commit_batch(self, batch: list[PendingAppend]) -> None:
        loop = asyncio.get_running_loop()
        remaining = list(batch)
        delay = 0.02
        while remaining:
            try:
                if self._head_cache is None:
                    self._head_cache = await self._read_head()
                head = self._head_cache
                txn, positions = self._build_txn(remaining, head)
                self.transactions += 1
                result = await self.client.txn_request(txn.request)
            except UnavailableError as error:
                # Outcome unknown: try again until each request's deadline; our own
                # earlier success is then recognised by its event ids (or token).
                self._head_cache = None
                now = loop.time()
                alive = []
                for request in remaining:
                    if request.future.done():
                        continue  # its caller has its answer already (timed out)
                    if request.deadline is not None and now + delay >= request.deadline:
                        request.resolve(UnavailableError(
                            f"append not confirmed within {self.append_timeout}s; it may or may not "
                            f"have been written (retry the same request): {error}"))
                    else:
                        alive.append(request)
                remaining = alive
                if remaining:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.5)
                continue
            except DataError as error:
                # etcd refused the transaction itself (too large, too many ops): judge
                # each request alone so that only the one at fault fails.
                self._head_cache = None
                if len(remaining) == 1:
                    remaining[0].resolve(DataError(f"etcd refused the append: {error}"))
                    return
                for request in remaining:
                    await self._commit_batch([request])
                return
            if result.succeeded:
                self._head_cache = head + sum(len(p) for p in positions)
                for request, request_positions in zip(remaining, positions, strict=True):
                    if request.tracking is not None:
                        self._tracking_cache[request.tracking.consumer] = self._tracking_value(request)
                    request.resolve(request_positions)
                self._note_head(self._head_cache)
                return
            remaining = self._judge_failure(remaining, result.responses)

    @staticmethod
    def _tracking_value(request: PendingAppend) -> bytes:
        assert request.tracking is not None
        return _pad(request.tracking.position) + b"@" + request.token.hex().encode()

    def _build_txn(self, requests: list[PendingAppend], head: int) -> tuple[TxnBuilder, list[list[int]]]:
        txn = TxnBuilder()
        if head == 0:
            txn.compare_version(self._head_key, "==", 0)
        else:
            txn.compare_value(self._head_key, "==", _pad(head))
        txn.get_on_failure(self._head_key)
        all_positions: list[list[int]] = []
        position = head
        now = utcnow()
        encode = RECORD_ENCODER.encode
        for request in requests:
            positions = []
            for append in request.appends:
                stream_prefix = self._stream_prefix(append.stream)
                expected = append.expected_version
                next_key = stream_prefix + b"%010d" % (expected + 1)
                txn.compare_version(next_key, "==", 0)
                txn.get_on_failure(next_key)
                if expected > 0:
                    current_key = stream_prefix + b"%010d" % expected
                    txn.compare_version(current_key, ">", 0)
                    txn.get_on_failure(current_key, keys_only=True)
                for offset, event in enumerate(append.events, start=1):
                    position += 1
                    version = expected + offset
                    txn.put(self._events + b"%020d" % position,
                            encode(to_record(event, append.stream, version, position, now)))
                    txn.put(stream_prefix + b"%010d" % version, encode((position, event.id.bytes)))
                    for name in event.slices:
                        txn.put(self.prefix + b"/slices/" + name.encode() + b"/%020d" % position, b"")
                    positions.append(position)
            if request.tracking is not None:
                key = self._tracking_key(request.tracking.consumer)
                recorded = self._tracking_cache.get(request.tracking.consumer)
                if recorded is None:
                    txn.compare_version(key, "==", 0)
                elif _tracked(recorded) < request.tracking.position:
                    # The exact value we last saw: nobody else moved the consumer since.
                    txn.compare_value(key, "==", recorded)
                else:
                    txn.compare_value(key, "<", _pad(request.tracking.position))
                txn.get_on_failure(key)
                txn.put(key, self._tracking_value(request))
            all_positions.append(positions)
        if position != head:
            # Only a transaction that appends moves the head. Writing an unmoved head of 0
            # would create the key, and the next append's 'no head yet' compare would fail.
            txn.put(self._head_key, _pad(position))
        return txn, all_positions

    def _judge_failure(self, requests: list[PendingAppend], responses: Sequence[Any]) -> list[PendingAppend]:
        """Read the failure branch in the order _build_txn wrote it; return who goes again."""
        answers = iter(responses)
        head_kvs = range_kvs(next(answers))
        self._head_cache = int(head_kvs[0].value) if head_kvs else 0
        again = []
        for request in requests:
            outcome: list[int] | Exception | None = None
            own_positions: list[int] = []
            for append in request.appends:
                next_kvs = range_kvs(next(answers))
                current_missing = False
                if append.expected_version > 0:
                    current_missing = not range_kvs(next(answers))
                if outcome is not None:
                    continue
                if next_kvs:
                    position, event_id = _INDEX.decode(next_kvs[0].value)
                    if UUID(bytes=event_id) == append.events[0].id:
                        own_positions.extend(range(position, position + len(append.events)))
                        continue
                    outcome = StreamConflict(append.stream, append.expected_version)
                elif current_missing:
                    outcome = StreamConflict(append.stream, append.expected_version)
            own_tracking = False
            if request.tracking is not None:
                tracking_kvs = range_kvs(next(answers))
                value = tracking_kvs[0].value if tracking_kvs else None
                recorded = _tracked(value) if value is not None else 0
                if value is not None:
                    self._tracking_cache[request.tracking.consumer] = value
                else:
                    self._tracking_cache.pop(request.tracking.consumer, None)
                own_tracking = value == self._tracking_value(request) or (
                    bool(own_positions) and recorded == request.tracking.position)
                if outcome is None and recorded >= request.tracking.position and not own_tracking:
                    outcome = TrackingConflict(request.tracking.consumer, request.tracking.position, recorded)
            events = sum(len(a.events) for a in request.appends)
            if outcome is None and (own_positions or own_tracking) and len(own_positions) == events:
                outcome = own_positions  # an earlier, unconfirmed attempt did commit
            if outcome is None:
                again.append(request)
            else:
                request.resolve(outcome)
        return again

    # -- reads ------------------------------------------------------------------

    async def _read_head(self) -> int:
        kv = await self.client.get(self._head_key)
        return int(kv.value) if kv else 0

    async def head(self) -> int:
        head = await self._read_head()
        self._note_head(head)
        return head

    async def read_all(
        self,
        after: int = 0,
        *,
        up_to: int | None = None,
        limit: int | None = None,
        types: Collection[str] | None = None,
    ) -> list[EventRecord]:
        wanted = set(types) if types is not None else None
        out: list[EventRecord] = []
        decode = RECORD_DECODER.decode
        low = after
        while True:
            # Read by windows of positions, each range bounded on both sides: etcd counts
            # every key up to a range's end even under a limit, so paging towards the
            # end of the prefix made a full read quadratic in the log's length.
            # Windows are not pinned to one revision: every transaction writes its
            # events and the head together, so any revision holds exactly 1..head and a
            # later window only adds to the end. Unpinned reads also survive compaction.
            size = self.page
            if limit is not None and wanted is None:
                size = min(size, limit - len(out))
            high = low + size if up_to is None else min(low + size, up_to)
            if high <= low:
                return out
            response = await self.client.range_raw(self._event_key(low + 1), self._event_key(high + 1))
            kvs = response.kvs
            try:
                if wanted is None:
                    out.extend(decode(kv.value) for kv in kvs)
                else:
                    for kv in kvs:
                        record = decode(kv.value)
                        if record.type in wanted:
                            out.append(record)
            except msgspec.DecodeError as error:
                raise DataError(f"an event in the log does not decode: {error}") from error
            if limit is not None and len(out) >= limit:
                return out[:limit]
            if len(kvs) == high - low:
                low = high
                continue
            # A short window: the end of the log, or a hole in a damaged log. Whatever
            # lies beyond is still returned (the audit tool's verify must see it).
            end = self._event_key(up_to + 1) if up_to is not None else prefix_end(self._events)
            beyond = await self.client.range(self._event_key(high + 1), end, limit=1, keys_only=True)
            if not beyond.kvs:
                return out
            low = int(beyond.kvs[0].key[len(self._events):]) - 1

    async def read_stream(
        self,
        stream: str,
        *,
        after_version: int = 0,
        up_to_version: int | None = None,
        limit: int | None = None,
        backwards: bool = False,
    ) -> list[EventRecord]:
        prefix = self._stream_prefix(stream)
        start = self._stream_key(stream, after_version + 1)
        end = self._stream_key(stream, up_to_version + 1) if up_to_version is not None else prefix_end(prefix)
        if limit is not None and limit <= 0:
            return []
        index = await self.client.range(start, end, limit=limit or 0, descending=backwards)
        positions = [_INDEX.decode(kv.value)[0] for kv in index.kvs]
        records: list[EventRecord] = []
        chunk = max(1, self.max_txn_ops)
        for i in range(0, len(positions), chunk):
            ops = [op_get(self._event_key(p)) for p in positions[i : i + chunk]]
            result = await self.client.txn([], ops, read_only=True)
            for response in result.responses:
                kvs = range_kvs(response)
                if not kvs:
                    raise DataError(f"stream {stream!r} indexes an event that is missing from the log")
                records.append(_decode(kvs[0].value))
        return records

    async def stream_version(self, stream: str) -> int:
        prefix = self._stream_prefix(stream)
        result = await self.client.range(prefix, prefix_end(prefix), limit=1, keys_only=True, descending=True)
        return int(result.kvs[0].key[len(prefix):]) if result.kvs else 0

    async def tracked_position(self, consumer: str) -> int:
        kv = await self.client.get(self._tracking_key(consumer))
        return _tracked(kv.value) if kv else 0

    # -- live -------------------------------------------------------------------

    def _note_head(self, head: int) -> None:
        if head > self._known_head:
            self._known_head = head
            if self._head_event is not None:
                # Wake every waiter; later waiters wait on a fresh event.
                self._head_event.set()
                self._head_event = asyncio.Event()

    async def wait_for_events(self, after: int, timeout: float) -> int:
        if self._head_event is None:
            self._head_event = asyncio.Event()
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch_head())
        if self._known_head <= after:
            # asyncio.timeout, not wait_for: see eventstore/notify.py (a lost cancel).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._head_event.wait()
        # The watch only wakes us; the head itself is always read fresh.
        return await self.head()

    async def subscribe(
        self,
        after: int = 0,
        *,
        types: Collection[str] | None = None,
        slice: str | None = None,
        batch: int = 1000,
        idle_timeout: float = 5.0,
    ) -> AsyncIterator[EventRecord]:
        """As EventStore.subscribe, and an unreachable cluster only delays it: every
        read is retried (with a growing pause, logged) until etcd answers again.

        While catching up, the next window is read while the consumer works on this one
        (etcd serves it meanwhile), so a replay waits on etcd less. A slice is sparse, so
        it is read up to the head at once rather than by windows of positions."""
        wanted = None if types is None else frozenset(types)

        async def read(low: int, high: int) -> list[EventRecord]:
            if slice is None:
                return await self.read_all(low, up_to=high, types=types)
            records = await self.read_slice(slice, low, up_to=high)
            return records if wanted is None else [r for r in records if r.type in wanted]

        if slice is not None:
            batch = 1 << 62
        position = after
        head = 0
        delay = 0.05
        ahead: asyncio.Task[list[EventRecord]] | None = None
        ahead_to = 0
        try:
            while True:
                try:
                    if ahead is not None:
                        task, ahead = ahead, None
                        up_to = ahead_to
                        records = await task
                    else:
                        if head <= position:
                            head = await self.head()
                        while head <= position:
                            head = await self.wait_for_events(position, idle_timeout)
                        up_to = min(head, position + batch)
                        records = await read(position, up_to)
                except UnavailableError as error:
                    log.warning("subscription after position %d waits for etcd: %s", position, error)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                delay = 0.05
                if up_to < head:
                    ahead_to = min(head, up_to + batch)
                    ahead = asyncio.get_running_loop().create_task(read(up_to, ahead_to))
                for record in records:
                    yield record
                position = up_to
        finally:
            if ahead is not None:
                ahead.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await ahead

    async def _watch_head(self) -> None:
        """Follow the head key. Any failure (compaction, restart, fail-over) just
        restarts the watch from a fresh read: readers go by position, so nothing
        can be missed."""
        delay = 0.05
        while True:
            try:
                kv_rev = await self.client.range(self._head_key)
                if kv_rev.kvs:
                    self._note_head(int(kv_rev.kvs[0].value))
                async for kvs in self.client.watch(self._head_key, start_revision=kv_rev.revision + 1):
                    for kv in kvs:
                        if kv.value:
                            self._note_head(int(kv.value))
                    delay = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the watch is only a wake-up; it must never die
                log.debug("head watch restarts after: %r", error)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    # -- snapshots --------------------------------------------------------------
    #
    # etcd refuses a request over --max-request-bytes (1.5 MiB by default), and a read
    # model of 100,000 VMs is tens of MiB. A large state is therefore written first as
    # chunks under a fresh generation, then made current by a compare-and-swap of the
    # small snapshot record that names that generation; the chunks of the generations it
    # replaced (and of saves that died before their swap) are deleted afterwards. A reader
    # that finds its generation's chunks gone was overtaken by a newer save and reads again.

    def _snapshot_key(self, stream: str) -> bytes:
        return self.prefix + b"/snapshots/" + stream.encode()

    def _chunk_prefix(self, stream: str, generation: str = "") -> bytes:
        base = self.prefix + b"/snapshot-chunks/" + stream.encode() + b"/"
        return base + generation.encode() + b"/" if generation else base

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        key = self._snapshot_key(snapshot.stream)
        record = snapshot
        if len(snapshot.state) > self.snapshot_inline_bytes:
            record = await self._write_chunks(snapshot)
        value = RECORD_ENCODER.encode(record)
        while True:
            kv = await self.client.get(key)
            if kv is not None and _decode_snapshot(snapshot.stream, kv.value).version >= snapshot.version:
                break  # a newer snapshot is already there; ours (and its chunks) are not needed
            # Compare-and-swap: a concurrent save of a newer snapshot is never replaced.
            guard = cmp_version(key, "==", 0) if kv is None else cmp_mod(key, "==", kv.mod_revision)
            if (await self.client.txn([guard], [op_put(key, value)])).succeeded:
                break
        await self._drop_stale_chunks(snapshot.stream)

    async def _write_chunks(self, snapshot: Snapshot) -> Snapshot:
        # Generations sort by the version they hold, so clean-up can spare a newer save
        # whose chunks are still being written.
        generation = f"{snapshot.version:020d}-{uuid4().hex}"
        state = snapshot.state
        size = self.snapshot_chunk_bytes
        chunk_prefix = self._chunk_prefix(snapshot.stream, generation)
        pieces = [state[offset:offset + size] for offset in range(0, len(state), size)]
        # A few puts in flight at once: etcd applies them in order anyway, and more only
        # queue in its raft log.
        limit = asyncio.Semaphore(4)

        async def put(index: int, piece: bytes) -> None:
            async with limit:
                await self.client.put(chunk_prefix + b"%08d" % index, piece)

        tasks = [asyncio.ensure_future(put(index, piece)) for index, piece in enumerate(pieces)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # One refused chunk fails the save: stop the others rather than leave them
            # writing in the background (the chunks already written are cleaned up later).
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return msgspec.structs.replace(snapshot, state=b"", chunks=len(pieces), generation=generation,
                                       digest=hashlib.sha256(state).hexdigest())

    async def _drop_stale_chunks(self, stream: str) -> None:
        """Delete the chunk generations of ``stream`` that are not current and not newer
        than the current snapshot (a newer one may be a save still in progress)."""
        kv = await self.client.get(self._snapshot_key(stream))
        if kv is None:
            return
        current = _decode_snapshot(stream, kv.value)
        base = self._chunk_prefix(stream)
        listed = await self.client.range(base, prefix_end(base), keys_only=True)
        generations = {key[len(base):].split(b"/", 1)[0].decode() for key in (k.key for k in listed.kvs)}
        for generation in generations:
            if generation == current.generation or int(generation.split("-", 1)[0]) > current.version:
                continue
            stale = self._chunk_prefix(stream, generation)
            await self.client.delete(stale, prefix_end(stale))

    async def load_snapshot(self, stream: str) -> Snapshot | None:
        incomplete = ""
        while True:
            kv = await self.client.get(self._snapshot_key(stream))
            if kv is None:
                return None
            snapshot = _decode_snapshot(stream, kv.value)
            if not snapshot.chunks:
                return snapshot
            state = await self._read_chunks(stream, snapshot)
            if state is not None:
                return msgspec.structs.replace(snapshot, state=state, chunks=0, generation="", digest="")
            if snapshot.generation == incomplete:  # not replaced meanwhile: chunks are lost
                raise DataError(f"snapshot of {stream!r} is missing chunks of generation {incomplete}")
            incomplete = snapshot.generation

    async def _read_chunks(self, stream: str, snapshot: Snapshot) -> bytes | None:
        """The whole state, or None when a newer save deleted this generation meanwhile."""
        chunk_prefix = self._chunk_prefix(stream, snapshot.generation)
        end = prefix_end(chunk_prefix)
        pieces: list[bytes] = []
        start = chunk_prefix
        while True:
            # Pages of a few chunks keep each response well under the gRPC message limit.
            page = await self.client.range(start, end, limit=16)
            pieces.extend(kv.value for kv in page.kvs)
            if not page.more or not page.kvs:
                break
            start = page.kvs[-1].key + b"\0"
        if len(pieces) != snapshot.chunks:
            if pieces:  # some chunks but not all: deleted under us, or lost
                log.info("snapshot %s: generation %s is incomplete (%d of %d chunks); reading again",
                         stream, snapshot.generation, len(pieces), snapshot.chunks)
            return None
        state = b"".join(pieces)
        if hashlib.sha256(state).hexdigest() != snapshot.digest:
            raise DataError(f"snapshot of {stream!r} does not match its digest (generation {snapshot.generation})")
        return state

    async def close(self) -> None:
        await self._committer.close()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
        await self.client.close()


def _tracked(value: bytes) -> int:
    """A tracking value is b"<position:020d>@<token>" (older: the position alone)."""
    return int(value.split(b"@", 1)[0])


def _decode_snapshot(stream: str, value: bytes) -> Snapshot:
    try:
        return SNAPSHOT_DECODER.decode(value)
    except msgspec.DecodeError as error:
        raise DataError(f"snapshot of {stream!r} does not decode: {error}") from error


def _decode(value: bytes) -> EventRecord:
    try:
        return RECORD_DECODER.decode(value)
    except msgspec.DecodeError as error:
        raise DataError(f"an event in the log does not decode: {error}") from error
