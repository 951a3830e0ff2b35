"""A thin asyncio etcd v3 client: the few calls ucloud needs, done completely.

Why not a ready client: python-etcd3 does not import with protobuf >= 4 and ignores
``limit`` and ``revision`` on ranges; aetcd (asyncio, current grpcio/protobuf) builds
no ``limit``/``revision`` either and talks to one endpoint only. We keep aetcd for
what it does well, the generated etcd v3 gRPC stubs, and add here: ranges with
limit/revision/sort, transactions on raw protobuf ops, watches that report
compaction, single lease refreshes, fail-over across the endpoints of a cluster, and
TLS (server verification, client certificates) with etcd's user/password
authentication. Every gRPC error becomes an ``UnavailableError``, ``AccessDenied``
or ``DataError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aetcd import rpc

from .errors import AccessDenied, DataError, UnavailableError

log = logging.getLogger(__name__)

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN}

# Compare/RequestOp builders, so callers never touch protobuf enums directly.
Compare = rpc.Compare
RequestOp = rpc.RequestOp


def prefix_end(prefix: bytes) -> bytes:
    """The range end that selects every key starting with ``prefix``."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


def cmp_version(key: bytes, op: str, version: int) -> rpc.Compare:
    return rpc.Compare(key=key, target=rpc.Compare.VERSION, result=_OPS[op], version=version)


def cmp_value(key: bytes, op: str, value: bytes) -> rpc.Compare:
    return rpc.Compare(key=key, target=rpc.Compare.VALUE, result=_OPS[op], value=value)


def cmp_mod(key: bytes, op: str, revision: int) -> rpc.Compare:
    return rpc.Compare(key=key, target=rpc.Compare.MOD, result=_OPS[op], mod_revision=revision)


def cmp_create(key: bytes, op: str, revision: int) -> rpc.Compare:
    return rpc.Compare(key=key, target=rpc.Compare.CREATE, result=_OPS[op], create_revision=revision)


_OPS = {
    "==": rpc.Compare.EQUAL,
    "!=": rpc.Compare.NOT_EQUAL,
    "<": rpc.Compare.LESS,
    ">": rpc.Compare.GREATER,
}


def op_put(key: bytes, value: bytes, lease: int = 0) -> rpc.RequestOp:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def op_get(key: bytes, range_end: bytes | None = None, *, limit: int = 0, keys_only: bool = False,
           descending: bool = False) -> rpc.RequestOp:
    return rpc.RequestOp(request_range=_range_request(key, range_end, limit=limit, keys_only=keys_only,
                                                      descending=descending))


def op_delete(key: bytes, range_end: bytes | None = None) -> rpc.RequestOp:
    request = rpc.DeleteRangeRequest(key=key)
    if range_end is not None:
        request.range_end = range_end
    return rpc.RequestOp(request_delete_range=request)


def _range_request(key: bytes, range_end: bytes | None, *, limit: int = 0, revision: int = 0,
                   keys_only: bool = False, descending: bool = False,
                   serializable: bool = False) -> rpc.RangeRequest:
    request = rpc.RangeRequest(key=key, limit=limit, revision=revision, keys_only=keys_only,
                               serializable=serializable)
    if range_end is not None:
        request.range_end = range_end
    if descending:
        request.sort_order = rpc.RangeRequest.DESCEND
        request.sort_target = rpc.RangeRequest.KEY
    return request


@dataclass(frozen=True)
class EtcdSecurity:
    """How to reach an etcd that runs with TLS and/or authentication.

    TLS is on when a CA or a client certificate is given: the server's certificate is
    verified against ``ca_file`` (the system's roots when omitted), and ``cert_file`` with
    ``key_file`` is the client's certificate (etcd's --client-cert-auth). ``user`` with
    ``password_file`` authenticates with etcd's own users and roles; the password is read
    from a file so it never stands in a URL, a command line or the log. ``server_name``
    overrides the name checked in the server's certificate (a member reached by address)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    user: str | None = None
    password_file: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("a client certificate needs both cert and key")
        if bool(self.user) != bool(self.password_file):
            raise ValueError("etcd authentication needs both user and password_file")

    @property
    def tls(self) -> bool:
        return bool(self.ca_file or self.cert_file)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "CA certificate") if self.ca_file else None,
            private_key=_read(self.key_file, "client key") if self.key_file else None,
            certificate_chain=_read(self.cert_file, "client certificate") if self.cert_file else None,
        )

    def password(self) -> str:
        assert self.password_file is not None
        return _read(self.password_file, "etcd password").decode().rstrip("\r\n")


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"cannot read the {what} {path}: {error.strerror}") from None


class TxnBuilder:
    """Builds one TxnRequest in place. Group commit builds a transaction of hundreds of
    ops per batch; adding them in place is about twice as fast as composing messages
    and copying them into the request."""

    __slots__ = ("request", "_compare", "_success", "_failure")

    def __init__(self) -> None:
        self.request = rpc.TxnRequest()
        self._compare = self.request.compare
        self._success = self.request.success
        self._failure = self.request.failure

    def compare_version(self, key: bytes, op: str, version: int) -> None:
        c = self._compare.add()
        c.key = key
        c.target = rpc.Compare.VERSION
        c.result = _OPS[op]
        c.version = version

    def compare_value(self, key: bytes, op: str, value: bytes) -> None:
        c = self._compare.add()
        c.key = key
        c.target = rpc.Compare.VALUE
        c.result = _OPS[op]
        c.value = value

    def put(self, key: bytes, value: bytes) -> None:
        put = self._success.add().request_put
        put.key = key
        put.value = value

    def get_on_failure(self, key: bytes, *, keys_only: bool = False) -> None:
        get = self._failure.add().request_range
        get.key = key
        if keys_only:
            get.keys_only = True

    def __len__(self) -> int:
        return max(len(self._compare), len(self._success), len(self._failure))


@dataclass(frozen=True)
class KV:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class RangeResult:
    kvs: list[KV]
    more: bool
    revision: int


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    responses: Sequence[Any]  # rpc.ResponseOp; use range_kvs() for range responses
    revision: int


def range_kvs(response: Any) -> list[KV]:
    return [_kv(kv) for kv in response.response_range.kvs]


def _kv(kv: Any) -> KV:
    return KV(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


class WatchCompacted(Exception):
    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"watch start revision was compacted (now {compact_revision})")
        self.compact_revision = compact_revision


class EtcdClient:
    """Connects to one of ``endpoints`` ("host:port") and fails over to the next.

    A unary call that fails with UNAVAILABLE is retried on the next endpoint when it
    is a read; writes are not retried here, because only the caller can tell whether
    a write that may have happened is safe to repeat.
    """

    def __init__(self, endpoints: Sequence[str], *, timeout: float = 5.0, max_message: int = 64 * 1024 * 1024,
                 security: EtcdSecurity | None = None):
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.security = security or EtcdSecurity()
        self._token: str | None = None  # etcd's auth token, per connection
        self._options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_message),
            ("grpc.max_receive_message_length", max_message),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1_000),
        ]
        self._index = 0
        self._channel: grpc.aio.Channel | None = None
        self._kv: Any = None
        self._watch: Any = None
        self._lease: Any = None
        self._maintenance: Any = None
        self._cluster: Any = None
        self._auth: Any = None
        self._closers: set[asyncio.Task[None]] = set()
        if self.security.server_name:
            self._options.append(("grpc.ssl_target_name_override", self.security.server_name))

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._index % len(self.endpoints)]

    def _connect(self) -> None:
        if self._channel is None:
            if self.security.tls:
                self._channel = grpc.aio.secure_channel(
                    self.endpoint, self.security.channel_credentials(), options=self._options)
            else:
                self._channel = grpc.aio.insecure_channel(self.endpoint, options=self._options)
            self._token = None
            self._auth = rpc.AuthStub(self._channel)
            self._kv = rpc.KVStub(self._channel)
            self._watch = rpc.WatchStub(self._channel)
            self._lease = rpc.LeaseStub(self._channel)
            self._maintenance = rpc.MaintenanceStub(self._channel)
            self._cluster = rpc.ClusterStub(self._channel)

    async def _fail_over(self, broken: grpc.aio.Channel | None) -> None:
        """Move to the next endpoint unless another call already did."""
        if broken is None or self._channel is not broken:
            return
        closing: grpc.aio.Channel = broken
        self._channel = None
        self._token = None
        self._index += 1
        log.info("etcd: failing over to %s", self.endpoint)
        # Closing a channel cancels every call still on it, and grpc.aio reports that as
        # asyncio.CancelledError in the awaiting task: other callers (a watch, a commit
        # in flight) would look cancelled. So the old channel gets a grace period in
        # which those calls end by themselves (each has a deadline; a watch breaks).
        closer = asyncio.get_running_loop().create_task(closing.close(grace=self.timeout + 1))
        self._closers.add(closer)
        closer.add_done_callback(self._closers.discard)

    async def _call(self, stub_name: str, method: str, request: Any, *, retry: bool,
                    timeout: float | None = None) -> Any:
        attempts = len(self.endpoints) * 3 if retry else 1
        last: grpc.aio.AioRpcError | None = None
        reauthenticated = False
        attempt = 0
        while attempt < attempts:
            self._connect()
            channel = self._channel
            endpoint = self.endpoint
            stub = getattr(self, stub_name)
            try:
                metadata = await self._credentials()
                return await getattr(stub, method)(request, timeout=timeout or self.timeout, metadata=metadata)
            except grpc.aio.AioRpcError as error:
                last = error
                if _token_expired(error) and not reauthenticated:
                    # etcd refused the token before doing anything, so even a write is
                    # safe to send again: authenticate afresh, once.
                    self._token, reauthenticated = None, True
                    continue
                # CANCELLED on a channel that another call has since abandoned (fail-over
                # closes it) is a broken connection, not the caller's cancellation.
                abandoned = error.code() == grpc.StatusCode.CANCELLED and channel is not self._channel
                if error.code() not in _RETRYABLE and not abandoned:
                    raise _translate(error, endpoint) from error
                await self._fail_over(channel)
                if attempt + 1 < attempts:
                    await asyncio.sleep(min(0.05 * (attempt + 1), 0.5))
            except grpc.aio.UsageError as error:
                # "Channel is closed": a concurrent fail-over closed it under us.
                if channel is self._channel or not retry or attempt + 1 == attempts:
                    raise UnavailableError(f"etcd {endpoint}: {error}") from error
            except asyncio.CancelledError:
                if _really_cancelled():
                    raise
                # The call, not our task, was cancelled: its channel was closed.
                if not retry or attempt + 1 == attempts:
                    raise UnavailableError(f"etcd {endpoint}: the connection was closed") from None
            attempt += 1
        assert last is not None
        raise _translate(last, self.endpoint) from last

    async def _credentials(self) -> tuple[tuple[str, str], ...] | None:
        """The metadata that authenticates a call: etcd's token, fetched once per connection."""
        if not self.security.user:
            return None
        if self._token is None:
            # Raises grpc's own error: callers handle it like that of the call it precedes.
            request = rpc.AuthenticateRequest(name=self.security.user, password=self.security.password())
            response = await self._auth.Authenticate(request, timeout=self.timeout)
            self._token = response.token
        return (("token", self._token),)

    # -- KV ---------------------------------------------------------------------

    async def range(self, key: bytes, range_end: bytes | None = None, *, limit: int = 0, revision: int = 0,
                    keys_only: bool = False, descending: bool = False, serializable: bool = False) -> RangeResult:
        request = _range_request(key, range_end, limit=limit, revision=revision, keys_only=keys_only,
                                 descending=descending, serializable=serializable)
        response = await self._call("_kv", "Range", request, retry=True)
        return RangeResult([_kv(kv) for kv in response.kvs], response.more, response.header.revision)

    async def range_raw(self, key: bytes, range_end: bytes | None = None, *, limit: int = 0) -> Any:
        """The RangeResponse protobuf itself: for bulk reads, where building a KV per key
        costs more than the caller's own decoding."""
        request = _range_request(key, range_end, limit=limit)
        return await self._call("_kv", "Range", request, retry=True)

    async def get(self, key: bytes) -> KV | None:
        result = await self.range(key)
        return result.kvs[0] if result.kvs else None

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        response = await self._call("_kv", "Put", rpc.PutRequest(key=key, value=value, lease=lease), retry=False)
        return response.header.revision

    async def delete(self, key: bytes, range_end: bytes | None = None) -> int:
        request = rpc.DeleteRangeRequest(key=key)
        if range_end is not None:
            request.range_end = range_end
        response = await self._call("_kv", "DeleteRange", request, retry=False)
        return response.deleted

    async def txn(self, compare: Sequence[rpc.Compare], success: Sequence[rpc.RequestOp],
                  failure: Sequence[rpc.RequestOp] = (), *, read_only: bool = False,
                  timeout: float | None = None) -> TxnResult:
        """One transaction. A ``read_only`` one (only range ops) is retried across
        endpoints like a read; any other is tried once, because only the caller can tell
        whether a write that may have happened is safe to repeat."""
        request = rpc.TxnRequest(compare=compare, success=success, failure=failure)
        return await self.txn_request(request, read_only=read_only, timeout=timeout)

    async def txn_request(self, request: rpc.TxnRequest, *, read_only: bool = False,
                          timeout: float | None = None) -> TxnResult:
        """A transaction built elsewhere (see TxnBuilder); retried as ``txn`` is."""
        response = await self._call("_kv", "Txn", request, retry=read_only, timeout=timeout)
        return TxnResult(response.succeeded, response.responses, response.header.revision)

    async def compact(self, revision: int, physical: bool = True) -> None:
        await self._call("_kv", "Compact", rpc.CompactionRequest(revision=revision, physical=physical), retry=True)

    # -- leases -----------------------------------------------------------------

    async def lease_grant(self, ttl: int) -> int:
        response = await self._call("_lease", "LeaseGrant", rpc.LeaseGrantRequest(TTL=ttl), retry=True)
        return response.ID

    async def lease_revoke(self, lease_id: int) -> None:
        await self._call("_lease", "LeaseRevoke", rpc.LeaseRevokeRequest(ID=lease_id), retry=True)

    async def lease_keepalive_once(self, lease_id: int) -> int:
        """Refresh a lease; return the remaining TTL (0 or less: the lease is gone)."""
        self._connect()
        channel = self._channel
        try:
            call = self._lease.LeaseKeepAlive(timeout=self.timeout, metadata=await self._credentials())
            await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
            await call.done_writing()
            response = await call.read()
        except grpc.aio.AioRpcError as error:
            if error.code() in _RETRYABLE:
                await self._fail_over(channel)
            raise _translate(error, self.endpoint) from error
        except grpc.aio.UsageError as error:
            raise UnavailableError(f"etcd {self.endpoint}: {error}") from error
        except asyncio.CancelledError:
            if _really_cancelled():
                raise
            raise UnavailableError(f"etcd {self.endpoint}: the connection was closed") from None
        if response is grpc.aio.EOF:
            return 0
        return response.TTL

    # -- cluster ----------------------------------------------------------------

    async def status(self) -> Any:
        return await self._call("_maintenance", "Status", rpc.StatusRequest(), retry=True)

    async def members(self) -> Any:
        return await self._call("_cluster", "MemberList", rpc.MemberListRequest(), retry=True)

    # -- watch ------------------------------------------------------------------

    async def watch(self, key: bytes, range_end: bytes | None = None, *, start_revision: int = 0,
                    progress_notify: bool = True) -> AsyncIterator[list[KV]]:
        """Yield the changed key-values of each watch response.

        Raises WatchCompacted if ``start_revision`` is compacted, UnavailableError if
        the stream breaks; the caller decides how to resume (by re-reading state)."""
        self._connect()
        channel = self._channel
        create = rpc.WatchCreateRequest(key=key, start_revision=start_revision, progress_notify=progress_notify)
        if range_end is not None:
            create.range_end = range_end
        endpoint = self.endpoint
        call = self._watch.Watch(metadata=await self._credentials())
        try:
            await call.write(rpc.WatchRequest(create_request=create))
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise UnavailableError(f"etcd {endpoint}: watch stream ended")
                if response.compact_revision:
                    raise WatchCompacted(response.compact_revision)
                if response.canceled:
                    raise UnavailableError(f"etcd {endpoint}: watch cancelled: {response.cancel_reason}")
                if response.events:
                    yield [_kv(event.kv) for event in response.events]
        except grpc.aio.AioRpcError as error:
            if error.code() in _RETRYABLE:
                await self._fail_over(channel)
            raise _translate(error, endpoint) from error
        except (grpc.aio.UsageError, asyncio.InvalidStateError) as error:
            # The channel was closed under the stream by a fail-over elsewhere.
            raise UnavailableError(f"etcd {endpoint}: watch stream broke: {error!r}") from error
        except asyncio.CancelledError:
            if _really_cancelled():
                raise
            raise UnavailableError(f"etcd {endpoint}: watch stream closed with its channel") from None
        finally:
            call.cancel()

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()
        for closer in list(self._closers):
            closer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await closer


def _really_cancelled() -> bool:
    """Whether the running task itself is being cancelled (rather than a gRPC call
    cancelled under it, which grpc.aio also reports as CancelledError)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _token_expired(error: grpc.aio.AioRpcError) -> bool:
    return "invalid auth token" in (error.details() or "")


def _translate(error: grpc.aio.AioRpcError, endpoint: str) -> Exception:
    message = f"etcd {endpoint}: {error.code().name}: {error.details()}"
    if error.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED) or (
            "authentication failed" in (error.details() or "")):
        return AccessDenied(message)
    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (error.details() or ""):
        # gRPC's message size limit (etcd's --max-request-bytes plus overhead): the
        # request itself is at fault, retrying it cannot help.
        return DataError(message)
    if error.code() in _RETRYABLE or error.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return UnavailableError(message)
    return DataError(message)
