"""Wake every waiter when something changed, without a lock.

asyncio.Condition with wait_for(..., timeout) can end in "Lock is not acquired" on
Python 3.11 when the waiter is cancelled while re-acquiring the lock after a
timeout; waiting on an Event has no lock to lose. ``notify`` swaps in a fresh Event
after setting the old one, so every waiter of this generation wakes and the next
ones wait for the next change.

Timeouts use ``asyncio.timeout``, never ``asyncio.wait_for``: on Python 3.11 a
cancellation that meets a just-finished inner wait is swallowed by ``wait_for``
(gh-86296), and a cancelled subscriber then waits on forever (tests/unit/test_notifier.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Notifier:
    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, timeout: float) -> bool:
        """Until the next notify (True) or the timeout (False)."""
        event = self._event
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            return False
        return True

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """True as soon as ``predicate()`` holds (checked after every notify); False
        if it still does not after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            # No await between the check above and taking the event: a notify cannot
            # slip in between them unseen.
            event = self._event
            try:
                async with asyncio.timeout(remaining):
                    await event.wait()
            except TimeoutError:
                return predicate()
        return True
