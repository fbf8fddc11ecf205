-- Live progress across cluster nodes (SPEC §11): a running attempt's latest progress,
-- rewritten many times a second and worth nothing after a crash (the durable values are
-- in jobs). Unlogged, written with synchronous_commit off; no index but the key, and room
-- on each page, so every update is HOT. Readers take a row only when its node and attempt
-- are the running job's own.
CREATE UNLOGGED TABLE job_progress (
    job bigint PRIMARY KEY,
    node_id bigint NOT NULL,
    attempt integer NOT NULL,
    progress double precision NOT NULL,
    phase text,
    message text,
    version bigint NOT NULL,
    updated_at bigint NOT NULL
) WITH (fillfactor = 50);
