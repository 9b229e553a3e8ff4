-- Per-server configuration set with /config: the server's own ModelsLab key (encrypted), quotas,
-- channels, content policy and defaults. A server without a row uses the built-in defaults.
CREATE TABLE guild_settings (
    guild_id                INTEGER PRIMARY KEY,
    api_key_ciphertext      BLOB,                    -- AES-GCM under a key derived from SECRET_KEY
    api_key_last4           TEXT,                    -- what /config show may display
    guild_daily             INTEGER NOT NULL DEFAULT 0,   -- images per UTC day for the server; 0 = no limit
    user_daily              INTEGER NOT NULL DEFAULT 0,   -- images per member per UTC day; 0 = no limit
    user_concurrent         INTEGER NOT NULL DEFAULT 0,   -- jobs a member may have running; 0 = no limit
    cooldown_seconds        INTEGER NOT NULL DEFAULT 0,   -- between a member's requests; 0 = none
    allowed_channels_json   TEXT NOT NULL DEFAULT '[]',   -- [] = everywhere
    gallery_channel_id      INTEGER,
    nsfw_policy             TEXT NOT NULL DEFAULT 'spoiler',  -- spoiler | withhold
    default_model           TEXT,
    default_negative_prompt TEXT,
    default_width           INTEGER,
    default_height          INTEGER,
    default_steps           INTEGER,
    allowed_models_json     TEXT NOT NULL DEFAULT '[]',   -- [] = any model
    updated_at              REAL NOT NULL
);

CREATE TABLE role_limits (
    guild_id    INTEGER NOT NULL,
    role_id     INTEGER NOT NULL,
    user_daily  INTEGER NOT NULL,                    -- 0 = unlimited for members with this role
    PRIMARY KEY (guild_id, role_id)
);

CREATE TABLE blocklist (
    guild_id    INTEGER NOT NULL,
    pattern     TEXT NOT NULL,                       -- a word or phrase; * matches within a word
    added_by    INTEGER NOT NULL,
    added_at    REAL NOT NULL,
    PRIMARY KEY (guild_id, pattern)
);

-- What the channel was when the job was made, for the NSFW policy, and the gallery copy.
ALTER TABLE jobs ADD COLUMN channel_nsfw INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN nsfw_detected INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN gallery_message_id INTEGER;

CREATE INDEX jobs_quota ON jobs (guild_id, created_at, charged_images);
