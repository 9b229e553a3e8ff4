-- Per-server configuration set with /config: the server's own ModelsLab key (encrypted), quotas,
-- channels, content policy and defaults. A server without a row uses the built-in defaults.
CREATE TABLE guild_settings (
    guild_id                bigint PRIMARY KEY,
    api_key_ciphertext      bytea,                   -- AES-GCM under a key derived from SECRET_KEY
    api_key_last4           text,                    -- what /config show may display
    guild_daily             integer NOT NULL DEFAULT 0,   -- images per UTC day for the server; 0 = no limit
    user_daily              integer NOT NULL DEFAULT 0,   -- images per member per UTC day; 0 = no limit
    user_concurrent         integer NOT NULL DEFAULT 0,   -- jobs a member may have running; 0 = no limit
    cooldown_seconds        integer NOT NULL DEFAULT 0,   -- between a member's requests; 0 = none
    allowed_channels_json   text NOT NULL DEFAULT '[]',   -- [] = everywhere
    gallery_channel_id      bigint,
    nsfw_policy             text NOT NULL DEFAULT 'spoiler',  -- spoiler | withhold
    default_model           text,
    default_negative_prompt text,
    default_width           integer,
    default_height          integer,
    default_steps           integer,
    allowed_models_json     text NOT NULL DEFAULT '[]',   -- [] = any model
    updated_at              double precision NOT NULL
);

CREATE TABLE role_limits (
    guild_id    bigint NOT NULL,
    role_id     bigint NOT NULL,
    user_daily  integer NOT NULL,                    -- 0 = unlimited for members with this role
    PRIMARY KEY (guild_id, role_id)
);

CREATE TABLE blocklist (
    guild_id    bigint NOT NULL,
    pattern     text NOT NULL,                       -- a word or phrase; * matches within a word
    added_by    bigint NOT NULL,
    added_at    double precision NOT NULL,
    PRIMARY KEY (guild_id, pattern)
);

-- What the channel was when the job was made, for the NSFW policy, and the gallery copy.
ALTER TABLE jobs ADD COLUMN channel_nsfw integer NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN nsfw_detected integer NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN gallery_message_id bigint;

CREATE INDEX jobs_quota ON jobs (guild_id, created_at, charged_images);
