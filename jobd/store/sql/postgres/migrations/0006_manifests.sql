-- builtin:manifest's manifests in the database (SPEC §7, §11): one row per (user,
-- project), holding the JSON document a SQLite jobd keeps in
-- <state dir>/manifests/<user>/<project>.json, so that every node indexes incrementally
-- from the same record and admin.purge on any node removes it. The document is text,
-- not jsonb: it is only ever read and written whole (never queried inside), text keeps
-- it byte for byte as written and costs no parse of a document of many MB on each write,
-- and TOAST stores it compressed out of line either way. No foreign key to jobs: a
-- manifest outlives the jobs that wrote it (cleanup deletes those).
CREATE TABLE manifests (
    user_id text NOT NULL,
    project_id text NOT NULL,
    document text NOT NULL,
    written_at bigint NOT NULL,
    PRIMARY KEY (user_id, project_id)
);
