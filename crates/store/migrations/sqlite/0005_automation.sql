-- Templates, workflows and schedules: one row per definition; doc is the JSON the user wrote.
-- Schedules keep their timing here: next_fire_at is when a service fires it next (a
-- compare-and-set on it makes each fire time run once), last_fire_at the last fire time run.
CREATE TABLE definitions (
    kind         TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    doc          TEXT    NOT NULL,
    enabled      INTEGER NOT NULL,
    trigger      TEXT,
    next_fire_at BIGINT,
    last_fire_at BIGINT,
    created_at   BIGINT  NOT NULL,
    updated_at   BIGINT  NOT NULL,
    updated_by   TEXT    NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE INDEX definitions_due ON definitions (next_fire_at) WHERE kind = 'schedule' AND enabled = 1;
CREATE INDEX definitions_trigger ON definitions (trigger) WHERE kind = 'workflow';

-- Events posted to workflows; an idempotency key makes a repeated post a no-op.
CREATE TABLE events (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    type            TEXT   NOT NULL,
    object          TEXT   NOT NULL,
    idempotency_key TEXT   UNIQUE,
    received_at     BIGINT NOT NULL
);

-- Every run of a schedule, workflow or dispatch, with each step's outcome. fire_key is
-- 'schedule:NAME@MILLIS' for a clock-driven run: the database keeps one run per fire time.
CREATE TABLE runs (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    trigger    TEXT    NOT NULL,
    fire_key   TEXT    UNIQUE,
    fire_time  BIGINT,
    event_id   BIGINT,
    started_at BIGINT  NOT NULL,
    missed     INTEGER NOT NULL,
    status     TEXT    NOT NULL,
    detail     TEXT,
    service    TEXT    NOT NULL,
    steps      TEXT    NOT NULL
);
CREATE INDEX runs_by_name ON runs (kind, name, id);
CREATE INDEX runs_by_event ON runs (event_id) WHERE event_id IS NOT NULL;

ALTER TABLE messages ADD COLUMN run_id BIGINT;
CREATE INDEX messages_run ON messages (run_id) WHERE run_id IS NOT NULL;
