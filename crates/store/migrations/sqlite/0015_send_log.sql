-- The sending limits' shared budget: one row per message sent (when limits are set), kept a
-- day; every service counts the same rows, so a limit is the installation's, not a process's.
CREATE TABLE send_log (
    id         INTEGER PRIMARY KEY,
    at         INTEGER NOT NULL,
    recipients INTEGER NOT NULL
);
CREATE INDEX send_log_at ON send_log (at);
