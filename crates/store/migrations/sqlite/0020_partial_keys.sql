-- A key is unique where it is given: each message, event and run without one (nearly all of
-- them) wrote a NULL into its table's unique index of keys, a page of the database written
-- at every commit that inserts them, for an entry no lookup ever finds. The indexes now hold
-- the keys only; an insert that names a key names the index by its condition.
DROP INDEX messages_idempotency_key;
CREATE UNIQUE INDEX messages_idempotency_key ON messages (idempotency_key) WHERE idempotency_key IS NOT NULL;

-- SQLite cannot take a column's UNIQUE away: events and runs are made anew (SQLite's
-- documented procedure), each with its ids' sequence: AUTOINCREMENT never hands out an id
-- again, even one whose row retention deleted.
CREATE TABLE events_new (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    type            TEXT   NOT NULL,
    object          TEXT   NOT NULL,
    idempotency_key TEXT,
    received_at     BIGINT NOT NULL
);
INSERT INTO events_new (id, type, object, idempotency_key, received_at)
    SELECT id, type, object, idempotency_key, received_at FROM events;
UPDATE sqlite_sequence SET seq = MAX(seq, (SELECT seq FROM sqlite_sequence WHERE name = 'events'))
    WHERE name = 'events_new';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'events_new', seq FROM sqlite_sequence
    WHERE name = 'events' AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'events_new');
DROP TABLE events;
ALTER TABLE events_new RENAME TO events;
CREATE UNIQUE INDEX events_idempotency_key ON events (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX events_received ON events (received_at);

CREATE TABLE runs_new (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    trigger    TEXT    NOT NULL,
    fire_key   TEXT,
    fire_time  BIGINT,
    event_id   BIGINT,
    started_at BIGINT  NOT NULL,
    missed     INTEGER NOT NULL,
    status     TEXT    NOT NULL,
    detail     TEXT,
    service    TEXT    NOT NULL,
    steps      TEXT    NOT NULL
);
INSERT INTO runs_new (id, kind, name, trigger, fire_key, fire_time, event_id, started_at, missed, status, detail, service, steps)
    SELECT id, kind, name, trigger, fire_key, fire_time, event_id, started_at, missed, status, detail, service, steps FROM runs;
UPDATE sqlite_sequence SET seq = MAX(seq, (SELECT seq FROM sqlite_sequence WHERE name = 'runs'))
    WHERE name = 'runs_new';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'runs_new', seq FROM sqlite_sequence
    WHERE name = 'runs' AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'runs_new');
DROP TABLE runs;
ALTER TABLE runs_new RENAME TO runs;
CREATE UNIQUE INDEX runs_fire_key ON runs (fire_key) WHERE fire_key IS NOT NULL;
CREATE INDEX runs_by_name ON runs (kind, name, id);
CREATE INDEX runs_started ON runs (started_at);
