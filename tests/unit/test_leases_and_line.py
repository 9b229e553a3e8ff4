"""Several processes on one database: one owner per job, and one fair line per key.

The contract (every backend): who may change a job, what a claim takes, a lease renewed or lost. On a real
PostgreSQL, with many processes' worth of connections at once: no orphan is claimed twice, the per-key cap is never
exceeded however many processes give slots at once, and the database's fair order is the in-memory queue's.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest

from bot.jobs.fair_queue import FairQueue
from bot.jobs.leases import Revivals
from bot.jobs.shared_queue import fair_order
from bot.storage.ports import Storage
from bot.storage.postgres import PostgresStorage
from bot.storage.sqlite import SqliteStorage
from tests.unit.test_storage import new_job


async def test_a_job_is_changed_only_by_its_owner_but_anyone_may_cancel_it_while_it_waits(tmp_path):
    path = tmp_path / "bot.sqlite3"
    async with SqliteStorage.open(path, owner="a") as a, SqliteStorage.open(path, owner="b") as b:
        await a.jobs.insert(new_job("1" * 32))
        assert not await b.jobs.mark_submitting("1" * 32)  # not b's
        assert await b.jobs.finish_failure("1" * 32, kind="cancelled", detail="3", only_queued=True)
        await a.jobs.insert(new_job("2" * 32))
        assert await a.jobs.mark_submitting("2" * 32)
        assert not await b.jobs.finish_failure("2" * 32, kind="cancelled", detail="3", only_queued=True)  # sent


async def test_what_a_claim_takes(tmp_path):
    path = tmp_path / "bot.sqlite3"
    async with (
        SqliteStorage.open(path, owner="a", lease_seconds=30) as a,
        SqliteStorage.open(path, owner="b", lease_seconds=30) as b,
    ):
        await a.jobs.insert(new_job("1" * 32))  # a's, lease running
        await a.jobs.insert(new_job("2" * 32, created_at=time.time() + 1))
        await a.db.execute("UPDATE jobs SET lease_expires_at = 0 WHERE id = ?", ("2" * 32,))  # a stopped renewing
        assert [job.id for job in await b.leases.claim(limit=10)] == ["2" * 32]
        assert await b.leases.claim(limit=10) == []  # nothing else is free
        assert {job.id for job in await a.leases.claim(limit=10, mine=True)} == {"1" * 32}  # a restart of a
        assert await a.leases.renew() == {"1" * 32}  # "2..." is b's now
        assert await b.jobs.mark_submitting("2" * 32) and not await a.jobs.mark_submitting("2" * 32)
        assert await a.leases.release() == 1
        assert {job.id for job in await b.leases.claim(limit=10)} == {"1" * 32}  # handed over at once
        assert await b.leases.renew() == {"1" * 32, "2" * 32}
        claimed = await a.leases.claim(limit=10, everything=True)  # the only process, at start: everything
        assert {job.id for job in claimed} == {"1" * 32, "2" * 32} and all(job.owner == "a" for job in claimed)


async def test_shown_jobs_are_never_claimed(storage: Storage):
    await storage.jobs.insert(new_job("1" * 32))
    await storage.jobs.mark_posted("1" * 32)
    assert await storage.leases.claim(limit=10, everything=True) == []
    assert await storage.leases.renew() == set()


async def test_the_line_gives_slots_in_the_fair_order_and_never_beyond_the_cap(storage: Storage):
    now = time.time()
    jobs = [new_job(f"{n:032x}", user_id=user, created_at=now + n) for n, user in enumerate([1, 1, 1, 2, 3])]
    for job in jobs:
        await storage.jobs.insert(job)
        assert not await storage.queue.enqueue(job.id, "k")
    granted = [job_id for job_id, _ in await storage.queue.grant("k", 2, now)]
    assert granted == [jobs[0].id, jobs[3].id]  # member 1, then member 2 (not 1's second job)
    assert await storage.queue.grant("k", 2, now) == []  # two at ModelsLab: the cap
    assert await storage.jobs.mark_submitting(jobs[0].id) and await storage.jobs.finish_failure(
        jobs[0].id, kind="generation_failed", detail="x"
    )
    assert [j for j, _ in await storage.queue.grant("k", 2, now)] == [jobs[4].id]  # member 3's turn
    state = await storage.queue.line("k")
    assert fair_order(state.waiting) == [jobs[1].id, jobs[2].id]
    until = await storage.queue.pause("k", now + 30)
    assert until == now + 30 and await storage.queue.pause("k", now + 5) == now + 30  # a later pause wins
    await storage.jobs.mark_submitting(jobs[3].id)
    await storage.jobs.finish_failure(jobs[3].id, kind="generation_failed", detail="x")
    assert await storage.queue.grant("k", 2, now + 10) == []  # paused
    assert [j for j, _ in await storage.queue.grant("k", 2, now + 31)] == [jobs[1].id]


async def test_a_job_sent_back_goes_first_and_keeps_its_slot_across_a_restart(storage: Storage):
    now = time.time()
    first, second = new_job("1" * 32, user_id=1), new_job("2" * 32, user_id=2, created_at=now + 1)
    for job in (first, second):
        await storage.jobs.insert(job)
        await storage.queue.enqueue(job.id, "k")
    assert [j for j, _ in await storage.queue.grant("k", 1, now)] == [first.id]
    assert await storage.queue.enqueue(first.id, "k")  # its process stopped before sending it: it holds its slot
    await storage.jobs.mark_submitting(first.id)
    await storage.jobs.requeue(first.id, retry_after=1)  # ModelsLab sent it back (429)
    assert not await storage.queue.enqueue(first.id, "k", first=True)
    assert [j for j, _ in await storage.queue.grant("k", 1, now)] == [first.id]  # ahead of member 2


async def test_an_identical_payload_waits_out_the_window_whoever_sends_it(storage: Storage):
    now = time.time()
    assert await storage.queue.claim_payload("k", "p", now, 30) is None
    assert await storage.queue.claim_payload("k", "p", now + 10, 30) == now
    await storage.queue.stamp_payload("k", "p", now + 12)  # answered then: the window counts from there
    assert await storage.queue.claim_payload("k", "p", now + 35, 30) == now + 12
    assert await storage.queue.claim_payload("k", "p", now + 42.5, 30) is None


async def test_the_databases_fair_order_is_the_in_memory_queues(storage: Storage):
    """The same arrivals, turns and sends back (429s) in `FairQueue` and in the database's line: the same order of
    turns, and the same places in line (`fair_order`) as `FairQueue.waiting_jobs`."""
    rng = random.Random(7)
    now = time.time()
    for round_ in range(12):
        key, memory = f"k{round_}", FairQueue(1)
        users = {f"{round_:08x}{n:024x}": rng.randint(1, 5) for n in range(rng.randint(4, 14))}
        for n, (job_id, user) in enumerate(users.items()):
            await storage.jobs.insert(new_job(job_id, user_id=user, created_at=now + n))
            await storage.queue.enqueue(job_id, key)
            memory.enqueue(key, job_id, user)
        pending, sent_back = set(users), set()
        db_turns = [job_id for job_id, _owner in await storage.queue.grant(key, 1, now)]
        while pending:
            [holder] = [job_id for job_id in pending if memory.position(job_id) is None]
            assert db_turns == [holder]
            assert fair_order((await storage.queue.line(key)).waiting) == memory.waiting_jobs(key)
            await storage.jobs.mark_submitting(holder)
            if holder not in sent_back and rng.random() < 0.2:  # ModelsLab sent it back: it joins again, first
                sent_back.add(holder)
                await storage.jobs.requeue(holder, retry_after=1)
                memory.release(holder)
                db_turns = [job_id for job_id, _owner in await storage.queue.grant(key, 1, now)]
                memory.enqueue(key, holder, users[holder], first=True)
                await storage.queue.enqueue(holder, key, first=True)
            else:
                await storage.jobs.finish_failure(holder, kind="generation_failed", detail="x")
                memory.release(holder)
                pending.discard(holder)
                db_turns = []
            db_turns += [job_id for job_id, _owner in await storage.queue.grant(key, 1, now)]


# ---------------------------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
async def processes(postgres_url: str) -> AsyncIterator[list[PostgresStorage]]:
    """Twelve processes' storages on one database, each its own pool and owner."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(PostgresStorage.open(postgres_url, pool_size=2, owner=f"p{n}"))
            for n in range(12)
        ]


async def test_twelve_processes_claiming_at_once_never_take_the_same_job(processes: list[PostgresStorage]):
    now = time.time()
    for n in range(60):
        await processes[0].jobs.insert(new_job(f"{n:032x}", created_at=now + n))
    await processes[0].db.execute("UPDATE jobs SET owner = NULL")  # every job an orphan

    async def claim_all(storage: PostgresStorage) -> list[str]:
        taken: list[str] = []
        while batch := await storage.leases.claim(limit=3):
            taken.extend(job.id for job in batch)
        return taken

    claims = await asyncio.gather(*(claim_all(storage) for storage in processes))
    every = [job_id for taken in claims for job_id in taken]
    assert len(every) == len(set(every)) == 60
    assert sum(1 for taken in claims if taken) > 1  # they really raced


async def test_twelve_processes_giving_slots_at_once_never_pass_the_cap(processes: list[PostgresStorage]):
    limit, now = 3, time.time()
    jobs = [new_job(f"{n:032x}", user_id=n % 7, created_at=now + n) for n in range(80)]
    for job in jobs:
        await processes[0].jobs.insert(job)
        await processes[0].queue.enqueue(job.id, "k")
    granted: list[str] = []
    for _round in range(10):
        results = await asyncio.gather(*(storage.queue.grant("k", limit, now) for storage in processes))
        round_granted = [job_id for result in results for job_id, _ in result]
        active = await processes[0].db.fetchval(
            "SELECT COUNT(*) FROM jobs WHERE key_ref = 'k' AND (status IN ('submitting', 'processing')"
            " OR (status = 'queued' AND granted_at IS NOT NULL))"
        )
        assert active <= limit and len(round_granted) <= limit
        granted.extend(round_granted)
        for job_id in round_granted:  # sent, and finished: their slots free up for the next round
            owner = processes[0]
            await owner.jobs.mark_submitting(job_id)
            await owner.jobs.finish_failure(job_id, kind="generation_failed", detail="x")
    assert len(granted) == len(set(granted)) == 30
    assert granted[:7] == [jobs[n].id for n in range(7)]  # one job of each of the 7 members first


def test_a_job_whose_driver_stopped_is_carried_on_at_once_then_ever_more_patiently():
    revivals = Revivals(first=5, most=20)
    assert revivals.due({"a", "b"}, now=100) == ["a", "b"]  # the first time: at once
    assert revivals.due({"a", "b"}, now=104.9) == []
    assert revivals.due({"a"}, now=105) == ["a"]  # b is shown (no longer an orphan): forgotten
    assert revivals.due({"a", "b"}, now=105) == ["b"]  # b again, as new: at once
    assert revivals.due({"a"}, now=114.9) == []  # a's second pause is 10 s
    assert revivals.due({"a"}, now=115) == ["a"]
    assert revivals.due({"a"}, now=134.9) == []  # then 20 s, the most
    assert revivals.due({"a"}, now=135) == ["a"]
    assert revivals.due({"a"}, now=154.9) == []
    assert revivals.due({"a"}, now=155) == ["a"]
    assert revivals.due(set(), now=156) == []


async def test_a_job_is_lost_only_when_another_process_owns_it(tmp_path):
    path = tmp_path / "bot.sqlite3"
    async with SqliteStorage.open(path, owner="a") as a, SqliteStorage.open(path, owner="b") as b:
        for job_id in ("1" * 32, "2" * 32, "3" * 32):
            await a.jobs.insert(new_job(job_id))
        await a.jobs.mark_posted("1" * 32)  # shown: no longer renewed, but still a's
        await a.db.execute("UPDATE jobs SET lease_expires_at = 0 WHERE id = ?", ("2" * 32,))
        await b.leases.claim(limit=1)  # b takes "2..."
        assert await a.leases.renew() == {"3" * 32}
        assert await a.leases.taken({"1" * 32, "2" * 32}) == {"2" * 32}


async def test_two_processes_share_one_line_its_cap_its_order_and_its_places(postgres_url: str):
    """`SharedQueue` in two processes: waiters of both are served in one fair order within one cap, a slot given by
    one process reaches a job waiting in the other, and each process shows the same places in line."""
    from bot.jobs.shared_queue import SharedQueue

    async with AsyncExitStack() as stack:
        storages = [
            await stack.enter_async_context(PostgresStorage.open(postgres_url, owner=f"p{n}")) for n in range(2)
        ]
        queues = []
        for storage in storages:
            await storage.events.start()
            queues.append(SharedQueue(storage.queue, 1, storage.events))
        now = time.time()
        # Members 1 and 2 each have two jobs; member 1's in process 0, member 2's in process 1.
        jobs = {
            "a1": (0, 1, now),
            "b1": (1, 2, now + 1),
            "a2": (0, 1, now + 2),
            "b2": (1, 2, now + 3),
        }
        ids = {name: f"{n:032x}" for n, name in enumerate(jobs)}
        for name, (process, user, created) in jobs.items():
            await storages[process].jobs.insert(new_job(ids[name], user_id=user, created_at=created))
            queues[process].enqueue("k", ids[name], user)
            await asyncio.sleep(0)  # the order they join in is the order they were made

        async def settled() -> None:
            """Until neither process has database work under way (joining the line, giving slots, reading it)."""
            while pending := [task for queue in queues for task in queue._tasks]:
                await asyncio.gather(*pending, return_exceptions=True)

        await settled()
        expected = ["a1", "b1", "a2", "b2"]  # round robin by member, across the two processes
        order: list[str] = []
        while jobs:
            turns = {name: asyncio.ensure_future(queues[p].wait_turn(ids[name])) for name, (p, _, _) in jobs.items()}
            done, _pending = await asyncio.wait(turns.values(), return_when=asyncio.FIRST_COMPLETED, timeout=10)
            granted = [name for name, turn in turns.items() if turn in done]
            for turn in turns.values():
                turn.cancel()
            assert len(granted) == 1  # the cap: one at a time, whichever process waits
            order += granted
            await settled()
            for queue in queues:  # each process reads the line: the same places for everyone still waiting
                await queue._refresh("k")
            waiting = [name for name in expected if name in jobs and name not in granted]
            for place, name in enumerate(waiting, start=1):
                assert queues[jobs[name][0]].position(ids[name]) == (place, len(waiting))
            process = jobs.pop(granted[0])[0]
            await storages[process].jobs.mark_submitting(ids[granted[0]])
            await storages[process].jobs.finish_failure(ids[granted[0]], kind="generation_failed", detail="x")
            queues[process].release(ids[granted[0]])
        assert order == expected
        for queue in queues:
            await queue.close()
