-- /remix, the Remix context menu and the result buttons: jobs made from other jobs, and input images.
ALTER TABLE jobs ADD COLUMN parent_job_id text;

-- The normalised input image of an img2img or upscale job (PNG), stored before ModelsLab is called:
-- served to ModelsLab under PUBLIC_URL, or sent inline without one; kept for Re-roll and Edit.
CREATE TABLE job_inputs (
    job_id      text PRIMARY KEY,
    image       bytea NOT NULL,
    width       integer NOT NULL,
    height      integer NOT NULL,
    created_at  double precision NOT NULL
);
