-- Settings every process of one bot must share (MODELSLAB_MAX_QUEUED: the per-key cap is global), recorded by the
-- first process that starts on the database; a process whose own value differs refuses to start. A single SQLite
-- process never checks them (its settings are the only ones); the table exists so both dialects stay alike and
-- `db copy` carries it. (The PostgreSQL twin also holds the quota function that SQLite needs no twin of.)
CREATE TABLE shared_settings (
    name        TEXT PRIMARY KEY,     -- the setting's environment name, e.g. MODELSLAB_MAX_QUEUED
    value       TEXT NOT NULL,
    updated_at  REAL NOT NULL
);
