"""The storage contract: what every backend must do, run against each (`tests/unit/conftest.py`), with the real
migrations on a real database. The tests of SQLite's own migration runner are at the end."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import replace

import pytest

from bot.guilds.rules import Limits
from bot.jobs.model import Job, JobStatus
from bot.requests.generation import build_generation_request
from bot.storage.migrations import available_migrations, migrations_directory
from bot.storage.ports import Storage, StorageError
from bot.storage.sqlite import SqliteStorage


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


async def test_every_migration_applies_to_an_empty_database_and_the_version_is_stored(storage: Storage):
    assert await storage.current_version() == await storage.latest_version() >= 8
    assert await storage.upgrade() == []  # idempotent


async def test_the_sqlite_schema_has_every_table(tmp_path):
    path = tmp_path / "bot.sqlite3"
    async with SqliteStorage.open(path) as storage:
        assert await storage.current_version() == max(
            m.version for m in available_migrations(migrations_directory("sqlite"))
        )
    with sqlite3.connect(path) as raw:
        tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"jobs", "schema_migrations"} <= tables


async def test_a_failing_migration_is_rolled_back_whole(tmp_path):
    migrations = tmp_path / "migrations" / "sqlite"
    migrations.mkdir(parents=True)
    (migrations / "0001_ok.sql").write_text("CREATE TABLE a (x INTEGER);")
    (migrations / "0002_broken.sql").write_text("CREATE TABLE b (x INTEGER); INSERT INTO nowhere VALUES (1);")
    async with SqliteStorage.open(tmp_path / "db.sqlite3", upgrade=False, migrations=migrations) as database:
        with pytest.raises(StorageError, match=r"0002_broken\.sql failed and was rolled back"):
            await database.upgrade()
        assert await database.current_version() == 1
        assert await database.db.fetch_one("SELECT name FROM sqlite_master WHERE name = 'b'") is None


async def test_job_round_trip_and_the_state_rules(storage: Storage):
    store = storage.jobs
    job = new_job()
    await store.insert(job)
    loaded = await store.get(job.id)
    assert loaded is not None and loaded.request == job.request and loaded.status is JobStatus.QUEUED

    # Each state change returns the job as it left it (one statement), or None if it did not happen.
    shown = await store.set_message(job.id, 555)
    assert shown is not None and shown.message_id == 555 and shown == await store.get(job.id)
    submitting = await store.mark_submitting(job.id, deadline_at=999.0, api_key_ciphertext=b"sealed")
    assert submitting is not None and submitting.status is JobStatus.SUBMITTING and submitting.deadline_at == 999.0
    assert submitting == await store.get(job.id) and await store.sealed_key(job.id) == b"sealed"
    assert await store.mark_submitting(job.id) is None  # only from queued
    processing = await store.mark_processing(job.id, modelslab_id="77", eta_at=123.0, fetch_url=None, meta={"seed": 9})
    assert processing is not None and processing == await store.get(job.id)
    assert (processing.status, processing.modelslab_id, processing.eta_at, processing.meta) == (
        JobStatus.PROCESSING,
        "77",
        123.0,
        {"seed": 9},
    )

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
    winners = [result for result in results if result is not None]
    assert len(winners) == 1 and winners[0] == await store.get(job.id)
    assert await store.finish_failure(job.id, kind="timed_out", detail="late") is None  # a finished job stays so

    finished = await store.get(job.id)
    assert finished is not None and finished.status is JobStatus.SUCCEEDED and finished.needs_posting
    assert finished.output_urls == winners[0].output_urls and len(finished.output_urls) == 1
    assert [j.id for j in await store.needing_work()] == [job.id]
    await store.mark_posted(job.id, image_count=1)
    assert await store.needing_work() == []


async def test_a_failure_after_the_images_were_made_keeps_the_charge(storage: Storage):
    store = storage.jobs
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
    failed = await store.finish_failure("a" * 32, kind="download_failed", detail="404", from_succeeded=True)
    job = await store.get("a" * 32)
    assert job is not None and job.status is JobStatus.FAILED and job.charged_images == 1 and failed == job


async def test_adopting_a_modelslab_id_only_fills_a_missing_one(storage: Storage):
    store = storage.jobs
    await store.insert(new_job())
    assert await store.adopt_modelslab_id("a" * 32, "1") is None  # queued: never submitted
    await store.mark_submitting("a" * 32)
    adopted = await store.adopt_modelslab_id("a" * 32, "1")
    assert await store.adopt_modelslab_id("a" * 32, "2") is None
    job = await store.get("a" * 32)
    assert job is not None and job.modelslab_id == "1" and adopted == job


async def test_a_missing_migrations_folder_is_a_plain_error(tmp_path):
    async with SqliteStorage.open(tmp_path / "db.sqlite3", upgrade=False, migrations=tmp_path / "nowhere") as database:
        with pytest.raises(StorageError, match=r"migrations folder .* is missing"):
            await database.upgrade()


async def test_only_a_job_not_yet_sent_can_be_cancelled(storage: Storage):
    store = storage.jobs
    await store.insert(new_job())
    await store.mark_submitting("a" * 32)
    assert await store.finish_failure("a" * 32, kind="cancelled", detail="1", only_queued=True) is None
    requeued = await store.requeue("a" * 32)  # sent back by ModelsLab: waiting again, cancellable again
    assert requeued is not None and requeued.status is JobStatus.QUEUED
    assert await store.requeue("a" * 32) is None  # only from submitting
    cancelled = await store.finish_failure("a" * 32, kind="cancelled", detail="1", only_queued=True)
    assert cancelled is not None and (cancelled.status, cancelled.error_kind) == (JobStatus.FAILED, "cancelled")


async def test_a_request_changes_only_while_the_job_is_queued(storage: Storage):
    store = storage.jobs
    job = new_job()
    await store.insert(job)
    reseeded = await store.update_request(job.id, replace(job.request, seed=6))
    assert reseeded is not None and reseeded.request.seed == 6 and reseeded == await store.get(job.id)
    await store.mark_submitting(job.id)
    assert await store.update_request(job.id, replace(job.request, seed=7)) is None
    assert await store.set_message("f" * 32, 1) is None  # no such job


async def test_input_pictures_of_shown_jobs_are_dropped_after_their_time(storage: Storage):
    store = storage.jobs
    await store.insert(new_job("a" * 32))
    await store.insert(new_job("b" * 32))
    await store.save_input("a" * 32, b"png-a", 64, 64)
    await store.save_input("b" * 32, b"png-b", 64, 64)
    await store.mark_posted("a" * 32)
    await store.drop_old_inputs(time.time() + 1)  # everything older than "now + 1 s"
    assert await store.input_image("a" * 32) is None  # shown: dropped
    assert await store.input_image("b" * 32) == b"png-b"  # not shown yet: kept for its job


async def test_pictures_go_in_batches_and_only_once_their_time_is_past(storage: Storage):
    store = storage.jobs
    for n in range(5):
        await store.insert(new_job(f"{n:032x}"))
        await store.save_input(f"{n:032x}", b"png", 64, 64)
        await store.mark_posted(f"{n:032x}")
    assert await store.drop_old_inputs(time.time() - 60) == 0  # a minute ago: these are younger
    assert [await store.drop_old_inputs(time.time() + 1, batch=2) for _ in range(4)] == [2, 2, 1, 0]


async def test_expired_interaction_tokens_of_jobs_not_shown_are_forgotten_in_batches(storage: Storage):
    store = storage.jobs
    now = time.time()
    for n in range(3):  # not shown, token expired
        await store.insert(new_job(f"{n:032x}", interaction_token=f"token-{n}", token_expires_at=now - 10))
    await store.insert(new_job("a" * 32, interaction_token="fresh", token_expires_at=now + 600))
    assert await store.forget_expired_tokens(now, batch=2) == 2
    assert await store.forget_expired_tokens(now, batch=2) == 1
    assert await store.forget_expired_tokens(now, batch=2) == 0
    expired = await store.get(f"{0:032x}")
    assert expired is not None and expired.interaction_token is None and expired.token_expires_at == now - 10
    fresh = await store.get("a" * 32)
    assert fresh is not None and fresh.interaction_token == "fresh"  # still usable: kept


async def test_the_quota_reservation_is_exact_when_fifty_requests_race(storage: Storage):
    limits = Limits(guild_daily=10)
    jobs = [new_job(f"{n:032x}", user_id=100 + n) for n in range(50)]
    admitted = await asyncio.gather(*(storage.jobs.insert_within_limits(job, limits) for job in jobs))
    assert admitted.count(True) == 10
    usage = await storage.jobs.usage(1, 100, time.time())
    assert usage.guild_today == 10 and len(await storage.jobs.ids()) == 10


async def test_each_limit_of_the_reservation(storage: Storage):
    now = time.time()
    first = new_job("a" * 32, created_at=now)
    assert await storage.jobs.insert_within_limits(first, Limits(user_daily=2, user_concurrent=1))
    # One job under way: a second one is refused by the "at once" limit, then admitted once the first failed.
    second = new_job("b" * 32, created_at=now)
    assert not await storage.jobs.insert_within_limits(second, Limits(user_daily=2, user_concurrent=1))
    assert await storage.jobs.finish_failure(first.id, kind="cancelled", detail="3") is not None
    assert await storage.jobs.insert_within_limits(second, Limits(user_daily=2, user_concurrent=1))
    # The cooldown counts from the member's last request, whatever became of it.
    third = new_job("c" * 32, created_at=now + 5)
    assert not await storage.jobs.insert_within_limits(third, Limits(cooldown_seconds=10))
    assert await storage.jobs.insert_within_limits(replace(third, created_at=now + 11), Limits(cooldown_seconds=10))
    usage = await storage.jobs.usage(1, 3, now + 11)
    assert (usage.user_today, usage.user_running) == (2, 2)  # the cancelled job is not counted


async def test_history_is_newest_first_per_server_and_everywhere(storage: Storage):
    now = time.time()
    for n, guild in enumerate((1, 2, 1)):
        await storage.jobs.insert(new_job(f"{n:032x}", guild_id=guild, created_at=now + n))
    assert [j.id for j in await storage.jobs.history(3, guild_id=1)] == [f"{2:032x}", f"{0:032x}"]
    assert await storage.jobs.history_count(3, guild_id=None) == 3
    assert [j.id for j in await storage.jobs.history(3, guild_id=None, offset=1, limit=1)] == [f"{1:032x}"]
    assert await storage.jobs.ids(limit=2) == [f"{0:032x}", f"{1:032x}"]


async def test_server_settings_round_trip(storage: Storage):
    guilds = storage.guilds
    assert (await guilds.config(7)).guild_daily == 0 and not await guilds.any_key()
    await guilds.update(7, guild_daily=20, api_key_ciphertext=b"\x00sealed", api_key_last4="abcd")
    await guilds.set_role_limit(7, 70, 50)
    assert await guilds.add_blocklist_rule(7, "gore", added_by=1)
    assert not await guilds.add_blocklist_rule(7, "gore", added_by=1)
    await guilds.save_preset(7, "wide", "--ar 16:9", created_by=1)
    await guilds.save_preset(7, "wide", "--ar 21:9", created_by=2)
    config = await guilds.config(7)
    assert (config.guild_daily, config.api_key_last4, config.role_limits, config.blocklist) == (
        20,
        "abcd",
        {70: 50},
        ("gore",),
    )
    assert await guilds.sealed_key(7) == b"\x00sealed" and await guilds.any_key()
    assert await guilds.presets(7) == {"wide": "--ar 21:9"}
    assert await guilds.remove_preset(7, "wide") and not await guilds.remove_preset(7, "wide")
    assert await guilds.remove_blocklist_rule(7, "gore")
    await guilds.set_role_limit(7, 70, None)
    assert (await guilds.config(7)).role_limits == {}


async def test_a_server_setting_changes_only_the_columns_named(storage: Storage):
    guilds = storage.guilds
    await guilds.update(8)  # the row, with every default
    await guilds.update(8, guild_daily=5, cooldown_seconds=30)
    await guilds.update(8, user_daily=2)
    await guilds.update(8)  # nothing named: nothing changes
    config = await guilds.config(8)
    assert (config.guild_daily, config.user_daily, config.cooldown_seconds) == (5, 2, 30)
    with pytest.raises(ValueError, match="not server settings"):
        await guilds.update(8, owner="elsewhere")


async def test_forgetting_a_member_is_one_change_across_the_repositories(storage: Storage):
    now = time.time()
    await storage.member_defaults.save(1, 3, {"steps": 12, "flags": "", "remix_mode": 0}, now)
    shown, running = new_job("a" * 32), new_job("b" * 32)
    await storage.jobs.insert(shown)
    await storage.jobs.insert(running)
    await storage.jobs.save_input(shown.id, b"png", 64, 64)
    await storage.jobs.mark_posted(shown.id, image_count=1)
    assert await storage.forget_member(3, now) == 1
    forgotten = await storage.jobs.get(shown.id)
    assert forgotten is not None and forgotten.user_id == 0 and forgotten.request.prompt == ""
    assert await storage.jobs.input_image(shown.id) is None
    assert await storage.member_defaults.get(1, 3) is None
    kept = await storage.jobs.get(running.id)  # still under way: forgotten once it is shown
    assert kept is not None and kept.user_id == 3
    # Forgetting cannot reset today's quota: the shown job's image still counts for the member.
    assert (await storage.jobs.usage(1, 3, now)).user_today == 2


async def test_a_forgotten_job_keeps_nothing_of_its_member_but_the_counts(storage: Storage):
    jobs = storage.jobs
    made, failed = new_job("a" * 32, application_id=5), new_job("b" * 32)
    for job in (made, failed):
        await jobs.insert(job)
        await jobs.mark_submitting(job.id, api_key_ciphertext=b"sealed")
    await jobs.mark_processing(made.id, modelslab_id="1", eta_at=None, fetch_url="https://x/f", meta={"a": 1})
    await jobs.finish_success(
        made.id,
        modelslab_id="1",
        output_urls=["https://x/1.png"],
        proxy_urls=["https://x/p.png"],
        meta={"prompt": "a cat"},
        seed=5,
        generation_time=1.0,
        charged_images=1,
    )
    await jobs.set_gallery_message(made.id, 9)
    await jobs.mark_posted(made.id, image_count=1, message_id=8)
    await jobs.finish_failure(failed.id, kind="refused", detail="the prompt 'a cat' was refused")
    await jobs.mark_posted(failed.id, message_id=10)
    assert await storage.forget_member(3, time.time()) == 2
    for job_id in (made.id, failed.id):
        forgotten = await jobs.get(job_id)
        assert forgotten is not None and await jobs.sealed_key(job_id) is None
        member = (forgotten.user_id, forgotten.request.prompt, forgotten.output_urls, forgotten.proxy_urls)
        assert member == (0, "", (), ())
        assert (forgotten.meta, forgotten.message_id, forgotten.gallery_message_id, forgotten.error_detail) == (
            {},
            None,
            None,
            None,
        )
        assert (forgotten.application_id, forgotten.interaction_token) == (None, None)
    counts = await jobs.get(made.id)
    assert counts is not None and (counts.image_count, counts.charged_images, counts.seed) == (1, 1, 5)


async def test_discord_ids_seeds_sealed_keys_and_pictures_come_back_exactly(storage: Storage):
    big = 2**62 + 7  # Discord ids pass 2**31 (and 2**53, where a float would lose them)
    picture = bytes(range(256)) * 64
    job = new_job(guild_id=big, channel_id=big + 1, user_id=big + 2, application_id=big + 3)
    await storage.jobs.insert(job)
    await storage.jobs.mark_submitting(job.id, api_key_ciphertext=b"\x00\xff sealed \x00")
    await storage.jobs.set_message(job.id, big + 4)
    await storage.jobs.save_input(job.id, picture, 640, 512)
    assert await storage.jobs.copy_input(job.id, "b" * 32) and not await storage.jobs.copy_input("c" * 32, "d" * 32)
    await storage.jobs.finish_success(
        job.id,
        modelslab_id="9",
        output_urls=["u"],
        proxy_urls=[],
        meta={"seed": 4294967295},
        seed=4294967295,
        generation_time=1.5,
        charged_images=1,
    )
    loaded = await storage.jobs.get(job.id)
    assert loaded is not None
    assert (loaded.guild_id, loaded.channel_id, loaded.user_id, loaded.application_id, loaded.message_id) == (
        big,
        big + 1,
        big + 2,
        big + 3,
        big + 4,
    )
    assert (loaded.seed, loaded.meta, loaded.generation_time) == (4294967295, {"seed": 4294967295}, 1.5)
    assert loaded.created_at == job.created_at  # unix times with their microseconds
    assert await storage.jobs.sealed_key(job.id) == b"\x00\xff sealed \x00"
    assert await storage.jobs.input_image(job.id) == picture == await storage.jobs.input_image("b" * 32)
    assert await storage.jobs.last_served([big + 2, 5]) == {big + 2: loaded.submitted_at}
    await storage.guilds.update(big, gallery_channel_id=big + 5, allowed_channels_json=f"[{big + 6}]")
    config = await storage.guilds.config(big)
    assert (config.gallery_channel_id, config.allowed_channels) == (big + 5, (big + 6,))
    await storage.guilds.set_role_limit(big, big + 8, 3)
    await storage.guilds.set_role_limit(big, big + 7, 0)
    assert (await storage.guilds.config(big)).role_limits == {big + 7: 0, big + 8: 3}


async def test_direct_message_jobs_are_counted_apart_from_any_server(storage: Storage):
    now = time.time()
    await storage.jobs.insert(new_job("a" * 32, guild_id=None, created_at=now))
    await storage.jobs.insert(new_job("b" * 32, guild_id=1, created_at=now))
    usage = await storage.jobs.usage(None, 3, now)
    assert (usage.guild_today, usage.user_today, usage.user_running, usage.user_last_request_at) == (1, 1, 1, now)
    assert not await storage.jobs.insert_within_limits(new_job("c" * 32, guild_id=None), Limits(user_daily=1))
    assert await storage.jobs.insert_within_limits(new_job("c" * 32, guild_id=None), Limits(user_daily=2))
    assert (await storage.jobs.usage(1, 3, now)).user_today == 1
    assert await storage.jobs.history_count(3, guild_id=None) == 3
    assert await storage.jobs.history_count(3, guild_id=1) == 1


async def test_forgetting_resets_neither_the_daily_quota_nor_the_cooldown(storage: Storage):
    now = time.time()
    await storage.jobs.insert(new_job("a" * 32, created_at=now - 5, charged_images=2))
    await storage.jobs.mark_posted("a" * 32)
    assert await storage.forget_member(3, now) == 1
    assert await storage.forget_member(3, now) == 0  # nothing left to forget, nothing counted twice
    usage = await storage.jobs.usage(1, 3, now)
    assert (usage.user_today, usage.user_last_request_at) == (2, now - 5)
    assert not await storage.jobs.insert_within_limits(new_job("b" * 32, created_at=now), Limits(cooldown_seconds=10))
    assert not await storage.jobs.insert_within_limits(new_job("b" * 32, created_at=now + 6), Limits(user_daily=2))
    assert await storage.jobs.insert_within_limits(new_job("b" * 32, created_at=now + 6), Limits(user_daily=3))


async def test_the_first_recorded_value_of_a_shared_setting_wins_until_replaced(storage: Storage):
    assert await storage.shared_settings() == {}
    assert await storage.record_shared_setting("MODELSLAB_MAX_QUEUED", "5") == "5"
    assert await storage.record_shared_setting("MODELSLAB_MAX_QUEUED", "10") == "5"
    assert await storage.record_shared_setting("MODELSLAB_MAX_QUEUED", "10", replace=True) == "10"
    assert await storage.shared_settings() == {"MODELSLAB_MAX_QUEUED": "10"}


async def test_a_transaction_keeps_out_what_other_coroutines_write_meanwhile(tmp_path):
    """A rolled-back transaction must not undo a statement another coroutine ran while it was open."""
    async with SqliteStorage.open(tmp_path / "bot.sqlite3") as storage:
        started = asyncio.Event()

        async def failing_transaction() -> None:
            async with storage.db.transaction():
                await storage.jobs.insert(new_job("a" * 32))
                started.set()
                await asyncio.sleep(0)  # the other coroutine gets its turn while the transaction is open
                raise RuntimeError("boom")

        async def other_writer() -> None:
            await started.wait()
            await storage.jobs.insert(new_job("b" * 32))

        results = await asyncio.gather(failing_transaction(), other_writer(), return_exceptions=True)
        assert isinstance(results[0], RuntimeError) and results[1] is None
        assert await storage.jobs.ids() == ["b" * 32]


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
    async with SqliteStorage.open(old) as database:
        await database.jobs.insert(new_job())  # the -wal and -shm exist now
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in data.iterdir()}
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert modes == {"bot.sqlite3": 0o600, "bot.sqlite3-wal": 0o600, "bot.sqlite3-shm": 0o600}

    new = tmp_path / "fresh" / "nested" / "bot.sqlite3"
    async with SqliteStorage.open(new):
        assert stat.S_IMODE(new.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(new.stat().st_mode) == 0o600


async def test_a_folder_shared_with_other_files_keeps_its_mode_but_the_database_is_private(tmp_path):
    import stat

    shared = tmp_path / "srv"
    shared.mkdir()
    shared.chmod(0o755)
    (shared / "notes.txt").write_text("the operator's")
    async with SqliteStorage.open(shared / "bot.sqlite3"):
        pass
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    assert stat.S_IMODE((shared / "bot.sqlite3").stat().st_mode) == 0o600


async def test_whether_a_job_still_has_its_picture(storage: Storage):
    await storage.jobs.insert(new_job("a" * 32))
    assert not await storage.jobs.has_input("a" * 32)
    await storage.jobs.save_input("a" * 32, b"png", 64, 64)
    assert await storage.jobs.has_input("a" * 32)
