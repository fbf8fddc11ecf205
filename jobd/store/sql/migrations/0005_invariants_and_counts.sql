-- the job's invariants in the schema, and the status counts kept as jobs change.
-- SQLite adds a CHECK only by rebuilding the table: a new one is made, the rows copied
-- (seq kept: events and checkpoints point at it), the old one dropped and the new one
-- renamed; its indexes and triggers go with the old table and are made again. The
-- runner runs every migration with foreign keys off (a dropped table would otherwise
-- take every job's events with it) and checks them before the commit. Rows a bug left
-- outside the invariants are brought inside on the way (a finished job without an end
-- time gets its last update's), so an old database always migrates.
CREATE TABLE jobs_new (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    user_id TEXT NOT NULL,
    project_id TEXT,
    -- never 'created': a submit admits the job to queued in its own transaction
    status TEXT NOT NULL
        CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled')),
    progress REAL NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    phase TEXT,
    message TEXT,
    priority INTEGER NOT NULL DEFAULT 0 CHECK (priority BETWEEN -100 AND 100),
    options TEXT NOT NULL DEFAULT '{}',
    metadata TEXT NOT NULL DEFAULT '{}',
    result TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    recoveries INTEGER NOT NULL DEFAULT 0 CHECK (recoveries >= 0),
    cancel_requested INTEGER NOT NULL DEFAULT 0 CHECK (cancel_requested IN (0, 1)),
    version INTEGER NOT NULL,
    description TEXT,
    timeout_s REAL CHECK (timeout_s >= 0),
    idempotency_key TEXT,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    completed_at INTEGER,
    updated_at INTEGER NOT NULL,
    pgid INTEGER,
    pgid_start INTEGER,
    weight INTEGER NOT NULL DEFAULT 1 CHECK (weight >= 1),
    -- a job has an end time exactly when it has ended
    CHECK ((completed_at IS NOT NULL) = (status IN ('completed', 'failed', 'cancelled'))),
    -- a running job has started; only a running job can be asked to stop
    CHECK (status <> 'running' OR started_at IS NOT NULL),
    CHECK (cancel_requested = 0 OR status = 'running')
);
INSERT INTO jobs_new (seq, id, type, user_id, project_id, status, progress, phase, message,
                      priority, options, metadata, result, error, attempts, recoveries,
                      cancel_requested, version, description, timeout_s, idempotency_key,
                      created_at, started_at, completed_at, updated_at, pgid, pgid_start,
                      weight)
    SELECT seq, id, type, user_id, project_id, status, max(0, min(100, progress)), phase,
           message, max(-100, min(100, priority)), options, metadata, result, error,
           max(0, attempts), max(0, recoveries),
           CASE WHEN status = 'running' AND cancel_requested THEN 1 ELSE 0 END,
           version, description, max(0, timeout_s), idempotency_key, created_at,
           CASE WHEN status = 'running' THEN ifnull(started_at, updated_at) ELSE started_at END,
           CASE WHEN status IN ('completed', 'failed', 'cancelled')
                THEN ifnull(completed_at, updated_at) END,
           updated_at, pgid, pgid_start, max(1, weight)
    FROM jobs;
DROP TABLE jobs;
ALTER TABLE jobs_new RENAME TO jobs;
CREATE INDEX jobs_user ON jobs (user_id, seq);
CREATE INDEX jobs_status ON jobs (status, seq);
CREATE INDEX jobs_project ON jobs (project_id, seq) WHERE project_id IS NOT NULL;
CREATE INDEX jobs_queued ON jobs (priority DESC, seq) WHERE status = 'queued';
CREATE INDEX jobs_queued_project ON jobs (user_id, project_id, type) WHERE status = 'queued';
CREATE INDEX jobs_finished ON jobs (status, completed_at)
    WHERE status IN ('completed', 'failed', 'cancelled');
CREATE UNIQUE INDEX jobs_idempotency ON jobs (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_by_started ON jobs (ifnull(started_at, -1), seq);
CREATE INDEX jobs_by_completed ON jobs (ifnull(completed_at, -1), seq);
CREATE TRIGGER jobs_stored_in AFTER UPDATE OF status ON jobs
    WHEN NEW.status IN ('completed', 'failed', 'cancelled')
     AND OLD.status NOT IN ('completed', 'failed', 'cancelled')
BEGIN
    INSERT INTO user_stored (user_id, weight) VALUES (NEW.user_id, NEW.weight)
        ON CONFLICT (user_id) DO UPDATE SET weight = weight + excluded.weight;
END;
CREATE TRIGGER jobs_stored_out AFTER UPDATE OF status ON jobs
    WHEN OLD.status IN ('completed', 'failed', 'cancelled')
     AND NEW.status NOT IN ('completed', 'failed', 'cancelled')
BEGIN
    UPDATE user_stored SET weight = weight - OLD.weight WHERE user_id = OLD.user_id;
END;
CREATE TRIGGER jobs_stored_gone AFTER DELETE ON jobs
    WHEN OLD.status IN ('completed', 'failed', 'cancelled')
BEGIN
    UPDATE user_stored SET weight = weight - OLD.weight WHERE user_id = OLD.user_id;
END;
-- admin.stats' status counts: read in O(1) at any number of jobs, kept by triggers
CREATE TABLE job_counts (status TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO job_counts SELECT status, count(*) FROM jobs GROUP BY status;
CREATE TRIGGER jobs_counted_in AFTER INSERT ON jobs
BEGIN
    INSERT INTO job_counts (status, n) VALUES (NEW.status, 1)
        ON CONFLICT (status) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER jobs_counted_move AFTER UPDATE OF status ON jobs
    WHEN NEW.status <> OLD.status
BEGIN
    UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
    INSERT INTO job_counts (status, n) VALUES (NEW.status, 1)
        ON CONFLICT (status) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER jobs_counted_gone AFTER DELETE ON jobs
BEGIN
    UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
END;
