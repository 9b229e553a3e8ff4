-- Generation jobs: one row per /imagine (and later /remix, buttons), written before ModelsLab is called.
-- Each file here is the PostgreSQL twin of the SQLite migration with the same number (same tables, columns, keys
-- and indexes; tests/unit/test_schema_dialects.py compares them): Discord ids and seeds are bigint, unix times
-- double precision, pictures and sealed keys bytea, flags integer 0/1 as the code stores them.
CREATE TABLE jobs (
    id                    text PRIMARY KEY,      -- also the ModelsLab track_id: unguessable
    kind                  text NOT NULL,         -- text2img | img2img
    guild_id              bigint,
    channel_id            bigint NOT NULL,
    user_id               bigint NOT NULL,
    request_json          text NOT NULL,         -- the validated request, as sent (minus key, webhook)
    api_flavour           text NOT NULL,         -- v6 | enterprise
    status                text NOT NULL,         -- queued | submitting | processing | succeeded | failed
    modelslab_id          text,
    fetch_url             text,
    eta_at                double precision,      -- unix time ModelsLab expects the result
    output_json           text,                  -- {"output": [...], "proxy": [...]}
    meta_json             text,                  -- ModelsLab's meta (seed, size, ...)
    seed                  bigint,                -- the real seed from the response
    generation_time       double precision,      -- seconds, as ModelsLab reports it
    image_count           integer,               -- images posted
    error_kind            text,
    error_detail          text,
    retry_after           double precision,
    charged_images        integer NOT NULL DEFAULT 0,
    application_id        bigint,
    interaction_token     text,                  -- to edit the status message for 15 minutes
    token_expires_at      double precision,
    message_id            bigint,                -- the Discord message that shows the job
    attachment_size_limit integer,
    created_at            double precision NOT NULL,
    submitted_at          double precision,
    finished_at           double precision,
    posted_at             double precision,      -- when the outcome was shown: NULL means still to show
    deadline_at           double precision NOT NULL,
    updated_at            double precision NOT NULL
);

CREATE INDEX jobs_unfinished ON jobs (status, posted_at);
CREATE INDEX jobs_by_user ON jobs (user_id, created_at);
CREATE INDEX jobs_by_guild ON jobs (guild_id, created_at);
