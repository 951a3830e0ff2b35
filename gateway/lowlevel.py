"""problem+json for what aiohttp refuses before the application sees a request.

aiohttp's HTTP parser answers a malformed or over-long request line or header itself,
as text/plain, from ``RequestHandler.handle_error``. The runner below gives each
connection a handler whose ``handle_error`` answers problem+json instead, with a fixed
detail: aiohttp's own message quotes the offending bytes, which a client already has.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from .problems import PROBLEM_JSON, TYPE_PREFIX, Problem

# The URL ("/v1/...", C parser) or the whole line ("GET /...", Python parser); a header
# line starts with "Name:".
_REQUEST_LINE = re.compile(r"[A-Z]{1,20} [^ :]")


def low_level_problem(status: int, exc: BaseException | None) -> Problem:
    if isinstance(exc, LineTooLong):
        # args[0]: the line's first bytes (Python parser) or a description (C parser).
        what = exc.args[0] if exc.args else b""
        text = bytes(what).decode("latin-1") if isinstance(what, bytes | bytearray) else str(what)
        request_line = ("status line" in text.lower() or text.startswith(("/", "*", "http"))
                        or _REQUEST_LINE.match(text) is not None)
        field = "request line" if request_line else "headers"
        what_is = "the request line (method, path and query)" if request_line else "a header line"
        limit = exc.args[1] if len(exc.args) > 1 else "the limit of"
        return Problem(type=TYPE_PREFIX + "too-large", title="Request line or header too long", status=status,
                       detail=f"{what_is} is longer than {limit} bytes", field=field)
    if isinstance(exc, BadHttpMethod):
        return Problem(type=TYPE_PREFIX + "invalid", title="Bad request", status=status,
                       detail="the request method is not a valid HTTP method", field="method")
    if isinstance(exc, BadHttpMessage):
        return Problem(type=TYPE_PREFIX + "invalid", title="Bad request", status=status,
                       detail="the request is not well-formed HTTP/1.1")
    if status == 504:
        return Problem(type=TYPE_PREFIX + "unavailable", title="Gateway timeout", status=status,
                       detail="the gateway did not answer in time; retry")
    return Problem(type=TYPE_PREFIX + "internal", title="Internal error", status=status,
                   detail="the gateway failed unexpectedly; the error is in its log")


class ProblemRequestHandler(RequestHandler):
    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if a response was begun
        response = web.Response(body=msgspec.json.encode(low_level_problem(status, exc)), status=status,
                                content_type=PROBLEM_JSON)
        response.force_close()
        return response


class ProblemServer(web.Server):
    def __call__(self) -> RequestHandler:
        # aiohttp's Server.__call__ with our handler class (the keyword arguments are the
        # runner's: access log, line sizes, timeouts).
        return ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class ProblemAppRunner(web.AppRunner):
    """An AppRunner whose connections answer low-level errors as problem+json."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        kwargs: dict[str, Any] = dict(server._kwargs)
        problem_server = ProblemServer(server.request_handler, request_factory=server.request_factory,
                                       handler_cancellation=server.handler_cancellation,
                                       loop=asyncio.get_running_loop(), **kwargs)
        return problem_server
