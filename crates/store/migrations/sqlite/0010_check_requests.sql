-- `panel smtp check` asks a running service to check the relay, so the check runs with the
-- environment, config file and license authorities delivery runs with. One row per request: a
-- service claims it, runs the check and stores the report (JSON) for the CLI to read.
CREATE TABLE check_requests (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    requested_at BIGINT NOT NULL,
    requested_by TEXT   NOT NULL,
    claimed_by   TEXT,
    claimed_at   BIGINT,
    report       TEXT,
    finished_at  BIGINT
);
CREATE INDEX check_requests_open ON check_requests (id) WHERE claimed_by IS NULL;
