-- Every statement the PostgreSQL store runs, by name (loaded by jobd/store/sql/__init__.py):
-- the same names as ../queries.sql (SQLite's) where the statement is the same idea.
-- Arguments are psycopg's %(name)s; a literal percent sign would be %%, so none is used.
-- Timestamps are integer microseconds. A job's version comes from the job_versions
-- sequence: %(floor)s is the value its transaction took when it began, and every change
-- stores jobd_next_version (migration 0005).

-- job_columns --
-- A job as jobd.store.base reads it: options, metadata and result as one JSON array
seq, id, type, user_id, project_id, status, progress, phase, message, priority,
'[' || options || ',' || metadata || ',' || coalesce(result, 'null') || ']',
error, attempts, recoveries, cancel_requested, version, description, timeout_s,
idempotency_key, created_at, started_at, completed_at, updated_at

-- job_wire --
-- SPEC §2's wire shape of a job, built by PostgreSQL (models.Job.to_dict is the
-- reference): row_to_json keeps the order of the columns and writes no spaces; times by
-- jobd_iso (migration 1)
(SELECT row_to_json(w)::text FROM (SELECT jobs.id AS id, jobs.type AS type,
    jobs.user_id AS user_id, jobs.project_id AS project_id, jobs.status AS status,
    round(jobs.progress::numeric, 2)::float8 AS progress, jobs.phase AS phase,
    jobs.message AS message, jobs.priority AS priority, jobs.options::json AS options,
    jobs.metadata::json AS metadata, jobs.result::json AS result, jobs.error AS error,
    jobs.attempts AS attempts, NULL::int AS queue_position, NULL::text AS wait_reason,
    jobs.cancel_requested = 1 AS cancel_requested, jobs.version AS version,
    jobs.description AS description, jobs.timeout_s AS timeout_s,
    jobd_iso(jobs.created_at) AS created_at, jobd_iso(jobs.started_at) AS started_at,
    jobd_iso(jobs.completed_at) AS completed_at, jobd_iso(jobs.updated_at) AS updated_at,
    NULL::float8 AS eta_s) AS w)

-- get_job --
-- One job by id
SELECT {job_columns} FROM jobs WHERE id = %(job_id)s

-- get_jobs --
-- The stored ones of the jobs whose ids the JSON array %(ids)s holds (one statement for
-- any number of them: prepared once). = ANY of an array, not IN a set: the planner
-- guesses 100 rows for a set, and on a table of a few thousand jobs scans it whole.
SELECT {job_columns} FROM jobs
WHERE id = ANY(ARRAY(SELECT jsonb_array_elements_text(%(ids)s::jsonb)))

-- known_ids --
-- Which of the ids in the JSON array %(ids)s are stored jobs
SELECT id FROM jobs WHERE id IN (SELECT jsonb_array_elements_text(%(ids)s::jsonb))

-- job_status --
-- What a refused transition finds: the job's status now (no row: no such job)
SELECT status FROM jobs WHERE id = %(job_id)s

-- find_by_idempotency_key --
-- The job a user submitted with this idempotency key, or folded a submit with it into
(SELECT {job_columns} FROM jobs WHERE user_id = %(user_id)s AND idempotency_key = %(key)s)
UNION ALL
(SELECT {job_columns} FROM jobs
 WHERE seq = (SELECT job FROM job_keys WHERE user_id = %(user_id)s AND key = %(key)s))
LIMIT 1

-- keep_folded_key --
-- A folded submit's idempotency key, for a job that has another one
INSERT INTO job_keys (user_id, key, job) VALUES (%(user_id)s, %(key)s, %(seq)s)
ON CONFLICT DO NOTHING

-- find_queued_work --
-- The oldest queued (%(running)s: or running) job of the same work as another (dedupe)
SELECT {job_columns} FROM jobs
WHERE user_id = %(user_id)s AND work = %(work)s AND seq <> %(seq)s
  AND status IN ('queued', 'running') AND (%(running)s OR status = 'queued')
ORDER BY seq LIMIT 1

-- fold_job --
-- A queued job a submit of the same work was folded into: full_reindex asked by either,
-- the higher priority, and the submit's idempotency key when the job has none.
-- (status = 'queued') IS TRUE: as start_job says
UPDATE jobs SET options = %(options)s, priority = %(priority)s,
                idempotency_key = coalesce(idempotency_key, %(idempotency_key)s),
                version = jobd_next_version(seq, version, %(floor)s), updated_at = %(now)s
WHERE seq = %(seq)s AND (status = 'queued') IS TRUE
RETURNING {job_columns}

-- submit_job --
-- created -> queued: a new job, admitted in the transaction that records it; with
-- %(started)s (1), queued -> running too, as start_job would (a worker takes it at once)
INSERT INTO jobs (id, type, user_id, project_id, status, priority, options, metadata,
                  description, timeout_s, idempotency_key, version, created_at, updated_at,
                  weight, work, started_at, attempts)
VALUES (%(id)s, %(type)s, %(user_id)s, %(project_id)s,
        CASE WHEN %(started)s = 1 THEN 'running' ELSE 'queued' END, %(priority)s,
        %(options)s, %(metadata)s, %(description)s, %(timeout_s)s, %(idempotency_key)s,
        %(floor)s + %(started)s, %(now)s, %(now)s, %(weight)s, %(work)s,
        CASE WHEN %(started)s = 1 THEN %(now)s END, %(started)s)
RETURNING seq

-- submit_events --
-- A new job's first events: created, then queued (by %(actor)s), and with %(started)s, running
INSERT INTO job_events (job, at, status, phase, progress, message, actor)
SELECT %(seq)s, %(now)s, e.status, NULL, 0, NULL, e.actor
FROM (VALUES (1, 'created', %(actor)s), (2, 'queued', %(actor)s), (3, 'running', 'jobd'))
    AS e (n, status, actor)
WHERE e.n < 3 OR %(started)s = 1 ORDER BY e.n

-- add_event --
-- One entry of a job's history: a status or phase change, a cancel request, a retry
INSERT INTO job_events (job, at, status, phase, progress, message, actor)
VALUES (%(seq)s, %(now)s, %(status)s, %(phase)s, %(progress)s, %(message)s, %(actor)s)

-- start_job --
-- queued -> running: a new attempt. The job is found by its key, never through an index
-- of queued jobs: written as a plain status = 'queued', the guard lets the planner reach
-- the row through jobs_queued, reading every queued job's entry, whenever the statistics
-- date from a moment with few queued (ANALYZE while idle, then a burst of submits: each
-- start then costs as much as the whole queue). IS TRUE hides that from the planner.
UPDATE jobs SET status = 'running', version = jobd_next_version(seq, version, %(floor)s),
    updated_at = %(now)s, started_at = %(now)s, attempts = attempts + 1,
    completed_at = NULL, pgid = NULL, pgid_start = NULL
WHERE id = %(job_id)s AND (status = 'queued') IS TRUE
RETURNING {job_columns}

-- fence --
-- What every write for a running job adds (docs/cluster.md, section 6): when this node
-- runs it (%(node)s; NULL: the store is no cluster node), still this attempt of this
-- node's, and the node still holds its lease by the database's clock
(%(node)s::bigint IS NULL OR node_id = %(node)s AND attempts = %(attempt)s AND EXISTS (
    SELECT 1 FROM nodes WHERE id = %(node)s AND ended_at IS NULL
    AND lease_until > jobd_now_us()))

-- finish_job --
-- running -> completed | failed | cancelled; a job whose cancel was requested ends
-- cancelled whatever %(status)s says (its process's exit does not count)
UPDATE jobs SET
    status = CASE WHEN cancel_requested = 1 THEN 'cancelled' ELSE %(status)s END,
    message = CASE WHEN cancel_requested = 1 AND %(status)s <> 'cancelled' THEN 'cancelled'
                   ELSE coalesce(%(message)s, message) END,
    error = CASE WHEN cancel_requested = 1 THEN error ELSE coalesce(%(error)s, error) END,
    result = CASE WHEN cancel_requested = 1 THEN result ELSE coalesce(%(result)s, result) END,
    progress = CASE WHEN cancel_requested = 0 AND %(status)s = 'completed' THEN 100
                    ELSE progress END,
    version = jobd_next_version(seq, version, %(floor)s), updated_at = %(now)s, completed_at = %(now)s,
    cancel_requested = 0, pgid = NULL, pgid_start = NULL, node_id = NULL
WHERE id = %(job_id)s AND status = 'running' AND {fence}
RETURNING {job_columns}

-- cancel_job --
-- queued -> cancelled; running: its cancel requested (the engine stops it, then
-- finish_job records it cancelled). One statement for both, as River's JobCancel.
UPDATE jobs SET
    status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END,
    cancel_requested = CASE WHEN status = 'running' THEN 1 ELSE 0 END,
    message = CASE WHEN status = 'running' THEN message ELSE 'cancelled' END,
    completed_at = CASE WHEN status = 'running' THEN NULL ELSE %(now)s END,
    pgid = CASE WHEN status = 'running' THEN pgid END,
    pgid_start = CASE WHEN status = 'running' THEN pgid_start END,
    version = jobd_next_version(seq, version, %(floor)s), updated_at = %(now)s
WHERE id = %(job_id)s
  AND (status = 'queued' OR status = 'running' AND cancel_requested = 0)
RETURNING {job_columns}

-- retry_job --
-- failed | cancelled -> queued: a fresh attempt (progress, phase, error, result, the
-- last attempt's times and its crash recoveries cleared; attempts kept); its checkpoints
-- go (clear_checkpoints)
UPDATE jobs SET status = 'queued', version = jobd_next_version(seq, version, %(floor)s),
    updated_at = %(now)s, progress = 0, phase = NULL, message = 'retried', error = NULL,
    result = NULL, started_at = NULL, completed_at = NULL, cancel_requested = 0,
    pgid = NULL, pgid_start = NULL, recoveries = 0
WHERE id = %(job_id)s AND status IN ('failed', 'cancelled')
RETURNING {job_columns}

-- requeue_job --
-- running -> queued when the daemon stops or restarts: phase, progress and checkpoints
-- kept to resume from; %(recovered)s counts a recovery after a crash. Not a job whose
-- cancel was requested (meanwhile, perhaps through another node): it ends cancelled
UPDATE jobs SET status = 'queued', version = jobd_next_version(seq, version, %(floor)s),
    updated_at = %(now)s, message = %(reason)s, error = NULL, result = NULL,
    completed_at = NULL, cancel_requested = 0, pgid = NULL, pgid_start = NULL,
    recoveries = recoveries + %(recovered)s, node_id = NULL
WHERE id = %(job_id)s AND status = 'running' AND cancel_requested = 0 AND {fence}
RETURNING {job_columns}

-- clear_checkpoints --
-- A job's checkpoints, gone (a retry starts over)
DELETE FROM job_checkpoints WHERE job = %(seq)s

-- update_progress --
-- A running job's latest progress, phase and message
UPDATE jobs SET progress = %(progress)s, phase = %(phase)s, message = %(message)s,
    version = jobd_next_version(seq, version, %(floor)s), updated_at = %(now)s
WHERE id = %(job_id)s AND status = 'running' AND {fence}
RETURNING {job_columns}

-- set_process --
-- The process group a running job's subprocess lives in (NULLs: none now)
UPDATE jobs SET pgid = %(pgid)s, pgid_start = %(start)s WHERE id = %(job_id)s AND {fence}

-- processes --
-- Running jobs with a recorded process group: what a restart kills
SELECT id, pgid, pgid_start FROM jobs WHERE status = 'running' AND pgid IS NOT NULL

-- queued_jobs --
-- Every queued job in stored dispatch order (priority, then age)
SELECT {job_columns} FROM jobs WHERE status = 'queued' ORDER BY priority DESC, seq

-- running_jobs --
-- Every running job, oldest first
SELECT {job_columns} FROM jobs WHERE status = 'running' ORDER BY seq

-- count_queued --
-- A user's queued count moved by %(delta)s, in the write that queued or took the jobs
-- (a new row is checked before the conflict is: a user's first count is never below 0)
INSERT INTO queued_counts (user_id, n) VALUES (%(user_id)s, greatest(%(delta)s, 0))
ON CONFLICT (user_id) DO UPDATE SET n = queued_counts.n + %(delta)s

-- begin --
-- A write transaction and its version floor (the next value of the versions sequence),
-- in one round trip
BEGIN; SELECT nextval('job_versions')

-- begin_queued --
-- A cluster node's write transaction: the queue lock first (PgDriver.begin says why),
-- then its floor, so floors rise in the order batches hold the lock; {key}: QUEUE_KEY
BEGIN; SELECT nextval('job_versions') FROM (SELECT pg_advisory_xact_lock({key})) AS queue

-- stuck_after --
-- The writer's session: a transaction idle %(ms)s ms (its node frozen) is ended
SELECT set_config('idle_in_transaction_session_timeout', %(ms)s, false)

-- lock_queue --
-- Admission to the queue (a submit, a retry) is one writer at a time, from the first
-- count a write reads to its commit, so that no two writers admit past a limit
SELECT pg_advisory_xact_lock(%(key)s)

-- queued_of_user --
-- How many jobs a user has queued
SELECT coalesce((SELECT n FROM queued_counts WHERE user_id = %(user_id)s), 0)

-- queued_total --
-- How many jobs are queued, all users together
SELECT coalesce(sum(n), 0)::bigint FROM queued_counts

-- events --
-- A job's history, oldest first
SELECT at, status, phase, progress, message, actor FROM job_events WHERE job = %(seq)s
ORDER BY id

-- counts --
-- How many jobs are stored by status (kept by triggers by type: O(types))
SELECT status, sum(n)::bigint FROM type_counts GROUP BY status HAVING sum(n) > 0

-- type_counts --
-- How many jobs are stored by type and status (kept by triggers: O(types))
SELECT type, status, n FROM type_counts WHERE n > 0

-- finished_since --
-- The jobs that ended from hour %(hour)s on, by type, end status and run-time bucket: the
-- hours up to the first whole day, the whole days before today, and today's hours
SELECT type, status, bucket, sum(n)::bigint, sum(run_us)::bigint FROM (
    SELECT type, status, bucket, n, run_us FROM finished_hours
    WHERE hour >= %(hour)s AND hour < %(first_day)s * 24
    UNION ALL
    SELECT type, status, bucket, n, run_us FROM finished_days
    WHERE day >= %(first_day)s AND day < %(today)s
    UNION ALL
    SELECT type, status, bucket, n, run_us FROM finished_hours
    WHERE hour >= greatest(%(hour)s, %(first_day)s * 24, %(today)s * 24)) AS f
GROUP BY type, status, bucket

-- run_buckets --
-- The run-time histogram's fixed buckets: the upper bound of each (the last has none)
SELECT upper_us FROM run_buckets ORDER BY bucket

-- prune_finished --
-- The hourly finished counts older than hour %(hour)s
DELETE FROM finished_hours WHERE hour < %(hour)s

-- prune_finished_days --
-- The daily finished counts of days wholly before hour %(hour)s
DELETE FROM finished_days WHERE (day + 1) * 24 <= %(hour)s

-- list_jobs --
-- jobs.list: a page of jobs matching {where}, newest first by {key} (keyset paging)
SELECT {key}, seq, {select} FROM jobs {where} ORDER BY {order}
LIMIT nullif(%(limit)s, -1) OFFSET %(offset)s

-- changed_jobs --
-- jobs.changes read from the database: the jobs matching {where} whose last change is
-- after (%(after_us)s, %(after_seq)s), in that order (as SQLite's: finished ones by
-- their end, active ones by their last update)
SELECT * FROM (
    (SELECT coalesce(completed_at, -1) AS changed, seq, status, {job_wire} FROM jobs
     WHERE %(active_only)s = 0 AND coalesce(completed_at, -1) >= greatest(%(after_us)s, 0)
       AND (coalesce(completed_at, -1), seq) > (%(after_us)s, %(after_seq)s){where}
     ORDER BY coalesce(completed_at, -1), seq LIMIT %(limit)s)
    UNION ALL
    (SELECT updated_at AS changed, seq, status, {job_wire} FROM jobs
     WHERE status IN ('queued', 'running')
       AND (updated_at, seq) > (%(after_us)s, %(after_seq)s){where}
     ORDER BY updated_at, seq LIMIT %(limit)s)) AS c
ORDER BY changed, seq LIMIT %(limit)s

-- count_jobs --
-- jobs.list's total: the jobs matching {where}, counted no further than %(cap)s
SELECT count(*) FROM (SELECT 1 FROM jobs {where} LIMIT %(cap)s) AS capped

-- matching_jobs --
-- The jobs a filtered cancel or retry acts on, oldest first
SELECT {job_columns} FROM jobs WHERE {where} ORDER BY seq LIMIT %(limit)s

-- get_meta --
-- One of the daemon's own settings (the pause, maintenance, a clean stop)
SELECT value FROM meta WHERE key = %(key)s

-- set_meta --
-- Store one of the daemon's own settings
INSERT INTO meta (key, value) VALUES (%(key)s, %(value)s)
ON CONFLICT (key) DO UPDATE SET value = excluded.value

-- delete_meta --
-- Remove one of the daemon's own settings
DELETE FROM meta WHERE key = %(key)s

-- save_checkpoint --
-- A running job's checkpoint of one phase (replacing the phase's previous one); the row
-- lock of a fenced one keeps a rescue from slipping in before its commit
INSERT INTO job_checkpoints (job, phase, data, saved_at)
SELECT seq, %(phase)s, %(data)s, %(now)s FROM jobs WHERE id = %(job_id)s AND {fence}
FOR SHARE
ON CONFLICT (job, phase) DO UPDATE SET data = excluded.data, saved_at = excluded.saved_at

-- load_checkpoints --
-- A job's checkpoints, oldest first
SELECT c.phase, c.data FROM job_checkpoints c JOIN jobs j ON j.seq = c.job
WHERE j.id = %(job_id)s ORDER BY c.saved_at

-- stored_weight --
-- What a user's finished jobs weigh against max_stored_per_user
SELECT weight FROM user_stored WHERE user_id = %(user_id)s

-- users_over_weight --
-- Users whose finished jobs weigh more than they may keep
SELECT user_id FROM user_stored WHERE weight > %(limit)s

-- oldest_finished --
-- A user's oldest finished jobs, what max_stored_per_user forgets first
SELECT seq, weight FROM jobs
WHERE user_id = %(user_id)s AND status IN ('completed', 'failed', 'cancelled')
  AND seq IS DISTINCT FROM %(keep_seq)s
ORDER BY seq LIMIT %(limit)s

-- expired_jobs --
-- Finished jobs of one status past the cutoff, oldest first (cleanup's chunks, its dry run)
SELECT seq, id FROM jobs
WHERE status IN ('completed', 'failed', 'cancelled') AND status = %(status)s
  AND completed_at < %(cutoff)s
ORDER BY completed_at LIMIT nullif(%(limit)s, -1)

-- uncount_jobs --
-- The type and status counts, less the jobs about to be deleted (seqs: a JSON array)
UPDATE type_counts SET n = n - gone.k
FROM (SELECT type, status, count(*) AS k FROM jobs
      WHERE seq IN (SELECT jsonb_array_elements_text(%(seqs)s::jsonb)::bigint)
      GROUP BY type, status) AS gone
WHERE type_counts.type = gone.type AND type_counts.status = gone.status

-- unweigh_jobs --
-- Each user's stored weight, less their finished jobs about to be deleted
UPDATE user_stored SET weight = weight - gone.w
FROM (SELECT user_id, sum(weight) AS w FROM jobs
      WHERE seq IN (SELECT jsonb_array_elements_text(%(seqs)s::jsonb)::bigint)
        AND status IN ('completed', 'failed', 'cancelled')
      GROUP BY user_id) AS gone
WHERE user_stored.user_id = gone.user_id

-- delete_events --
-- The history of jobs about to be deleted, before them: the cascade then finds nothing
DELETE FROM job_events
WHERE job IN (SELECT jsonb_array_elements_text(%(seqs)s::jsonb)::bigint)

-- delete_keys --
-- The folded submits' idempotency keys of jobs about to be deleted
DELETE FROM job_keys WHERE job IN (SELECT jsonb_array_elements_text(%(seqs)s::jsonb)::bigint)

-- delete_checkpoints --
-- The checkpoints of jobs about to be deleted
DELETE FROM job_checkpoints
WHERE job IN (SELECT jsonb_array_elements_text(%(seqs)s::jsonb)::bigint)

-- delete_jobs --
-- Jobs deleted by seq (a JSON array), after their counts, weights, events and checkpoints
DELETE FROM jobs WHERE seq IN (SELECT jsonb_array_elements_text(%(seqs)s::jsonb)::bigint)
RETURNING id

-- size --
-- What the database takes on disk
SELECT pg_database_size(current_database())

-- schema_version --
-- The newest migration applied (0: none)
SELECT coalesce(max(version), 0) FROM jobd_schema

-- lock_node --
-- A one-node store's: held alone by the writer's session while it is open
SELECT pg_try_advisory_lock(%(key)s)

-- lock_node_shared --
-- A cluster node's: held by its writer's session, shared with the other nodes
SELECT pg_try_advisory_lock_shared(%(key)s)

-- node_holder --
-- Who holds the node lock (its connection's application_name names host and pid)
SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.database = (
    SELECT oid FROM pg_database WHERE datname = current_database())
  AND (l.classid::bigint << 32 | l.objid::bigint) = %(key)s
LIMIT 1

-- claim --
-- The next job this node may start, started for it (docs/cluster.md, section 4): highest
-- priority first, users in turn within a priority, each user's jobs oldest first; none
-- while paused, while this node's slots are full or its lease has lapsed; a user at
-- max_running_per_user and an exclusive job (its type in %(exclusive)s) whose repository
-- has a job running on any node are passed over. Run after lock_queue, as a statement of
-- its own (its snapshot then holds every claim committed before the lock was granted).
-- pick is MATERIALIZED: inlined into the UPDATE, it would run again for every queued job;
-- (status = 'queued') IS TRUE: as start_job says (the claim scanned the whole queue).
WITH me AS (
    SELECT id FROM nodes
    WHERE id = %(node)s AND ended_at IS NULL AND lease_until > jobd_now_us()
      AND (SELECT count(*) FROM jobs WHERE status = 'running' AND node_id = %(node)s)
          < %(workers)s
      AND NOT EXISTS (SELECT 1 FROM meta WHERE key = 'paused' AND value = '1')),
pick AS MATERIALIZED (
    SELECT next.seq AS pick_seq, next.repository AS pick_repository
    FROM me, dispatch_turns t
    CROSS JOIN LATERAL (
        SELECT q.seq, q.repository
        FROM (SELECT q.seq, q.type,
                     -- what an exclusive job waits on, as jobd.dispatch has it: its
                     -- resolved repo_path, else its (user, project) (a plugin's that
                     -- stores none), chr(1) between them as no id holds it
                     CASE WHEN q.type = ANY(%(exclusive)s::text[])
                          THEN coalesce(q.options::jsonb ->> 'repo_path',
                                        q.user_id || chr(1) || q.project_id) END AS repository
              FROM jobs q
              WHERE q.status = 'queued' AND q.user_id = t.user_id
                AND q.priority = t.priority) q
        WHERE q.repository IS NULL OR NOT EXISTS (
            SELECT 1 FROM jobs r WHERE r.status = 'running' AND r.repository = q.repository)
        ORDER BY q.seq LIMIT 1) AS next
    WHERE t.queued > 0
      AND (SELECT count(*) FROM jobs u WHERE u.status = 'running' AND u.user_id = t.user_id)
          < %(max_running_per_user)s
    ORDER BY t.priority DESC, t.turn
    LIMIT 1)
UPDATE jobs SET status = 'running', node_id = %(node)s, repository = pick.pick_repository,
    attempts = attempts + 1, version = jobd_next_version(seq, version, %(floor)s), updated_at = %(now)s,
    started_at = %(now)s, completed_at = NULL, pgid = NULL, pgid_start = NULL
FROM pick WHERE jobs.seq = pick.pick_seq AND (jobs.status = 'queued') IS TRUE
RETURNING {job_columns}

-- lock_register --
-- Node registration is one node at a time (the settings check and the insert)
SELECT pg_advisory_xact_lock(%(key)s)

-- register_node --
-- A new node id for this start, with its first lease; refused (no row) while a live node
-- runs with other cluster-wide settings. Run after lock_register, in its transaction.
INSERT INTO nodes (host, state_dir, pid, workers, settings_hash, settings, started_at,
                   lease_until)
SELECT %(host)s, %(state_dir)s, %(pid)s, %(workers)s, %(hash)s, %(settings)s, jobd_now_us(),
       jobd_now_us() + %(lease_us)s
WHERE NOT EXISTS (SELECT 1 FROM nodes WHERE ended_at IS NULL
                  AND lease_until > jobd_now_us() AND settings_hash <> %(hash)s)
RETURNING id, lease_until

-- differing_settings --
-- What a refused node (or reload) compares its settings with, to name the first difference
SELECT id, host, settings FROM nodes
WHERE ended_at IS NULL AND lease_until > jobd_now_us() AND settings_hash <> %(hash)s
  AND id IS DISTINCT FROM %(node)s::bigint
ORDER BY id LIMIT 1

-- set_node_settings --
-- A reload this node accepted: its cluster-wide settings and their hash now
UPDATE nodes SET settings_hash = %(hash)s, settings = %(settings)s, workers = %(workers)s
WHERE id = %(node)s

-- heartbeat --
-- Renew this node's lease while it holds one, and read back what it runs: the jobs and
-- whether their cancel was requested; and every live node's workers together (the
-- cluster's slots, for wait reasons). No row: the lease is lost.
WITH beat AS (
    UPDATE nodes SET lease_until = jobd_now_us() + %(lease_us)s, beat = beat + 1
    WHERE id = %(node)s AND ended_at IS NULL AND lease_until > jobd_now_us()
    RETURNING id, beat, lease_until)
SELECT beat.beat, beat.lease_until, j.id, j.attempts, j.cancel_requested,
       (SELECT sum(workers) FROM nodes WHERE ended_at IS NULL
        AND lease_until > jobd_now_us()) AS slots
FROM beat LEFT JOIN jobs j ON j.node_id = beat.id AND j.status = 'running'

-- end_node --
-- A clean stop: this node holds no lease any more, and is ended unless it still owns a
-- running job (an end that could not be written), which a rescue or this host's next
-- start then takes over
UPDATE nodes SET lease_until = least(lease_until, jobd_now_us()),
    ended_at = CASE WHEN EXISTS (SELECT 1 FROM jobs WHERE status = 'running'
                                 AND node_id = %(node)s) THEN NULL ELSE jobd_now_us() END
WHERE id = %(node)s AND ended_at IS NULL

-- drop_lease --
-- This node lost its lease (its own deadline passed, or a heartbeat found none): it ends
-- now in the database's clock, so that its fenced writes are refused from now on; the row
-- stays open for the rescue that takes its jobs over
UPDATE nodes SET lease_until = least(lease_until, jobd_now_us()) WHERE id = %(node)s

-- live_nodes --
-- Every other node not ended yet, with its beat: the rescuer watches each one's beat on
-- its own clock
SELECT id, beat, lease_until < jobd_now_us() - %(margin_us)s FROM nodes
WHERE ended_at IS NULL AND id <> %(node)s

-- expired_node --
-- Which node a rescue takes over: one whose lease ended more than %(margin_us)s ago by
-- the database's clock, and whose beat the rescuer has watched stand still as long by its
-- own. Ended in the same transaction, so a late heartbeat finds no lease to renew.
UPDATE nodes SET ended_at = jobd_now_us()
WHERE id = %(dead)s AND beat = %(beat)s AND ended_at IS NULL
  AND lease_until < jobd_now_us() - %(margin_us)s
RETURNING id

-- earlier_nodes --
-- Which nodes restart recovery takes over: this host's and state folder's earlier node
-- ids, dead for certain (this node holds the folder's lock and has killed their recorded
-- process groups), without waiting for their leases
UPDATE nodes SET ended_at = jobd_now_us()
WHERE host = %(host)s AND state_dir = %(state_dir)s AND id <> %(node)s AND ended_at IS NULL
RETURNING id

-- earlier_processes --
-- The recorded process groups of the running jobs restart recovery takes over: this
-- host's and state folder's earlier nodes', and a one-node jobd's (no node)
SELECT j.id, j.pgid, j.pgid_start FROM jobs j
WHERE j.status = 'running' AND j.pgid IS NOT NULL AND (j.node_id IS NULL OR j.node_id IN (
    SELECT n.id FROM nodes n WHERE n.host = %(host)s AND n.state_dir = %(state_dir)s
    AND n.id <> %(node)s AND n.ended_at IS NULL))

-- nodes_jobs --
-- The running jobs of the nodes a rescue ended (%(orphans)s: also those of no node, which
-- a one-node jobd left), locked until the rescue commits
SELECT node_id, {job_columns} FROM jobs
WHERE status = 'running' AND (node_id = ANY(%(nodes)s::bigint[])
                              OR %(orphans)s AND node_id IS NULL)
ORDER BY seq FOR UPDATE

-- end_sessions --
-- A rescued node's sessions, ended: any lock a frozen node still holds goes, and its
-- place in the notification queue (the owner of the database may end its own role's)
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE application_name = ANY(%(names)s::text[]) AND datname = current_database()
  AND pid <> pg_backend_pid()

-- node_names --
-- What a node's sessions are called (pg_stat_activity), to end them after its rescue
SELECT host, pid FROM nodes WHERE id = %(node)s

-- notify --
-- A cluster node's notifications, sent with the commit (delivered only if it holds):
-- payloads are "<job id>:<version>" or a meta key, never job data
SELECT pg_notify(n.channel, n.payload)
FROM unnest(%(channels)s::text[], %(payloads)s::text[]) AS n (channel, payload)

-- stats_nodes --
-- admin.stats' nodes: every node not yet ended (one whose lease lapsed shows until it is
-- rescued), with how many jobs it runs; times as the wire writes them
SELECT n.id, n.host, jobd_iso(n.started_at), jobd_iso(n.lease_until), count(j.seq)
FROM nodes n LEFT JOIN jobs j ON j.node_id = n.id AND j.status = 'running'
WHERE n.ended_at IS NULL
GROUP BY n.id ORDER BY n.id

-- cleanup_lock --
-- One node sweeps at a time: a session lock on a connection held for the sweep (released
-- by cleanup_unlock, or with the session if the node dies); false: another node sweeps
SELECT pg_try_advisory_lock(%(key)s)

-- cleanup_unlock --
-- The sweep is over: the next node's turn
SELECT pg_advisory_unlock(%(key)s)

-- append_log --
-- A chunk of a running job's log at its absolute offset, fenced as a checkpoint is (the
-- row lock keeps a rescue from slipping in before the commit)
INSERT INTO job_log_chunks (job, pos, data)
SELECT seq, %(pos)s, %(data)s FROM jobs WHERE id = %(job_id)s AND status = 'running'
  AND {fence}
FOR SHARE
ON CONFLICT (job, pos) DO NOTHING

-- tell_log --
-- A line of a job's story that no attempt of it writes (a cancel while it was queued, the
-- closing line of an attempt a rescue or a recovery ended), after the last byte of its
-- log in the database and on a line of its own; none when the database holds none of its
-- log (its events tell the story then)
INSERT INTO job_log_chunks (job, pos, data)
SELECT c.job, c.pos + length(c.data),
       CASE WHEN substring(c.data FROM length(c.data)) = '\x0a'::bytea THEN %(data)s
            ELSE '\x0a'::bytea || %(data)s END
FROM job_log_chunks c JOIN jobs j ON j.seq = c.job
WHERE j.id = %(job_id)s
ORDER BY c.pos DESC LIMIT 1
ON CONFLICT (job, pos) DO NOTHING

-- trim_log --
-- max_log_bytes: the chunks wholly before the log's kept part go, oldest first
DELETE FROM job_log_chunks
WHERE job = (SELECT seq FROM jobs WHERE id = %(job_id)s) AND pos + length(data) <= %(keep_from)s

-- read_log --
-- jobs.logs from any node: the chunks that hold bytes from %(offset)s on, up to
-- %(limit)s bytes (or, from a dropped part, the oldest kept ones), in order
SELECT c.pos, c.data FROM job_log_chunks c JOIN jobs j ON j.seq = c.job
WHERE j.id = %(job_id)s AND c.pos + length(c.data) > %(offset)s
ORDER BY c.pos LIMIT %(limit)s

-- has_log --
-- Whether any of a job's log is in the database (no: its story is told from its events)
SELECT EXISTS (SELECT 1 FROM job_log_chunks c JOIN jobs j ON j.seq = c.job
               WHERE j.id = %(job_id)s)

-- log_end --
-- How far a job's log reaches in the database: the absolute offset after its last chunk
SELECT coalesce(max(c.pos + length(c.data)), 0) FROM job_log_chunks c
JOIN jobs j ON j.seq = c.job WHERE j.id = %(job_id)s

-- report_progress --
-- Live progress of a running attempt, with the next value of the versions sequence
-- (above the job's row and its last report), and the wake-up for every node's waiters:
-- payload "<job id>:<version>". The job's row is share-locked first: a change of it that
-- is being written is committed before this takes its version, so the report's version
-- is above it. Fenced as every write for a running job: a node past its lease, or whose
-- attempt was rescued, reports nothing.
WITH j AS (SELECT seq, version FROM jobs WHERE id = %(job_id)s AND status = 'running'
           AND {fence} FOR SHARE),
p AS (
    INSERT INTO job_progress AS p (job, node_id, attempt, progress, phase, message, version,
                                   updated_at)
    SELECT seq, %(node)s, %(attempt)s, %(progress)s, %(phase)s, %(message)s,
           greatest(nextval('job_versions'), version + 1), jobd_now_us()
    FROM j
    ON CONFLICT (job) DO UPDATE SET node_id = excluded.node_id, attempt = excluded.attempt,
        progress = excluded.progress, phase = excluded.phase, message = excluded.message,
        version = greatest(excluded.version, p.version + 1), updated_at = excluded.updated_at
    RETURNING version)
SELECT p.version, pg_notify('jobd', %(job_id)s || ':' || p.version) FROM p

-- live_progress --
-- A running job's live progress as its own node last reported it, when newer than
-- %(version)s (a stale row of a lost node, or of an earlier attempt, is not taken)
SELECT p.progress, p.phase, p.message, p.version FROM job_progress p
JOIN jobs j ON j.seq = p.job
WHERE j.id = %(job_id)s AND j.status = 'running' AND p.node_id = j.node_id
  AND p.attempt = j.attempts AND p.version > %(version)s

-- forget_progress --
-- An attempt's end: its live progress row goes
DELETE FROM job_progress WHERE job = (SELECT seq FROM jobs WHERE id = %(job_id)s)

-- load_manifest --
-- The manifest of a (user, project) as builtin:manifest last wrote it (no row: none yet)
SELECT document FROM manifests WHERE user_id = %(user_id)s AND project_id = %(project_id)s

-- save_manifest --
-- A running job's manifest of its (user, project), replacing the one before, fenced as a
-- checkpoint is (the row lock keeps a rescue from slipping in before the commit): a node
-- that lost the job writes nothing over the manifest of the attempt that took it over
INSERT INTO manifests (user_id, project_id, document, written_at)
SELECT %(user_id)s, %(project_id)s, %(document)s, %(now)s FROM jobs
WHERE id = %(job_id)s AND status = 'running' AND {fence}
FOR SHARE
ON CONFLICT (user_id, project_id) DO UPDATE SET document = excluded.document,
    written_at = excluded.written_at

-- purge_manifests --
-- admin.purge: every manifest of a user
DELETE FROM manifests WHERE user_id = %(user_id)s
