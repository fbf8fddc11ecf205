-- jobs are deleted a chunk at a time (retention, max_stored_per_user), and a row trigger
-- per deleted job was 40 % of a cleanup: the store's one delete (SqliteStore._delete)
-- takes the chunk's status counts and weights off in one statement each
-- (uncount_jobs, unweigh_jobs). Inserts and status changes keep their triggers.
DROP TRIGGER jobs_stored_gone;
DROP TRIGGER jobs_counted_gone;
