-- Every statement the store runs, by name (loaded by jobd/store/sql/__init__.py).
-- "What does retry do to a row?": grep -A12 -- '-- retry_job --'.
-- Timestamps are integer microseconds; a job's version is max(version + 1, now).

-- job_columns --
-- A job as jobd.store.sqlite reads it: options, metadata and result as one JSON array
seq, id, type, user_id, project_id, status, progress, phase, message, priority,
'[' || options || ',' || metadata || ',' || ifnull(result, 'null') || ']',
error, attempts, recoveries, cancel_requested, version, description, timeout_s,
idempotency_key, created_at, started_at, completed_at, updated_at

-- job_wire --
-- SPEC §2's wire shape of a job, built by SQLite (models.Job.to_dict is the reference)
json_object('id', id, 'type', type, 'user_id', user_id, 'project_id', project_id,
    'status', status, 'progress', round(progress, 2), 'phase', phase,
    'message', message, 'priority', priority, 'options', json(options),
    'metadata', json(metadata), 'result', json(result), 'error', error,
    'attempts', attempts, 'queue_position', NULL, 'wait_reason', NULL,
    'cancel_requested', json(CASE WHEN cancel_requested THEN 'true' ELSE 'false' END),
    'version', version, 'description', description, 'timeout_s', timeout_s,
    'created_at', strftime('%Y-%m-%dT%H:%M:%S', created_at / 1000000, 'unixepoch')
        || printf('.%06dZ', created_at % 1000000),
    'started_at', strftime('%Y-%m-%dT%H:%M:%S', started_at / 1000000, 'unixepoch')
        || printf('.%06dZ', started_at % 1000000),
    'completed_at', strftime('%Y-%m-%dT%H:%M:%S', completed_at / 1000000, 'unixepoch')
        || printf('.%06dZ', completed_at % 1000000),
    'updated_at', strftime('%Y-%m-%dT%H:%M:%S', updated_at / 1000000, 'unixepoch')
        || printf('.%06dZ', updated_at % 1000000),
    'eta_s', NULL)

-- get_job --
-- One job by id
SELECT {job_columns} FROM jobs WHERE id = :job_id

-- get_jobs --
-- The stored ones of the jobs whose ids the JSON array :ids holds
SELECT {job_columns} FROM jobs WHERE id IN (SELECT value FROM json_each(:ids))

-- known_ids --
-- Which of the ids in the JSON array :ids are stored jobs
SELECT id FROM jobs WHERE id IN (SELECT value FROM json_each(:ids))

-- job_status --
-- What a refused transition finds: the job's status now (no row: no such job)
SELECT status FROM jobs WHERE id = :job_id

-- find_by_idempotency_key --
-- The job a user submitted with this idempotency key, or folded a submit with it into
SELECT {job_columns} FROM jobs WHERE user_id = :user_id AND idempotency_key = :key
UNION ALL
SELECT {job_columns} FROM jobs
WHERE seq = (SELECT job FROM job_keys WHERE user_id = :user_id AND key = :key)
LIMIT 1

-- keep_folded_key --
-- A folded submit's idempotency key, for a job that has another one
INSERT OR IGNORE INTO job_keys (user_id, key, job) VALUES (:user_id, :key, :seq)

-- find_queued_work --
-- The oldest queued (:running: or running) job of the same work as another (dedupe)
SELECT {job_columns} FROM jobs
WHERE user_id = :user_id AND work = :work AND seq != :seq
  AND status IN ('queued', 'running') AND (:running OR status = 'queued')
ORDER BY seq LIMIT 1

-- fold_job --
-- A queued job a submit of the same work was folded into: full_reindex asked by either,
-- the higher priority, and the submit's idempotency key when the job has none
UPDATE jobs SET options = :options, priority = :priority,
                idempotency_key = coalesce(idempotency_key, :idempotency_key),
                version = max(version + 1, :now), updated_at = :now
WHERE seq = :seq AND status = 'queued'
RETURNING {job_columns}

-- submit_job --
-- created -> queued: a new job, admitted in the transaction that records it; with
-- :started (1), queued -> running too, as start_job would (a worker takes it at once)
INSERT INTO jobs (id, type, user_id, project_id, status, priority, options, metadata,
                  description, timeout_s, idempotency_key, version, created_at, updated_at,
                  weight, work, started_at, attempts)
VALUES (:id, :type, :user_id, :project_id,
        CASE WHEN :started THEN 'running' ELSE 'queued' END, :priority, :options, :metadata,
        :description, :timeout_s, :idempotency_key, :now + :started, :now, :now, :weight,
        :work, CASE WHEN :started THEN :now END, :started)

-- submit_events --
-- A new job's first events: created, then queued (by :actor), and with :started, running
INSERT INTO job_events (job, at, status, phase, progress, message, actor)
SELECT :seq, :now, status, NULL, 0, NULL, actor
FROM (SELECT 1 AS n, 'created' AS status, :actor AS actor
      UNION ALL SELECT 2, 'queued', :actor UNION ALL SELECT 3, 'running', 'jobd')
WHERE n < 3 OR :started ORDER BY n

-- add_event --
-- One entry of a job's history: a status or phase change, a cancel request, a retry
INSERT INTO job_events (job, at, status, phase, progress, message, actor)
VALUES (:seq, :now, :status, :phase, :progress, :message, :actor)

-- start_job --
-- queued -> running: a new attempt
UPDATE jobs SET status = 'running', version = max(version + 1, :now), updated_at = :now,
    started_at = :now, attempts = attempts + 1, completed_at = NULL, pgid = NULL,
    pgid_start = NULL
WHERE id = :job_id AND status = 'queued'
RETURNING {job_columns}

-- finish_job --
-- running -> completed | failed | cancelled; a job whose cancel was requested ends
-- cancelled whatever :status says (its process's exit does not count)
UPDATE jobs SET
    status = CASE WHEN cancel_requested THEN 'cancelled' ELSE :status END,
    message = CASE WHEN cancel_requested AND :status <> 'cancelled' THEN 'cancelled'
                   ELSE ifnull(:message, message) END,
    error = CASE WHEN cancel_requested THEN error ELSE ifnull(:error, error) END,
    result = CASE WHEN cancel_requested THEN result ELSE ifnull(:result, result) END,
    progress = CASE WHEN NOT cancel_requested AND :status = 'completed' THEN 100
                    ELSE progress END,
    version = max(version + 1, :now), updated_at = :now, completed_at = :now,
    cancel_requested = 0, pgid = NULL, pgid_start = NULL
WHERE id = :job_id AND status = 'running'
RETURNING {job_columns}

-- cancel_job --
-- queued -> cancelled; running: its cancel requested (the engine stops it, then
-- finish_job records it cancelled). One statement for both, as River's JobCancel.
UPDATE jobs SET
    status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END,
    cancel_requested = CASE WHEN status = 'running' THEN 1 ELSE 0 END,
    message = CASE WHEN status = 'running' THEN message ELSE 'cancelled' END,
    completed_at = CASE WHEN status = 'running' THEN NULL ELSE :now END,
    pgid = CASE WHEN status = 'running' THEN pgid END,
    pgid_start = CASE WHEN status = 'running' THEN pgid_start END,
    version = max(version + 1, :now), updated_at = :now
WHERE id = :job_id AND (status = 'queued' OR status = 'running' AND cancel_requested = 0)
RETURNING {job_columns}

-- retry_job --
-- failed | cancelled -> queued: a fresh attempt (progress, phase, error, result, the
-- last attempt's times and its crash recoveries cleared; attempts kept); its checkpoints
-- go (clear_checkpoints)
UPDATE jobs SET status = 'queued', version = max(version + 1, :now), updated_at = :now,
    progress = 0, phase = NULL, message = 'retried', error = NULL, result = NULL,
    started_at = NULL, completed_at = NULL, cancel_requested = 0, pgid = NULL,
    pgid_start = NULL, recoveries = 0
WHERE id = :job_id AND status IN ('failed', 'cancelled')
RETURNING {job_columns}

-- requeue_job --
-- running -> queued when the daemon stops or restarts: phase, progress and checkpoints
-- kept to resume from; :recovered counts a recovery after a crash. Not a job whose
-- cancel was requested (meanwhile): that one ends cancelled (finish_job)
UPDATE jobs SET status = 'queued', version = max(version + 1, :now), updated_at = :now,
    message = :reason, error = NULL, result = NULL, completed_at = NULL,
    cancel_requested = 0, pgid = NULL, pgid_start = NULL,
    recoveries = recoveries + :recovered
WHERE id = :job_id AND status = 'running' AND cancel_requested = 0
RETURNING {job_columns}

-- clear_checkpoints --
-- A job's checkpoints, gone (a retry starts over)
DELETE FROM job_checkpoints WHERE job = :seq

-- update_progress --
-- A running job's latest progress, phase and message
UPDATE jobs SET progress = :progress, phase = :phase, message = :message,
    version = max(version + 1, :now), updated_at = :now
WHERE id = :job_id AND status = 'running'
RETURNING {job_columns}

-- set_process --
-- The process group a running job's subprocess lives in (NULLs: none now)
UPDATE jobs SET pgid = :pgid, pgid_start = :start WHERE id = :job_id

-- processes --
-- Running jobs with a recorded process group: what a restart kills
SELECT id, pgid, pgid_start FROM jobs WHERE status = 'running' AND pgid IS NOT NULL

-- queued_jobs --
-- Every queued job in stored dispatch order (priority, then age)
SELECT {job_columns} FROM jobs WHERE status = 'queued' ORDER BY priority DESC, seq

-- running_jobs --
-- Every running job, oldest first
SELECT {job_columns} FROM jobs WHERE status = 'running' ORDER BY seq

-- queued_per_user --
-- How many jobs each user has queued (loaded at open; the queue is bounded)
SELECT user_id, count(*) FROM jobs WHERE status = 'queued' GROUP BY user_id

-- events --
-- A job's history, oldest first
SELECT at, status, phase, progress, message, actor FROM job_events WHERE job = :seq
ORDER BY rowid

-- counts --
-- How many jobs are stored by status (kept by triggers by type: O(types))
SELECT status, sum(n) FROM type_counts GROUP BY status HAVING sum(n) > 0

-- type_counts --
-- How many jobs are stored by type and status (kept by triggers: O(types))
SELECT type, status, n FROM type_counts WHERE n > 0

-- finished_since --
-- The jobs that ended from hour :hour on, by type, end status and run-time bucket: the
-- hours up to the first whole day :first_day, the whole days before day :today, and the
-- hours from :today on (three ranges of the keys, not one scan of every hour)
SELECT type, status, bucket, sum(n), sum(run_us) FROM (
    SELECT type, status, bucket, n, run_us FROM finished_hours
    WHERE hour >= :hour AND hour < :first_day * 24
    UNION ALL
    SELECT type, status, bucket, n, run_us FROM finished_days
    WHERE day >= :first_day AND day < :today
    UNION ALL
    SELECT type, status, bucket, n, run_us FROM finished_hours
    WHERE hour >= max(:hour, :first_day * 24, :today * 24))
GROUP BY type, status, bucket

-- run_buckets --
-- The run-time histogram's fixed buckets: the upper bound of each (the last has none)
SELECT upper_us FROM run_buckets ORDER BY bucket

-- count_finished --
-- The finished counts of the stored jobs that ended since :since, as the end trigger of
-- migration 8 counts them (its upgrade, and a database built other than by the store)
INSERT INTO finished_hours (hour, type, status, bucket, n, run_us)
SELECT completed_at / 3600000000, type, status,
       CASE WHEN started_at IS NULL THEN -1 ELSE (
           SELECT min(bucket) FROM run_buckets
           WHERE upper_us IS NULL OR upper_us >= completed_at - started_at) END,
       count(*), sum(coalesce(completed_at - started_at, 0))
FROM jobs WHERE status IN ('completed', 'failed', 'cancelled') AND completed_at >= :since
GROUP BY 1, 2, 3, 4

-- prune_finished --
-- The hourly finished counts older than hour :hour
DELETE FROM finished_hours WHERE hour < :hour

-- prune_finished_days --
-- The daily finished counts of days wholly before hour :hour
DELETE FROM finished_days WHERE (day + 1) * 24 <= :hour

-- list_jobs --
-- jobs.list: a page of jobs matching {where}, newest first by {key} (keyset paging)
SELECT {key}, seq, {select} FROM jobs {where} ORDER BY {order} LIMIT :limit OFFSET :offset

-- changed_jobs --
-- jobs.changes read from the database (after a restart, or past what the change log
-- keeps): the jobs matching {where} whose last change is after (:after_us, :after_seq), in
-- that order. A finished job's last change is its end (nothing but a retry changes it,
-- and that makes it queued), so its completed_at is its updated_at and the finished ones
-- are read in order from jobs_by_completed; the active ones are few, read by status. No
-- index on updated_at has to be kept up on every write.
SELECT * FROM (
    SELECT ifnull(completed_at, -1) AS changed, seq, status, {job_wire} FROM jobs
    WHERE NOT :active_only AND ifnull(completed_at, -1) >= max(:after_us, 0)
      AND (ifnull(completed_at, -1), seq) > (:after_us, :after_seq){where}
    ORDER BY ifnull(completed_at, -1), seq LIMIT :limit)
UNION ALL
SELECT * FROM (
    SELECT updated_at AS changed, seq, status, {job_wire} FROM jobs
    WHERE status IN ('queued', 'running') AND (updated_at, seq) > (:after_us, :after_seq){where}
    ORDER BY updated_at, seq LIMIT :limit)
ORDER BY changed, seq LIMIT :limit

-- count_jobs --
-- jobs.list's total: the jobs matching {where}, counted no further than :cap
SELECT count(*) FROM (SELECT 1 FROM jobs {where} LIMIT :cap)

-- matching_jobs --
-- The jobs a filtered cancel or retry acts on, oldest first
SELECT {job_columns} FROM jobs WHERE {where} ORDER BY seq LIMIT :limit

-- get_meta --
-- One of the daemon's own settings (the pause, maintenance, a clean stop)
SELECT value FROM meta WHERE key = :key

-- set_meta --
-- Store one of the daemon's own settings
INSERT OR REPLACE INTO meta (key, value) VALUES (:key, :value)

-- delete_meta --
-- Remove one of the daemon's own settings
DELETE FROM meta WHERE key = :key

-- save_checkpoint --
-- A running job's checkpoint of one phase (replacing the phase's previous one)
INSERT OR REPLACE INTO job_checkpoints (job, phase, data, saved_at)
SELECT seq, :phase, :data, :now FROM jobs WHERE id = :job_id

-- load_checkpoints --
-- A job's checkpoints, oldest first
SELECT c.phase, c.data FROM job_checkpoints c JOIN jobs j ON j.seq = c.job
WHERE j.id = :job_id ORDER BY c.saved_at

-- stored_weight --
-- What a user's finished jobs weigh against max_stored_per_user
SELECT weight FROM user_stored WHERE user_id = :user_id

-- restore_user_stored --
-- Every user's stored weight counted again from the jobs (jobd db recover's copy)
INSERT OR REPLACE INTO user_stored (user_id, weight)
SELECT user_id, sum(weight) FROM jobs WHERE status IN ('completed', 'failed', 'cancelled')
GROUP BY user_id

-- users_over_weight --
-- Users whose finished jobs weigh more than they may keep
SELECT user_id FROM user_stored WHERE weight > :limit

-- oldest_finished --
-- A user's oldest finished jobs, what max_stored_per_user forgets first
SELECT seq, weight FROM jobs
WHERE user_id = :user_id AND status IN ('completed', 'failed', 'cancelled') AND seq IS NOT :keep_seq
ORDER BY seq LIMIT :limit

-- expired_jobs --
-- Finished jobs of one status past the cutoff, oldest first (cleanup's chunks, its dry run)
SELECT seq, id FROM jobs
WHERE status IN ('completed', 'failed', 'cancelled') AND status = :status AND completed_at < :cutoff
ORDER BY completed_at LIMIT :limit

-- uncount_jobs --
-- The type and status counts, less the jobs about to be deleted (seqs: a JSON array)
UPDATE type_counts SET n = n - gone.k
FROM (SELECT type, status, count(*) AS k FROM jobs
      WHERE seq IN (SELECT value FROM json_each(:seqs)) GROUP BY type, status) AS gone
WHERE type_counts.type = gone.type AND type_counts.status = gone.status

-- unweigh_jobs --
-- Each user's stored weight, less their finished jobs about to be deleted
UPDATE user_stored SET weight = weight - gone.w
FROM (SELECT user_id, sum(weight) AS w FROM jobs
      WHERE seq IN (SELECT value FROM json_each(:seqs))
        AND status IN ('completed', 'failed', 'cancelled')
      GROUP BY user_id) AS gone
WHERE user_stored.user_id = gone.user_id

-- delete_events --
-- The history of jobs about to be deleted, before them: the cascade then finds nothing
DELETE FROM job_events WHERE job IN (SELECT value FROM json_each(:seqs))

-- delete_keys --
-- The folded submits' idempotency keys of jobs about to be deleted
DELETE FROM job_keys WHERE job IN (SELECT value FROM json_each(:seqs))

-- delete_checkpoints --
-- The checkpoints of jobs about to be deleted
DELETE FROM job_checkpoints WHERE job IN (SELECT value FROM json_each(:seqs))

-- delete_jobs --
-- Jobs deleted by seq (a JSON array), after their counts, weights, events and checkpoints
DELETE FROM jobs WHERE seq IN (SELECT value FROM json_each(:seqs)) RETURNING id

-- find_broken_json --
-- Migration 3's repair: rows whose options or metadata SQLite's JSON refuses
SELECT seq, CASE WHEN json_valid(options) THEN NULL ELSE options END,
       CASE WHEN json_valid(metadata) THEN NULL ELSE metadata END
FROM jobs WHERE NOT json_valid(options) OR NOT json_valid(metadata)

-- repair_json --
-- Migration 3's repair: one row's options and metadata written back (NULL: as it was)
UPDATE jobs SET options = ifnull(:options, options), metadata = ifnull(:metadata, metadata)
WHERE seq = :seq

-- find_broken_results --
-- Migration 9's repair: rows whose result SQLite's JSON refuses (a program's NaN)
SELECT seq, result FROM jobs WHERE result IS NOT NULL AND NOT json_valid(result)

-- repair_result --
-- Migration 9's repair: one row's result written back
UPDATE jobs SET result = :result WHERE seq = :seq
