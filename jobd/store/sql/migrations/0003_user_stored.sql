-- what each user's finished jobs weigh, against execution.max_stored_per_user; a job
-- weighs 1, plus 1 per 4 KiB of its options, metadata and description (kept in step by
-- triggers, so no write path can forget it). The runner first repairs stored JSON that
-- SQLite refuses (its Python step repair_json), so that the rows can be weighed.
ALTER TABLE jobs ADD COLUMN weight INTEGER NOT NULL DEFAULT 1;
UPDATE jobs SET weight = 1 + (length(CAST(options AS BLOB)) + length(CAST(metadata AS BLOB))
                              + ifnull(length(CAST(description AS BLOB)), 0)) / 4096
    WHERE length(options) + length(metadata) + ifnull(length(description), 0) >= 1024;
CREATE TABLE user_stored (user_id TEXT PRIMARY KEY, weight INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO user_stored SELECT user_id, sum(weight) FROM jobs
    WHERE status IN ('completed', 'failed', 'cancelled') GROUP BY user_id;
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
