-- A job is fetched with the key it was sent with, even if the server's key changes meanwhile:
-- sealed like the servers' keys (AES-GCM, bound to the job), and dropped once the job is shown.
ALTER TABLE jobs ADD COLUMN api_key_ciphertext bytea;

-- The "jobs at once" limit counts a member's unfinished jobs before every acknowledgement.
CREATE INDEX jobs_running ON jobs (guild_id, user_id) WHERE status IN ('queued', 'submitting', 'processing');
