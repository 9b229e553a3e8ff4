-- Generation jobs: one row per /imagine (and later /remix, buttons), written before ModelsLab is called.
CREATE TABLE jobs (
    id                    TEXT PRIMARY KEY,      -- also the ModelsLab track_id: unguessable
    kind                  TEXT NOT NULL,         -- text2img | img2img
    guild_id              INTEGER,
    channel_id            INTEGER NOT NULL,
    user_id               INTEGER NOT NULL,
    request_json          TEXT NOT NULL,         -- the validated request, as sent (minus key, webhook)
    api_flavour           TEXT NOT NULL,         -- v6 | enterprise
    status                TEXT NOT NULL,         -- queued | submitting | processing | succeeded | failed
    modelslab_id          TEXT,
    fetch_url             TEXT,
    eta_at                REAL,                  -- unix time ModelsLab expects the result
    output_json           TEXT,                  -- {"output": [...], "proxy": [...]}
    meta_json             TEXT,                  -- ModelsLab's meta (seed, size, ...)
    seed                  INTEGER,               -- the real seed from the response
    generation_time       REAL,                  -- seconds, as ModelsLab reports it
    image_count           INTEGER,               -- images posted
    error_kind            TEXT,
    error_detail          TEXT,
    retry_after           REAL,
    charged_images        INTEGER NOT NULL DEFAULT 0,
    application_id        INTEGER,
    interaction_token     TEXT,                  -- to edit the status message for 15 minutes
    token_expires_at      REAL,
    message_id            INTEGER,               -- the Discord message that shows the job
    attachment_size_limit INTEGER,
    created_at            REAL NOT NULL,
    submitted_at          REAL,
    finished_at           REAL,
    posted_at             REAL,                  -- when the outcome was shown: NULL means still to show
    deadline_at           REAL NOT NULL,
    updated_at            REAL NOT NULL
);

CREATE INDEX jobs_unfinished ON jobs (status, posted_at);
CREATE INDEX jobs_by_user ON jobs (user_id, created_at);
CREATE INDEX jobs_by_guild ON jobs (guild_id, created_at);
