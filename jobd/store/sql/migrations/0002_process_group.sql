-- the process group a running job left, so a restart can kill it
ALTER TABLE jobs ADD COLUMN pgid INTEGER;
ALTER TABLE jobs ADD COLUMN pgid_start INTEGER;
