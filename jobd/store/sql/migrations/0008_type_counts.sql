-- admin.stats for a UI: the stored jobs by (type, status) in place of by status alone
-- (status counts are their sums: O(types) to read), and the finished jobs by hour, type
-- and end status with their run times in a fixed histogram, kept 35 days whatever the
-- retention (SqliteStore.upkeep prunes them). Both are kept by triggers as jobs change;
-- deletes take the type counts off in the store's one delete (SqliteStore._delete).
DROP TRIGGER jobs_counted_in;
DROP TRIGGER jobs_counted_move;
DROP TABLE job_counts;
-- jobs.list by type (one or a list) newest first, and its total, without a table scan
CREATE INDEX jobs_type ON jobs (type, seq);
CREATE TABLE type_counts (
    type TEXT NOT NULL, status TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (type, status)) WITHOUT ROWID;
INSERT INTO type_counts SELECT type, status, count(*) FROM jobs GROUP BY type, status;
CREATE TRIGGER jobs_counted_in AFTER INSERT ON jobs
BEGIN
    INSERT INTO type_counts (type, status, n) VALUES (NEW.type, NEW.status, 1)
        ON CONFLICT (type, status) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER jobs_counted_move AFTER UPDATE OF status ON jobs
    WHEN NEW.status <> OLD.status
BEGIN
    UPDATE type_counts SET n = n - 1 WHERE type = OLD.type AND status = OLD.status;
    INSERT INTO type_counts (type, status, n) VALUES (NEW.type, NEW.status, 1)
        ON CONFLICT (type, status) DO UPDATE SET n = n + 1;
END;

-- The histogram's buckets: run times up to upper_us (the last one has no upper bound).
-- Fixed: a bucket's meaning never changes under the counts already kept in it.
CREATE TABLE run_buckets (bucket INTEGER PRIMARY KEY, upper_us INTEGER);
INSERT INTO run_buckets (bucket, upper_us) VALUES
    (0, 100000), (1, 250000), (2, 500000), (3, 1000000), (4, 2500000), (5, 5000000),
    (6, 10000000), (7, 30000000), (8, 60000000), (9, 120000000), (10, 300000000),
    (11, 600000000), (12, 1200000000), (13, 1800000000), (14, 3600000000),
    (15, 7200000000), (16, 14400000000), (17, 28800000000), (18, 86400000000), (19, NULL);
-- One row per hour, type, end status and bucket: how many ended so, and their run time.
-- Bucket -1 holds the jobs that never ran (cancelled while queued): no run time.
CREATE TABLE finished_hours (
    hour INTEGER NOT NULL, type TEXT NOT NULL, status TEXT NOT NULL, bucket INTEGER NOT NULL,
    n INTEGER NOT NULL, run_us INTEGER NOT NULL,
    PRIMARY KEY (hour, type, status, bucket)) WITHOUT ROWID;
CREATE TRIGGER jobs_finished_hourly AFTER UPDATE OF status ON jobs
    WHEN NEW.status IN ('completed', 'failed', 'cancelled')
        AND OLD.status IN ('queued', 'running')
BEGIN
    INSERT INTO finished_hours (hour, type, status, bucket, n, run_us)
    SELECT NEW.completed_at / 3600000000, NEW.type, NEW.status,
           CASE WHEN OLD.status = 'running' THEN (
               SELECT min(bucket) FROM run_buckets
               WHERE upper_us IS NULL OR upper_us >= NEW.completed_at - NEW.started_at)
           ELSE -1 END,
           1, CASE WHEN OLD.status = 'running' THEN NEW.completed_at - NEW.started_at ELSE 0 END
    ON CONFLICT (hour, type, status, bucket) DO UPDATE SET n = n + 1,
        run_us = run_us + excluded.run_us;
END;

-- The same counts by day (UTC), kept as the sums of their day's hours by two triggers,
-- so that finished since a time weeks back reads whole days and at most two days' hours.
CREATE TABLE finished_days (
    day INTEGER NOT NULL, type TEXT NOT NULL, status TEXT NOT NULL, bucket INTEGER NOT NULL,
    n INTEGER NOT NULL, run_us INTEGER NOT NULL,
    PRIMARY KEY (day, type, status, bucket)) WITHOUT ROWID;
CREATE TRIGGER finished_daily_in AFTER INSERT ON finished_hours
BEGIN
    INSERT INTO finished_days (day, type, status, bucket, n, run_us)
    VALUES (NEW.hour / 24, NEW.type, NEW.status, NEW.bucket, NEW.n, NEW.run_us)
    ON CONFLICT (day, type, status, bucket) DO UPDATE SET n = n + excluded.n,
        run_us = run_us + excluded.run_us;
END;
CREATE TRIGGER finished_daily_move AFTER UPDATE OF n, run_us ON finished_hours
BEGIN
    UPDATE finished_days SET n = n + NEW.n - OLD.n, run_us = run_us + NEW.run_us - OLD.run_us
    WHERE day = NEW.hour / 24 AND type = NEW.type AND status = NEW.status
        AND bucket = NEW.bucket;
END;
