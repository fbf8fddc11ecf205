-- A program's result line could carry NaN or Infinity, which Python's parser takes and
-- PostgreSQL's json refuses: every read of such a job (jobs.get, jobs.list) failed. A
-- stored result that is no JSON is kept as {"unreadable": "<the text>"}, so that the job
-- reads again and nothing is lost (SQL cannot tell a bare NaN from the word in a string,
-- so the numbers are not picked out one by one, as SQLite's Python step does).
DO $$
DECLARE
    broken record;
BEGIN
    FOR broken IN SELECT seq, result FROM jobs WHERE result ~ '(NaN|Infinity)' LOOP
        BEGIN
            PERFORM broken.result::json;
        EXCEPTION WHEN others THEN
            UPDATE jobs SET result = json_build_object('unreadable', broken.result)::text
            WHERE seq = broken.seq;
        END;
    END LOOP;
END
$$;
