-- Settings every process of one bot must share (MODELSLAB_MAX_QUEUED: the per-key cap is global), recorded by the
-- first process that starts on the database; a process whose own value differs refuses to start.
CREATE TABLE shared_settings (
    name        text PRIMARY KEY,     -- the setting's environment name, e.g. MODELSLAB_MAX_QUEUED
    value       text NOT NULL,
    updated_at  double precision NOT NULL
);

-- The quota check of a new job, exact across processes (PostgreSQL only: SQLite's one writer makes its single
-- INSERT ... SELECT ... WHERE exact by itself). Under READ COMMITTED two statements that check the same sums at
-- once both see the other's row missing, so the check first takes a transaction-level advisory lock per server
-- (per member in direct messages), held until the calling statement's transaction ends; each statement of a
-- VOLATILE function takes a fresh snapshot, so the sums read after the lock include every reservation committed
-- before it. Called from the job's INSERT ... SELECT ... WHERE job_fits_limits(...): one round trip in all.
-- The limits are those of `bot.storage.sqlite.SqliteJobs.insert_within_limits`; 0 means no limit.
CREATE FUNCTION job_fits_limits(
    p_guild_id bigint, p_user_id bigint, p_images integer, p_now double precision, p_today double precision,
    p_guild_daily integer, p_user_daily integer, p_user_concurrent integer, p_cooldown_seconds double precision
) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF p_guild_id IS NULL THEN
        -- Direct messages: no server, so the member's own lock; `guild_id IS NULL` (not IS NOT DISTINCT FROM, which
        -- no index serves).
        PERFORM pg_advisory_xact_lock(hashtextextended('job-quota-dm:' || p_user_id, 0));
        RETURN (p_guild_daily = 0 OR (SELECT COALESCE(SUM(charged_images), 0) FROM jobs
                    WHERE guild_id IS NULL AND created_at >= p_today) + p_images <= p_guild_daily)
           AND (p_user_daily = 0 OR (SELECT COALESCE(SUM(charged_images), 0) FROM jobs
                    WHERE guild_id IS NULL AND user_id = p_user_id AND created_at >= p_today)
                + p_images <= p_user_daily)
           AND (p_user_concurrent = 0 OR (SELECT COUNT(*) FROM jobs
                    WHERE guild_id IS NULL AND user_id = p_user_id
                      AND status IN ('queued', 'submitting', 'processing')) < p_user_concurrent)
           AND (p_cooldown_seconds = 0 OR NOT EXISTS (SELECT 1 FROM jobs
                    WHERE guild_id IS NULL AND user_id = p_user_id AND created_at > p_now - p_cooldown_seconds));
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended('job-quota:' || p_guild_id, 0));
    RETURN (p_guild_daily = 0 OR (SELECT COALESCE(SUM(charged_images), 0) FROM jobs
                WHERE guild_id = p_guild_id AND created_at >= p_today) + p_images <= p_guild_daily)
       AND (p_user_daily = 0 OR (SELECT COALESCE(SUM(charged_images), 0) FROM jobs
                WHERE guild_id = p_guild_id AND user_id = p_user_id AND created_at >= p_today)
            + (SELECT COALESCE(SUM(images), 0) FROM forgotten_usage
                WHERE guild_id = p_guild_id AND user_id = p_user_id AND day_start = p_today)
            + p_images <= p_user_daily)
       AND (p_user_concurrent = 0 OR (SELECT COUNT(*) FROM jobs
                WHERE guild_id = p_guild_id AND user_id = p_user_id
                  AND status IN ('queued', 'submitting', 'processing')) < p_user_concurrent)
       AND (p_cooldown_seconds = 0 OR (NOT EXISTS (SELECT 1 FROM jobs
                WHERE guild_id = p_guild_id AND user_id = p_user_id AND created_at > p_now - p_cooldown_seconds)
            AND NOT EXISTS (SELECT 1 FROM forgotten_usage
                WHERE guild_id = p_guild_id AND user_id = p_user_id
                  AND last_request_at > p_now - p_cooldown_seconds)));
END;
$$;
