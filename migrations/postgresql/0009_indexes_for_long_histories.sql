-- No statement may read the whole history: these serve the ones that did (the jobs a restart must carry on,
-- the members' pictures whose day is over, jobs in the order they were made).
CREATE INDEX jobs_unposted ON jobs (created_at) WHERE posted_at IS NULL;
CREATE INDEX jobs_by_age ON jobs (created_at, id);
CREATE INDEX job_inputs_by_age ON job_inputs (created_at);
