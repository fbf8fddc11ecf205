-- jobs, their history and their checkpoints
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    user_id TEXT NOT NULL,
    project_id TEXT,
    status TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    phase TEXT,
    message TEXT,
    priority INTEGER NOT NULL DEFAULT 0,
    options TEXT NOT NULL DEFAULT '{}',
    metadata TEXT NOT NULL DEFAULT '{}',
    result TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    recoveries INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    version INTEGER NOT NULL,
    description TEXT,
    timeout_s REAL,
    idempotency_key TEXT,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    completed_at INTEGER,
    updated_at INTEGER NOT NULL
);
CREATE TABLE job_events (
    job INTEGER NOT NULL REFERENCES jobs(seq) ON DELETE CASCADE,
    at INTEGER NOT NULL,
    status TEXT NOT NULL,
    phase TEXT,
    progress REAL NOT NULL,
    message TEXT,
    actor TEXT NOT NULL
);
CREATE TABLE job_checkpoints (
    job INTEGER NOT NULL REFERENCES jobs(seq) ON DELETE CASCADE,
    phase TEXT NOT NULL,
    data TEXT NOT NULL,
    saved_at INTEGER NOT NULL,
    PRIMARY KEY (job, phase)
) WITHOUT ROWID;
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
-- jobs.list: newest first within a user, a status, a project
CREATE INDEX jobs_user ON jobs (user_id, seq);
CREATE INDEX jobs_status ON jobs (status, seq);
CREATE INDEX jobs_project ON jobs (project_id, seq) WHERE project_id IS NOT NULL;
-- dispatch order and the dedupe lookup of a queued sync/index per (user, project)
CREATE INDEX jobs_queued ON jobs (priority DESC, seq) WHERE status = 'queued';
CREATE INDEX jobs_queued_project ON jobs (user_id, project_id, type) WHERE status = 'queued';
-- retention
CREATE INDEX jobs_finished ON jobs (status, completed_at)
    WHERE status IN ('completed', 'failed', 'cancelled');
CREATE UNIQUE INDEX jobs_idempotency ON jobs (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX job_events_job ON job_events (job);
