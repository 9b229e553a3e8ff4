-- Several processes on one database (PostgreSQL). Each unfinished or unshown job is driven by one process, its
-- `owner`, until `lease_expires_at` (renewed by the owner's heartbeat; a process that dies loses its jobs to the
-- others). The fair queue in front of ModelsLab is the database's, so that the per-key cap and the round robin by
-- member hold across processes: a waiting job names its key (`key_ref`, a fingerprint, never the key), when it
-- joined the line, whether it goes first (sent back by ModelsLab), and when it was given its slot.
ALTER TABLE jobs ADD COLUMN owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires_at REAL;
ALTER TABLE jobs ADD COLUMN key_ref TEXT;
ALTER TABLE jobs ADD COLUMN enqueued_at REAL;
ALTER TABLE jobs ADD COLUMN granted_at REAL;
ALTER TABLE jobs ADD COLUMN first_in_line INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE posted_at IS NULL;
CREATE INDEX jobs_owned ON jobs (owner) WHERE posted_at IS NULL;
CREATE INDEX jobs_in_line ON jobs (key_ref, enqueued_at) WHERE status = 'queued';
CREATE INDEX jobs_at_modelslab ON jobs (key_ref) WHERE status IN ('submitting', 'processing');

-- Per key: how many slots were given (the round's clock) and until when ModelsLab said its queue is full.
CREATE TABLE queue_keys (
    key_ref       TEXT PRIMARY KEY,
    grants        INTEGER NOT NULL DEFAULT 0,
    paused_until  REAL NOT NULL DEFAULT 0
);

-- Per key and member: when (in grants) the member was last given a slot; the least recently served goes next.
CREATE TABLE queue_members (
    key_ref     TEXT NOT NULL,
    user_id     INTEGER NOT NULL,
    served_seq  INTEGER NOT NULL,
    PRIMARY KEY (key_ref, user_id)
);

-- Payloads sent per key in the last 30 s: ModelsLab refuses an identical one, whichever process sends it.
CREATE TABLE recent_payloads (
    key_ref      TEXT NOT NULL,
    payload_ref  TEXT NOT NULL,
    sent_at      REAL NOT NULL,
    PRIMARY KEY (key_ref, payload_ref)
);
