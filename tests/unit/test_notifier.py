"""A waiter on the Notifier that is cancelled must end cancelled, even when the notify it
waited for arrives in the same turn of the loop.

Python 3.11's ``asyncio.wait_for`` returns the inner result instead of raising when a
cancellation meets a just-finished inner wait (gh-86296): the cancellation is lost, the
task goes on waiting, and whoever awaits it after cancelling (every process manager's
reader, on each stop or take-over) waits forever. CI saw exactly that: the IPAM test's
two allocators never stopped."""

from __future__ import annotations

import asyncio

import pytest

from ucloud.eventstore.notify import Notifier


async def _follower(notifier: Notifier, how: str) -> None:
    """Waits in a loop, as a subscription does: only a cancellation ends it."""
    while True:
        if how == "wait":
            await notifier.wait(30)
        else:
            await notifier.wait_until(lambda: False, 30)


@pytest.mark.parametrize("turns", [0, 1, 2])
@pytest.mark.parametrize("how", ["wait", "wait_until"])
async def test_a_cancel_meeting_a_notify_is_not_lost(how: str, turns: int) -> None:
    """Cancelled 0, 1 or 2 turns of the loop after the notify it waited for."""
    notifier = Notifier()
    task = asyncio.create_task(_follower(notifier, how))
    for _ in range(3):
        await asyncio.sleep(0)  # the task is waiting now
    notifier.notify()
    for _ in range(turns):
        await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done, "the cancelled follower is still waiting"
    assert task.cancelled()


async def test_a_waiter_wakes_on_notify_and_times_out_without() -> None:
    notifier = Notifier()
    waiting = asyncio.create_task(notifier.wait(30))
    await asyncio.sleep(0)
    notifier.notify()
    assert await waiting is True
    assert await notifier.wait(0.01) is False
    flag = False

    def later() -> None:
        nonlocal flag
        flag = True
        notifier.notify()
    asyncio.get_running_loop().call_later(0.01, later)
    assert await notifier.wait_until(lambda: flag, 30) is True
    assert await notifier.wait_until(lambda: False, 0.01) is False
