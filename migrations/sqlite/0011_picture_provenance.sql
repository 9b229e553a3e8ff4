-- Where a job's picture came from. `source_flagged`: it works from an image ModelsLab flagged as NSFW (or one
-- posted behind a spoiler), so what it makes keeps that state: behind a spoiler or withheld, never in the gallery.
-- `picture_owner_id`: the member whose own picture it works from (their /remix, or a copy of it in a Re-roll or an
-- Edit, whoever pressed it): /history forget deletes that picture, and its link, in every job that holds it.
ALTER TABLE jobs ADD COLUMN source_flagged INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN picture_owner_id INTEGER;
CREATE INDEX jobs_by_picture_owner ON jobs (picture_owner_id) WHERE picture_owner_id IS NOT NULL;
