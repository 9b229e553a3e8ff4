-- /history forget anonymises a member's finished jobs (user_id 0, no prompt, no result references):
-- the server's counts stay exact. So that forgetting cannot reset a daily quota, the member's images
-- of the current UTC day are carried here, to be dropped once that day is over.
CREATE TABLE forgotten_usage (
    guild_id    bigint NOT NULL,
    user_id     bigint NOT NULL,
    day_start   double precision NOT NULL,
    images      integer NOT NULL,
    PRIMARY KEY (guild_id, user_id, day_start)
);
