-- /remix, the Remix context menu and the result buttons: jobs made from other jobs, and input images.
ALTER TABLE jobs ADD COLUMN parent_job_id TEXT;

-- The normalised input image of an img2img or upscale job (PNG), stored before ModelsLab is called:
-- served to ModelsLab under PUBLIC_URL, or sent inline without one; kept for Re-roll and Edit.
CREATE TABLE job_inputs (
    job_id      TEXT PRIMARY KEY,
    image       BLOB NOT NULL,
    width       INTEGER NOT NULL,
    height      INTEGER NOT NULL,
    created_at  REAL NOT NULL
);
