-- Named parameter sets of a server (/config preset), written in the inline-flag syntax ("--ar 16:9 --steps 30").
CREATE TABLE presets (
    guild_id    INTEGER NOT NULL,
    name        TEXT NOT NULL,
    flags       TEXT NOT NULL,
    created_by  INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    PRIMARY KEY (guild_id, name)
);
