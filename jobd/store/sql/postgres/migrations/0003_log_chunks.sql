-- Job logs readable from any cluster node (SPEC §11): the owner copies each running job's
-- log into the database in chunks at absolute byte offsets, the last before the end
-- commits; max_log_bytes drops the oldest chunks whole.
CREATE TABLE job_log_chunks (
    job bigint NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
    pos bigint NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (job, pos));
