-- Named parameter sets of a server (/config preset), written in the inline-flag syntax ("--ar 16:9 --steps 30").
CREATE TABLE presets (
    guild_id    bigint NOT NULL,
    name        text NOT NULL,
    flags       text NOT NULL,
    created_by  bigint NOT NULL,
    created_at  double precision NOT NULL,
    PRIMARY KEY (guild_id, name)
);
