-- What each running service loaded, so that `panel services list`, the dashboard and
-- `smtp check` show what delivery runs with: its config file, the license authorities it
-- trusts (key ids, JSON list), and a note when the file changed in a way it has not applied
-- (a restart is needed) or cannot read.
ALTER TABLE services ADD COLUMN config_file TEXT;
ALTER TABLE services ADD COLUMN authorities TEXT NOT NULL DEFAULT '[]';
ALTER TABLE services ADD COLUMN config_note TEXT;
