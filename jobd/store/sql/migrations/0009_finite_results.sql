-- A program's result line could carry NaN or Infinity, which Python's parser takes and
-- SQLite's JSON functions refuse: every jobs.list page and jobs.changes answer holding
-- such a job failed. The runner first repairs the stored results (its Python step
-- repair_results: non-finite numbers become null, as migration 3 did for options and
-- metadata); nothing in the schema changes.
SELECT 1;
