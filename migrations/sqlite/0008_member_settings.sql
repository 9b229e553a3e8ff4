-- Each member's own defaults in each server (/settings). NULL means "not set": the server's default applies.
CREATE TABLE member_settings (
    guild_id        INTEGER NOT NULL,
    user_id         INTEGER NOT NULL,
    model           TEXT,
    aspect          TEXT,      -- "16:9": the size is derived from it
    steps           INTEGER,
    guidance        REAL,
    negative_prompt TEXT,
    style           TEXT,      -- an enhance_style
    flags           TEXT NOT NULL DEFAULT '',  -- every other parameter, in the inline-flag syntax
    remix_mode      INTEGER NOT NULL DEFAULT 0,  -- Re-roll and Vary open the Edit form first
    updated_at      REAL NOT NULL,
    PRIMARY KEY (guild_id, user_id)
);
