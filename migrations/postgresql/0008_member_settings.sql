-- Each member's own defaults in each server (/settings). NULL means "not set": the server's default applies.
CREATE TABLE member_settings (
    guild_id        bigint NOT NULL,
    user_id         bigint NOT NULL,
    model           text,
    aspect          text,      -- "16:9": the size is derived from it
    steps           integer,
    guidance        double precision,
    negative_prompt text,
    style           text,      -- an enhance_style
    flags           text NOT NULL DEFAULT '',  -- every other parameter, in the inline-flag syntax
    remix_mode      integer NOT NULL DEFAULT 0,  -- Re-roll and Vary open the Edit form first
    updated_at      double precision NOT NULL,
    PRIMARY KEY (guild_id, user_id)
);
