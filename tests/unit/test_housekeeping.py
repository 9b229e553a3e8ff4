"""Housekeeping on a real database: old members' pictures and expired tokens go, in batches, on a timer, and a
failure is logged without stopping anything."""

from __future__ import annotations

import logging
import time

import pytest

from bot.jobs.housekeeping import INPUT_RETENTION, Housekeeping
from bot.storage.ports import Storage
from bot.storage.sqlite import SqliteStorage
from tests.unit.test_storage import new_job

DAY = 86400.0


async def shown_job_with_picture(storage: Storage, job_id: str) -> None:
    await storage.jobs.insert(new_job(job_id))
    await storage.jobs.save_input(job_id, b"png-" + job_id.encode(), 64, 64)
    await storage.jobs.mark_posted(job_id)


async def test_a_round_deletes_old_pictures_of_shown_jobs_and_expired_tokens_only(storage: Storage):
    now = time.time()
    await shown_job_with_picture(storage, "a" * 32)
    await storage.jobs.insert(new_job("b" * 32))  # not shown yet: its picture is still needed
    await storage.jobs.save_input("b" * 32, b"png-b", 64, 64)
    await storage.jobs.insert(new_job("c" * 32, interaction_token="expired", token_expires_at=now + 900))
    await storage.jobs.insert(new_job("d" * 32, interaction_token="fresh", token_expires_at=now + 2 * DAY))

    # Within the day: nothing goes.
    assert await Housekeeping(store=storage.jobs, clock=lambda: now + 60).run_once() == (0, 0)
    assert await storage.jobs.input_image("a" * 32) is not None

    later = now + INPUT_RETENTION + 60
    assert await Housekeeping(store=storage.jobs, clock=lambda: later).run_once() == (1, 1)
    assert await storage.jobs.input_image("a" * 32) is None
    assert await storage.jobs.input_image("b" * 32) == b"png-b"
    expired, fresh = await storage.jobs.get("c" * 32), await storage.jobs.get("d" * 32)
    assert expired is not None and expired.interaction_token is None
    assert fresh is not None and fresh.interaction_token == "fresh"


async def test_a_backlog_goes_in_batches_and_a_long_one_over_several_rounds(storage: Storage):
    for n in range(7):
        await shown_job_with_picture(storage, f"{n:032x}")
    later = time.time() + INPUT_RETENTION + 60
    housekeeping = Housekeeping(store=storage.jobs, clock=lambda: later, batch=2, max_batches=3)
    assert await housekeeping.run_once() == (6, 0)  # three statements of two rows each, then the round stops
    assert await housekeeping.run_once() == (1, 0)
    assert await housekeeping.run_once() == (0, 0)
    assert all([await storage.jobs.input_image(f"{n:032x}") is None for n in range(7)])


async def test_the_timer_runs_a_round_at_once_then_every_interval_until_stopped(storage: Storage):
    await shown_job_with_picture(storage, "a" * 32)
    later = time.time() + INPUT_RETENTION + 60
    housekeeping = Housekeeping(store=storage.jobs, clock=lambda: later, interval=0.01)
    housekeeping.start()
    await housekeeping.wait_rounds(1)
    assert await storage.jobs.input_image("a" * 32) is None
    await shown_job_with_picture(storage, "b" * 32)  # made after the first round: the next one takes it
    rounds = housekeeping.rounds
    await housekeeping.wait_rounds(rounds + 1)
    assert await storage.jobs.input_image("b" * 32) is None
    await housekeeping.stop()
    assert not housekeeping.running


async def test_a_failure_is_logged_the_other_work_done_and_the_timer_goes_on(
    tmp_path, caplog: pytest.LogCaptureFixture
):
    now = time.time()
    async with SqliteStorage.open(tmp_path / "bot.sqlite3") as storage:
        await storage.jobs.insert(new_job("c" * 32, interaction_token="expired", token_expires_at=now - 1))
        await storage.db.execute("DROP TABLE job_inputs")  # every picture deletion now fails
        housekeeping = Housekeeping(store=storage.jobs, clock=lambda: now, interval=0.01)
        with caplog.at_level(logging.ERROR, logger="bot.jobs.housekeeping"):
            housekeeping.start()
            await housekeeping.wait_rounds(2)
        assert housekeeping.running
        await housekeeping.stop()
        expired = await storage.jobs.get("c" * 32)
        assert expired is not None and expired.interaction_token is None
    failures = [r for r in caplog.records if "deleting old members' pictures failed" in r.getMessage()]
    assert len(failures) >= 2 and all(r.exc_info for r in failures)
