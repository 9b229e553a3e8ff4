"""The bot's own queue: a limit per key, round robin by member, pauses, cancellation, positions."""

from __future__ import annotations

import asyncio

import pytest

from bot.jobs.fair_queue import Cancelled, FairQueue


async def granted(queue: FairQueue, job_id: str) -> bool:
    task = asyncio.ensure_future(queue.wait_turn(job_id))
    await asyncio.sleep(0)
    done = task.done()
    task.cancel()
    return done and not task.cancelled()


async def test_at_most_the_limit_per_key_and_keys_are_separate():
    queue = FairQueue(2)
    for n in range(4):
        queue.enqueue("k1", f"a{n}", user_id=1)
    queue.enqueue("k2", "b0", user_id=1)
    assert [await granted(queue, f"a{n}") for n in range(4)] == [True, True, False, False]
    assert await granted(queue, "b0")
    assert queue.active_count("k1") == 2
    queue.release("a0")
    assert await granted(queue, "a2") and not await granted(queue, "a3")


async def test_the_member_served_least_recently_goes_next():
    queue = FairQueue(1)
    queue.enqueue("k", "a0", user_id=1)  # granted at once: member 1 was just served
    for n in range(1, 4):
        queue.enqueue("k", f"a{n}", user_id=1)
    queue.enqueue("k", "b0", user_id=2)
    assert queue.waiting_jobs("k") == ["b0", "a1", "a2", "a3"]
    queue.release("a0")
    assert await granted(queue, "b0")


async def test_round_robin_by_member():
    queue = FairQueue(1)
    queue.hold("k", "running", user_id=99)
    for n in range(5):
        queue.enqueue("k", f"a{n}", user_id=1)
    queue.enqueue("k", "b0", user_id=2)
    queue.enqueue("k", "c0", user_id=3)
    assert queue.waiting_jobs("k") == ["a0", "b0", "c0", "a1", "a2", "a3", "a4"]
    assert queue.position("b0") == (2, 7)
    order = []
    current = "running"
    for _ in range(7):
        queue.release(current)
        [current] = [
            j for j in ("a0", "a1", "a2", "a3", "a4", "b0", "c0") if j not in order and await granted(queue, j)
        ]
        order.append(current)
    assert order == ["a0", "b0", "c0", "a1", "a2", "a3", "a4"]


async def test_a_job_sent_back_goes_first_and_a_paused_key_grants_nothing():
    queue = FairQueue(1)
    queue.enqueue("k", "a", user_id=1)
    queue.enqueue("k", "b", user_id=2)
    assert await granted(queue, "a")
    queue.pause("k", 0.05)  # ModelsLab said 429: the key pauses, and the job goes back in line, at the head
    queue.release("a")
    queue.enqueue("k", "a", user_id=1, first=True)
    assert queue.waiting_jobs("k") == ["a", "b"]
    assert not await granted(queue, "a") and queue.paused_for("a") > 0
    await asyncio.wait_for(queue.wait_turn("a"), timeout=2)
    assert not await granted(queue, "b")


async def test_cancel_takes_a_waiting_job_out_but_never_a_running_one():
    queue = FairQueue(1)
    queue.enqueue("k", "a", user_id=1)
    queue.enqueue("k", "b", user_id=1)
    assert not queue.cancel("a")  # already holds the slot
    assert queue.cancel("b")
    with pytest.raises(Cancelled):
        await queue.wait_turn("b")
    assert queue.waiting_jobs("k") == []


async def test_changes_are_announced_per_key():
    seen: list[str] = []
    queue = FairQueue(1, on_change=seen.append)
    queue.enqueue("k", "a", user_id=1)
    queue.enqueue("k", "b", user_id=1)
    queue.release("a")
    assert seen and set(seen) == {"k"}
