"""The authenticated test gateway (tests/support/auth_stack.py) served from its own
thread and event loop, for clients that block: schemathesis, benchmarks."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tests.support.auth_stack import ADMIN, Stack, auth_stack

T = TypeVar("T")


class ThreadedStack:
    def __init__(self, stack: Stack, loop: asyncio.AbstractEventLoop, admin: dict[str, str]) -> None:
        self.stack, self.loop, self.admin = stack, loop, admin

    @property
    def url(self) -> str:
        return self.stack.url

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)


@contextmanager
def threaded_stack(tmp_path: Path) -> Iterator[ThreadedStack]:
    """A gateway with the built-in directory and an admin session, on a loop of its own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-auth-gateway", daemon=True)
    thread.start()
    context: AbstractAsyncContextManager[Stack] = auth_stack(tmp_path, "builtin")

    async def enter() -> tuple[Stack, dict[str, str]]:
        stack = await context.__aenter__()
        return stack, await stack.session("root", ADMIN)

    try:
        stack, admin = asyncio.run_coroutine_threadsafe(enter(), loop).result(60)
        try:
            yield ThreadedStack(stack, loop, admin)
        finally:
            asyncio.run_coroutine_threadsafe(context.__aexit__(None, None, None), loop).result(60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
