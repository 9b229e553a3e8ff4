"""The real migrations on a real SQLite file, and the job state rules."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from bot.generation import build_generation_request
from bot.storage import Database, Job, JobStatus, JobStore, StorageError, available_migrations


def new_job(job_id="a" * 32, **changes) -> Job:
    now = time.time()
    values = dict(
        id=job_id,
        kind="text2img",
        guild_id=1,
        channel_id=2,
        user_id=3,
        request=build_generation_request(flavour="v6", default_model="flux", prompt="a cat", seed=5),
        api_flavour="v6",
        status=JobStatus.QUEUED,
        created_at=now,
        deadline_at=now + 600,
        updated_at=now,
        charged_images=1,
    )
    values.update(changes)
    return Job(**values)


async def test_every_migration_applies_to_an_empty_database_and_the_version_is_stored(tmp_path):
    path = tmp_path / "bot.sqlite3"
    async with Database.open(path) as database:
        latest = max(m.version for m in available_migrations())
        assert await database.current_version() == latest
        assert await database.upgrade() == []  # idempotent
    with sqlite3.connect(path) as raw:
        tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"jobs", "schema_migrations"} <= tables


async def test_a_failing_migration_is_rolled_back_whole(tmp_path):
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "0001_ok.sql").write_text("CREATE TABLE a (x INTEGER);")
    (migrations / "0002_broken.sql").write_text("CREATE TABLE b (x INTEGER); INSERT INTO nowhere VALUES (1);")
    async with Database.open(tmp_path / "db.sqlite3", upgrade=False) as database:
        with pytest.raises(StorageError, match=r"0002_broken\.sql failed and was rolled back"):
            await database.upgrade(migrations)
        assert await database.current_version() == 1
        async with database.connection.execute("SELECT name FROM sqlite_master WHERE name = 'b'") as cursor:
            assert await cursor.fetchone() is None


async def test_job_round_trip_and_the_state_rules(tmp_path):
    async with Database.open(tmp_path / "bot.sqlite3") as database:
        store = JobStore(database)
        job = new_job()
        await store.insert(job)
        loaded = await store.get(job.id)
        assert loaded is not None and loaded.request == job.request and loaded.status is JobStatus.QUEUED

        assert await store.mark_submitting(job.id)
        assert not await store.mark_submitting(job.id)  # only from queued
        assert await store.mark_processing(job.id, modelslab_id="77", eta_at=123.0, fetch_url=None, meta={"seed": 9})

        # The webhook path and the poller race to finish the job: exactly one wins.
        results = await asyncio.gather(
            *(
                store.finish_success(
                    job.id,
                    modelslab_id="77",
                    output_urls=[f"https://o/{n}.png"],
                    proxy_urls=[],
                    meta={},
                    seed=9,
                    generation_time=1.0,
                    charged_images=1,
                )
                for n in range(5)
            )
        )
        assert results.count(True) == 1
        assert not await store.finish_failure(job.id, kind="timed_out", detail="late")  # a finished job stays so

        finished = await store.get(job.id)
        assert finished is not None and finished.status is JobStatus.SUCCEEDED and finished.needs_posting
        assert [j.id for j in await store.needing_work()] == [job.id]
        await store.mark_posted(job.id, image_count=1)
        assert await store.needing_work() == []


async def test_a_failure_after_the_images_were_made_keeps_the_charge(tmp_path):
    async with Database.open(tmp_path / "bot.sqlite3") as database:
        store = JobStore(database)
        await store.insert(new_job())
        await store.mark_submitting("a" * 32)
        await store.finish_success(
            "a" * 32,
            modelslab_id="1",
            output_urls=["u"],
            proxy_urls=[],
            meta={},
            seed=1,
            generation_time=1,
            charged_images=1,
        )
        assert await store.finish_failure("a" * 32, kind="download_failed", detail="404", from_succeeded=True)
        job = await store.get("a" * 32)
        assert job is not None and job.status is JobStatus.FAILED and job.charged_images == 1


async def test_adopting_a_modelslab_id_only_fills_a_missing_one(tmp_path):
    async with Database.open(tmp_path / "bot.sqlite3") as database:
        store = JobStore(database)
        await store.insert(new_job())
        assert not await store.adopt_modelslab_id("a" * 32, "1")  # queued: never submitted
        await store.mark_submitting("a" * 32)
        assert await store.adopt_modelslab_id("a" * 32, "1")
        assert not await store.adopt_modelslab_id("a" * 32, "2")
        job = await store.get("a" * 32)
        assert job is not None and job.modelslab_id == "1"


async def test_a_missing_migrations_folder_is_a_plain_error(tmp_path):
    async with Database.open(tmp_path / "db.sqlite3", upgrade=False) as database:
        with pytest.raises(StorageError, match=r"migrations folder .* is missing"):
            await database.upgrade(tmp_path / "nowhere")


async def test_only_a_job_not_yet_sent_can_be_cancelled(tmp_path):
    async with Database.open(tmp_path / "bot.sqlite3") as database:
        store = JobStore(database)
        await store.insert(new_job())
        await store.mark_submitting("a" * 32)
        assert not await store.finish_failure("a" * 32, kind="cancelled", detail="1", only_queued=True)
        assert await store.requeue("a" * 32)  # sent back by ModelsLab: waiting again, cancellable again
        assert await store.finish_failure("a" * 32, kind="cancelled", detail="1", only_queued=True)


async def test_input_pictures_of_shown_jobs_are_dropped_after_their_time(tmp_path):
    async with Database.open(tmp_path / "bot.sqlite3") as database:
        store = JobStore(database)
        await store.insert(new_job("a" * 32))
        await store.insert(new_job("b" * 32))
        await store.save_input("a" * 32, b"png-a", 64, 64)
        await store.save_input("b" * 32, b"png-b", 64, 64)
        await store.mark_posted("a" * 32)
        await store.drop_old_inputs(time.time() + 1)  # everything older than "now + 1 s"
        assert await store.input_image("a" * 32) is None  # shown: dropped
        assert await store.input_image("b" * 32) == b"png-b"  # not shown yet: kept for its job


async def test_the_database_and_its_folder_are_for_the_bots_user_only(tmp_path, monkeypatch):
    """Even with a permissive umask, and for files an older version left readable by everyone."""
    import os
    import stat

    monkeypatch.setattr(os, "umask", os.umask)  # restored after the test
    os.umask(0o022)
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    old = data / "bot.sqlite3"
    sqlite3.connect(old).close()
    old.chmod(0o644)
    async with Database.open(old) as database:
        await JobStore(database).insert(new_job())  # the -wal and -shm exist now
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in data.iterdir()}
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert modes == {"bot.sqlite3": 0o600, "bot.sqlite3-wal": 0o600, "bot.sqlite3-shm": 0o600}

    new = tmp_path / "fresh" / "nested" / "bot.sqlite3"
    async with Database.open(new):
        assert stat.S_IMODE(new.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(new.stat().st_mode) == 0o600


async def test_a_folder_shared_with_other_files_keeps_its_mode_but_the_database_is_private(tmp_path):
    import stat

    shared = tmp_path / "srv"
    shared.mkdir()
    shared.chmod(0o755)
    (shared / "notes.txt").write_text("the operator's")
    async with Database.open(shared / "bot.sqlite3"):
        pass
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    assert stat.S_IMODE((shared / "bot.sqlite3").stat().st_mode) == 0o600
